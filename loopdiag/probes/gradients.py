"""Gradient-side statistics: per-group gradient norms, oscillation of the shared weights'
gradient from step to step, and the update-to-weight ratio of the shared weights.

The previous gradient is kept as one flattened copy of the shared parameters' gradient,
not as a random projection: the copy costs one parameter-sized buffer (4 bytes per shared
parameter in float32, as much as the weights), gives the cosine exactly, and is the only
way to count sign flips at all. A Gaussian projection estimates the cosine with error
~1/sqrt(m), so +-0.01 needs m ~ 10^4 dimensions: a projection matrix 10^4 times the
parameter count, or regenerated every step at 10^4 times the cost of a dot product.
The copy is held only across the step before a logged one; while a logged step runs, its
own flat gradient and a weight snapshot add two more parameter-sized buffers.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
from torch import Tensor, nn
from torch.linalg import vector_norm

from loopdiag.probes.stats import group_name, oscillation_sums, safe_div, sign_flip_fraction, window_stats


class GradientProbe:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], shared: list[nn.Parameter],
                 window: int):
        self.params = [p for _, p in named_params]
        self.groups = [group_name(name) for name, _ in named_params]
        self.shared = shared
        # Shared-grad norm of every step (logged or not), as device tensors until synced.
        self.norms: deque[Tensor | float] = deque(maxlen=window)
        self._previous: tuple[int, Tensor, Tensor] | None = None  # (step, flat grad, its norm)
        self._pending: dict[str, Any] | None = None
        self._snapshot: Tensor | None = None

    def after_backward(self, step: int, logged: bool, next_logged: bool) -> None:
        """Gradients are present and not yet clipped. Unlogged steps only add their norm to
        the window (and keep the flat gradient when the next step is logged)."""
        flat = self._flat_grad() if logged or next_logged else None
        if flat is not None:
            shared_norm = vector_norm(flat)
        else:
            present = [p.grad for p in self.shared if p.grad is not None]
            shared_norm = (vector_norm(torch.stack(torch._foreach_norm(present))) if present
                           else self.shared[0].new_zeros(()))
        self.norms.append(shared_norm)
        if logged:
            with_grad = [(group, p.grad) for group, p in zip(self.groups, self.params) if p.grad is not None]
            self._pending = {
                "groups": [group for group, _ in with_grad],
                "param_norms": torch._foreach_norm([grad for _, grad in with_grad]) if with_grad else [],
                "shared_norm": shared_norm,
                "window": list(self.norms),
            }
            if self._previous is not None and self._previous[0] == step - 1:
                _, prev_grad, prev_norm = self._previous
                self._pending["oscillation"] = {**oscillation_sums(flat, prev_grad), "prev_norm": prev_norm}
            self._snapshot = self._flat_weights()
        self._previous = (step, flat, shared_norm) if next_logged else None

    def take(self) -> dict[str, Any] | None:
        """This step's device values (with the update since `after_backward`), or None."""
        pending, snapshot = self._pending, self._snapshot
        self._pending = self._snapshot = None
        if pending is None:
            return None
        pending["update"] = (vector_norm(self._flat_weights() - snapshot), vector_norm(snapshot))
        return pending

    def state_dict(self) -> dict[str, Any]:
        """The norm window and the gradient kept for the next logged step: what a resumed
        run needs to record the same oscillation statistics as one never stopped."""
        previous = None
        if self._previous is not None:
            step, flat, norm = self._previous
            previous = {"step": step, "grad": flat.detach().cpu(), "norm": float(norm)}
        return {"norms": [float(norm) for norm in self.norms], "previous": previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.norms.clear()
        self.norms.extend(state["norms"])
        previous = state["previous"]
        self._previous = None
        if previous is not None:
            device = self.shared[0].device
            self._previous = (previous["step"], previous["grad"].to(device),
                              torch.tensor(previous["norm"], device=device))

    def discard(self) -> None:
        self._pending = self._snapshot = None

    def finish(self, synced: dict[str, Any]) -> dict[str, float]:
        """Host side of `take()`'s values. Statistics that cannot be computed yet (no
        gradient from the step before, window not full) are left out, not set to NaN."""
        squares: dict[str, float] = {}
        for group, param_norm in zip(synced["groups"], synced["param_norms"]):
            squares[group] = squares.get(group, 0.0) + param_norm**2
        stats = {"grad_norm": math.sqrt(sum(squares.values()))}
        stats.update({f"grad_norm/{group}": math.sqrt(square) for group, square in squares.items()})
        stats["shared_grad_norm"] = synced["shared_norm"]
        if "oscillation" in synced:
            terms = synced["oscillation"]
            stats["grad_cos"] = safe_div(terms["dot"], synced["shared_norm"] * terms["prev_norm"])
            stats["sign_flip"] = sign_flip_fraction(terms["sign_sum"], terms["nonzero"])
        window = synced["window"]
        self.norms = deque(window, maxlen=self.norms.maxlen)  # synced now: never sent again
        if len(window) == self.norms.maxlen:
            stats["gnorm_cv"], stats["gnorm_autocorr"] = window_stats(window)
        delta, weight = synced["update"]
        stats["update_ratio"] = safe_div(delta, weight)
        return stats

    def _flat_grad(self) -> Tensor:
        # A missing gradient counts as zeros so coordinates line up from step to step.
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                          for p in self.shared])

    def _flat_weights(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.shared])
