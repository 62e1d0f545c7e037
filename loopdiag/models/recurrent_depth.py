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

import numpy as np
import torch
import torch.nn as nn

from loopdiag.models.config import ModelConfig
from loopdiag.models.layers import LoopedLM, norm

LOOP_SAMPLING_SIGMA = 0.5
_RATE_NODES = 64  # Gauss–Hermite nodes over the log-normal rate: 200k draws agree to a loop


def _log_rate_mean(mean: int) -> float:
    """The mean of the log-normal rate's log, so that the rate's own mean is `mean`."""
    return math.log(mean) - LOOP_SAMPLING_SIGMA**2 / 2


def longest_sampled_loops(mean: int, steps: int) -> int:
    """The loop count a run of `steps` sampled steps more likely than not reaches once: the
    least k with P(K > k) ≤ 1 / `steps`, K drawn as `sample_loop_count` draws it (K − 1 is
    Poisson at a log-normal rate, and P(Poisson(λ) ≥ k) is the regularized lower incomplete
    gamma of k at λ). At mean 12 over 300 steps: 45."""
    if mean < 1 or steps < 1:
        raise ValueError(f"need mean >= 1 and steps >= 1, got {mean}, {steps}")
    nodes, weights = np.polynomial.hermite_e.hermegauss(_RATE_NODES)
    weights = torch.tensor(weights / math.sqrt(2 * math.pi), dtype=torch.float64)
    rates = torch.tensor(np.exp(_log_rate_mean(mean) + LOOP_SAMPLING_SIGMA * nodes),
                         dtype=torch.float64)

    def exceeded(loops: int) -> bool:  # P(K > loops) > 1 / steps, falling as loops grows
        more = torch.special.gammainc(torch.tensor(float(loops), dtype=torch.float64), rates)
        return float((weights * more).sum()) > 1 / steps

    low, high = 0, mean  # exceeded(low) or low = 0; search up, then halve
    while exceeded(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if exceeded(middle) else (low, middle)
    return high


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
        tau = torch.normal(_log_rate_mean(mean), LOOP_SAMPLING_SIGMA, size=())
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
