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

Sharded weights (FSDP2: DTensor parameters and gradients): every device value here is a
sum over coordinates (squared norms, dot products, sign counts), so each rank computes it
on its own shard and one all-reduce of the packed sums per logged step gives the values of
the whole weights; nothing is gathered, and the flat copies are of the local shard only.
Norms are kept squared until the host takes their roots in `finish`. The parameters are
looked up by name on every backward, since `fully_shard` replaces them after `attach`.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from loopdiag import distributed
from loopdiag.probes.records import sum_over_ranks
from loopdiag.probes.stats import group_name, oscillation_sums, safe_div, sign_flip_fraction, window_stats


class GradientProbe:
    def __init__(self, model: nn.Module, shared: list[nn.Parameter], window: int):
        self.model = model
        names = {id(p): name for name, p in model.named_parameters()}
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.groups = [group_name(name) for name in self.names]
        self.shared_names = [names[id(p)] for p in shared]
        # Squared shared-grad norm of every step (logged or not): device tensors until synced.
        self.norms: deque[Tensor | float] = deque(maxlen=window)
        self._previous: tuple[int, Tensor, Tensor] | None = None  # (step, flat grad, its square)
        # Kept through the step only once `after_backward` has been called again in a step
        # (once per micro-batch): a later call needs the step before's gradient too.
        self._previous_of_step: tuple[int, Tensor, Tensor] | None = None
        self._called_again = False
        self._pending: dict[str, Any] | None = None
        self._snapshot: Tensor | None = None
        self._sharded = False

    def after_backward(self, step: int, logged: bool, next_logged: bool, again: bool = False) -> None:
        """Gradients are present and not yet clipped. Unlogged steps only add their norm to
        the window (and keep the flat gradient when the next step is logged). `again`: a
        later call in the same step (one per micro-batch), whose gradients replace the
        earlier call's."""
        by_name = dict(self.model.named_parameters())
        params = [by_name[name] for name in self.names]
        shared = [by_name[name] for name in self.shared_names]
        self._sharded = any(isinstance(p, DTensor) for p in params)
        flat = self._flat(shared, grads=True) if logged or next_logged else None
        if flat is not None:
            shared_square = torch.dot(flat, flat)
        else:
            present = [self._rank_share(p.grad) for p in shared if p.grad is not None]
            shared_square = (_square_sum(present) if present
                             else self._rank_share(shared[0].detach()).new_zeros(()))
        if again:
            self._called_again = True
            self._previous = self._previous_of_step
            if self.norms:
                self.norms.pop()
        else:
            self._previous_of_step = self._previous if self._called_again else None
        self.norms.append(shared_square)
        if logged:
            with_grad = [(group, p.grad) for group, p in zip(self.groups, params) if p.grad is not None]
            self._pending = {
                "groups": [group for group, _ in with_grad],
                "param_squares": _squares([self._rank_share(grad) for _, grad in with_grad]),
                "shared_square": shared_square,
                "window": list(self.norms),
            }
            if self._previous is not None and self._previous[0] == step - 1:
                _, prev_grad, prev_square = self._previous
                self._pending["oscillation"] = {**oscillation_sums(flat, prev_grad), "prev_square": prev_square}
            self._snapshot = self._flat(shared, grads=False)
        self._previous = (step, flat, shared_square) if next_logged else None

    def take(self) -> dict[str, Any] | None:
        """This step's device values (with the update since `after_backward`), or None.
        Sharded, every rank calls it on the same steps: it all-reduces once."""
        pending, snapshot = self._pending, self._snapshot
        self._pending = self._snapshot = None
        if pending is None:
            return None
        by_name = dict(self.model.named_parameters())
        delta = self._flat([by_name[name] for name in self.shared_names], grads=False) - snapshot
        pending["update"] = (torch.dot(delta, delta), torch.dot(snapshot, snapshot))
        return sum_over_ranks(pending) if self._sharded else pending

    def state_dict(self) -> dict[str, Any] | None:
        """The norm window and the gradient kept for the next logged step: what a resumed
        run needs to record the same oscillation statistics as one never stopped. None when
        sharded: each rank holds its own shard's part, and rank 0 writes the checkpoint
        alone, so a sharded run's window starts again after a resume."""
        if self._sharded:
            return None
        previous = None
        if self._previous is not None:
            step, flat, square = self._previous
            previous = {"step": step, "grad": flat.detach().cpu(), "square": float(square)}
        return {"squares": [float(square) for square in self.norms], "previous": previous}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        self.norms.clear()
        self.norms.extend(state["squares"])
        previous = state["previous"]
        self._previous = None
        if previous is not None:
            device = next(self.model.parameters()).device
            self._previous = (previous["step"], previous["grad"].to(device),
                              torch.tensor(previous["square"], device=device))

    def discard(self) -> None:
        self._pending = self._snapshot = None

    def finish(self, synced: dict[str, Any]) -> dict[str, float]:
        """Host side of `take()`'s values. Statistics that cannot be computed yet (no
        gradient from the step before, window not full) are left out, not set to NaN."""
        squares: dict[str, float] = {}
        for group, param_square in zip(synced["groups"], synced["param_squares"]):
            squares[group] = squares.get(group, 0.0) + param_square
        shared_norm = math.sqrt(synced["shared_square"])
        stats = {"grad_norm": math.sqrt(sum(squares.values()))}
        stats.update({f"grad_norm/{group}": math.sqrt(square) for group, square in squares.items()})
        stats["shared_grad_norm"] = shared_norm
        if "oscillation" in synced:
            terms = synced["oscillation"]
            stats["grad_cos"] = safe_div(terms["dot"], shared_norm * math.sqrt(terms["prev_square"]))
            stats["sign_flip"] = sign_flip_fraction(terms["sign_sum"], terms["nonzero"])
        window = synced["window"]
        self.norms = deque(window, maxlen=self.norms.maxlen)  # synced now: never sent again
        if len(window) == self.norms.maxlen:
            stats["gnorm_cv"], stats["gnorm_autocorr"] = window_stats([math.sqrt(w) for w in window])
        delta, weight = synced["update"]
        stats["update_ratio"] = safe_div(math.sqrt(delta), math.sqrt(weight))
        return stats

    def _flat(self, params: list[nn.Parameter], *, grads: bool) -> Tensor:
        # A missing gradient counts as zeros so coordinates line up from step to step.
        parts = []
        for p in params:
            value = (p.grad if p.grad is not None else torch.zeros_like(p)) if grads else p
            parts.append(self._rank_share(value).detach().reshape(-1))
        return torch.cat(parts)

    def _rank_share(self, value: Tensor) -> Tensor:
        """This rank's part of `value` in a sum over ranks: a DTensor's local shard, a
        replica (a replicated DTensor placement, or a plain tensor among sharded ones)
        counted once, on the first of the ranks that hold it."""
        if not self._sharded:
            return value
        if not isinstance(value, DTensor):
            return value if distributed.rank() == 0 else value.reshape(-1)[:0]
        local = value.to_local()
        coordinate = value.device_mesh.get_coordinate() or []
        counted = all(c == 0 for c, placement in zip(coordinate, value.placements) if placement.is_replicate())
        return local if counted else local.reshape(-1)[:0]


def _squares(tensors: list[Tensor]) -> list[Tensor]:
    """Each tensor's squared norm, in two fused kernels."""
    if not tensors:
        return []
    norms = torch._foreach_norm(tensors)
    return list(torch._foreach_mul(norms, norms))


def _square_sum(tensors: list[Tensor]) -> Tensor:
    return torch.stack(_squares(tensors)).sum()
