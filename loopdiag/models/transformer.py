"""`standard`: the compute-matched, non-looped reference: K*L distinct blocks run once."""

from __future__ import annotations

import torch

from loopdiag.models.config import ModelConfig
from loopdiag.models.layers import LoopedLM, norm


class StandardTransformer(LoopedLM):
    """K*L distinct blocks. `loop_out` fires after every group of L blocks, so its depth
    profile lines up with a looped model's per-loop profile."""

    arch = "standard"
    fixed_depth = True

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.blocks = self.make_blocks(cfg.n_loops * cfg.n_layers)
        self.init_weights()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, n_loops: int | None = None):
        if self.resolve_loops(n_loops) != self.config.n_loops:
            raise ValueError(
                f"standard is not looped: its depth is fixed at build time "
                f"(n_loops={self.config.n_loops}), got n_loops={n_loops}"
            )
        x = norm(self.embed(idx))
        group_outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if (i + 1) % self.config.n_layers == 0:
                x = self.loop_out(x)
                group_outputs.append(x)
        return self.read_out(group_outputs, targets)
