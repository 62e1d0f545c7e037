"""The plain Looped Transformer and two classic stabilisers.

- `looped` (LT): loop t starts from h^(t-1) = N(x_L^(t-1)); nothing else is injected.
- `looped-inject`: loop t starts from N(e + h^(t-1)) (additive input injection).
- `looped-scaled`: the stream carries over with no inter-loop norm, and both residual
  branches are scaled by lambda/K (residual scaling).
Loop 1 of each starts from N(e).
"""

from __future__ import annotations

import torch

from loopdiag.models.config import ModelConfig
from loopdiag.models.layers import LoopedLM, norm


class LoopedTransformer(LoopedLM):
    variants = ("looped", "looped-inject", "looped-scaled")

    def __init__(self, cfg: ModelConfig, arch: str = "looped"):
        if arch not in self.variants:
            raise ValueError(f"unknown looped variant {arch!r}")
        super().__init__(cfg)
        self.arch = arch
        self.blocks = self.make_blocks(cfg.n_layers)  # shared by every loop
        # looped-scaled drops the norm by definition; the others follow the config switch.
        self.inter_loop_norm = cfg.inter_loop_norm and arch != "looped-scaled"
        self.init_weights()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, n_loops: int | None = None):
        n_loops = self.resolve_loops(n_loops)
        e = self.embed(idx)
        branch_scale = self.config.residual_lambda / n_loops if self.arch == "looped-scaled" else 1.0
        loop_outputs, h = [], None
        for t in range(n_loops):
            if t == 0:
                x = norm(e)
            elif self.arch == "looped-inject":
                x = norm(e + h)
            else:
                x = h
            for block in self.blocks:
                x = block(x, branch_scale=branch_scale)
            x = self.loop_out(x)  # x_L^(t)
            loop_outputs.append(x)
            h = norm(x) if self.inter_loop_norm else x
        return self.read_out(loop_outputs, targets)
