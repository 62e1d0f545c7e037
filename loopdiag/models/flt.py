"""The Fully Looped Transformer (arXiv 2605.18797) and its two ablations.

Every loop restarts its stream from N(e) (the Fully Looped Architecture), so nothing
accumulates across loops; loop t reaches loop t-1 only through h^(t-1) = N(x_L^(t-1)):

- `flt`: attention injection in every block of loops t >= 2,
      a = W_O Attn(Q = N(h^(t-1)) W_Q, K = N(x) W_K, V = N(x) W_V);  x <- x + a;  x <- x + MLP(N(x))
  Softmax mixes the *current* values, so h^(t-1) chooses what is read but its magnitude
  never enters the stream.
- `flt-ai1`: attention injection in block 1 only.
- `flt-res`: FLA with additive injection: every block first forms x <- N(x + h^(t-1)).
Loop 1 is a plain L-layer transformer; no variant adds a parameter.
"""

from __future__ import annotations

import torch

from loopdiag.models.config import ModelConfig
from loopdiag.models.layers import LoopedLM, norm


class FullyLoopedTransformer(LoopedLM):
    variants = ("flt-res", "flt-ai1", "flt")

    def __init__(self, cfg: ModelConfig, arch: str = "flt"):
        if arch not in self.variants:
            raise ValueError(f"unknown FLT variant {arch!r}")
        super().__init__(cfg)
        self.arch = arch
        self.blocks = self.make_blocks(cfg.n_layers)  # shared by every loop
        self.injected_blocks = {"flt": set(range(cfg.n_layers)), "flt-ai1": {0}, "flt-res": set()}[arch]
        self.init_weights()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, n_loops: int | None = None):
        n_loops = self.resolve_loops(n_loops)
        x0 = norm(self.embed(idx))
        loop_outputs, h = [], None
        for _ in range(n_loops):
            x = x0  # the stream restarts every loop
            for layer, block in enumerate(self.blocks):
                if h is not None and self.arch == "flt-res":
                    x = norm(x + h)
                query_source = h if h is not None and layer in self.injected_blocks else None
                x = block(x, query_source=query_source)
            x = self.loop_out(x)  # x_L^(t)
            loop_outputs.append(x)
            h = norm(x)  # normalised once here, used as N(h) by every injected block
        return self.read_out(loop_outputs, targets)
