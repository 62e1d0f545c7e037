"""`recurrent-depth`: a Huginn-style prelude / recurrent core / coda.

    e = N(prelude(N(embed)))            run once
    s^(0) ~ N(0, std^2)                 random initial state (zeros when std = 0)
    s^(t) = N(core(W_A [s^(t-1); e]))   the looped core, concat-adapter injection of e
    logits = head(coda(s^(K)))          run once
Optionally K is drawn per training step (log-normal Poisson, mean n_loops), and gradients
flow through the last `backprop_loops` iterations only (truncated backprop).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn as nn

from loopdiag.models.config import ModelConfig
from loopdiag.models.layers import LoopedLM, norm

LOOP_SAMPLING_SIGMA = 0.5


class RecurrentDepthTransformer(LoopedLM):
    arch = "recurrent-depth"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.prelude = self.make_blocks(cfg.n_prelude)
        self.adapter = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.core = self.make_blocks(cfg.n_layers)  # shared by every loop
        self.coda = self.make_blocks(cfg.n_coda)
        self.init_weights()

    def sample_loop_count(self) -> int:
        mean = self.config.n_loops
        tau = torch.normal(math.log(mean) - LOOP_SAMPLING_SIGMA**2 / 2, LOOP_SAMPLING_SIGMA, size=())
        return int(torch.poisson(tau.exp()).item()) + 1

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, n_loops: int | None = None):
        if n_loops is None and self.training and self.config.sample_loops:
            n_loops = self.sample_loop_count()
        n_loops = self.resolve_loops(n_loops)
        e = norm(self.embed(idx))
        for block in self.prelude:
            e = block(e)
        e = norm(e)
        s = torch.randn_like(e) * self.config.init_state_std
        first_with_grad = 0 if self.config.backprop_loops is None else max(0, n_loops - self.config.backprop_loops)
        loop_states = []
        for t in range(n_loops):
            with torch.no_grad() if t < first_with_grad else nullcontext():
                x = self.adapter(torch.cat([s, e], dim=-1))
                for block in self.core:
                    x = block(x)
                x = self.loop_out(x)  # x_L^(t)
                s = norm(x)
            loop_states.append(s)
        supervised = loop_states if self.config.loss_on == "all" else loop_states[-1:]
        return self.read_out([self.coda_out(state) for state in supervised], targets)

    def coda_out(self, state: torch.Tensor) -> torch.Tensor:
        for block in self.coda:
            state = block(state)
        return state
