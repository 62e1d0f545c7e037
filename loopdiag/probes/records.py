"""Records: what one forward collects, combining it across ranks, the single device-to-host
sync, averaging forwards into per-loop lists, and the flat and long views of a record
(pandas imported lazily)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from loopdiag import distributed
from loopdiag.probes.stats import LOOP_SUMS_OVER_RANKS, LoopSums, PackedSequences, finish_loop

if TYPE_CHECKING:
    import pandas as pd

Record = dict[str, Any]  # scalars and per-loop lists (index 0 = loop 1)


@dataclass
class ForwardBuffer:
    """Device values collected during one root forward."""

    grad_enabled: bool
    costly: bool
    # (B, T) of the root's inputs of 2 or more dims: how a 2-D (B·T, d) loop output splits
    rows: tuple[tuple[int, int], ...] = ()
    # the sequences of a packed (1, N) batch, from the root's restarting `position_ids`
    packed: PackedSequences | None = None
    loops: list[LoopSums] = field(default_factory=list)
    # loop index -> one entry per call inside that loop (costly tier only)
    attention: dict[int, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)
    layer_norms: dict[int, list[Tensor]] = field(default_factory=dict)


def reduce_over_ranks(forwards: Sequence[ForwardBuffer]) -> None:
    """Replace each forward's sums over this rank's rows by those over the global batch, in
    place, with one all-reduce (two on a costly step); the rules are in
    `loopdiag.probes.recorder`. Every rank calls it on the same step with forwards of the
    same shape, as data-parallel ranks running one model do."""
    world = distributed.world_size()
    summed: list[Tensor] = []
    maxed: list[Tensor] = []
    for forward in forwards:
        for sums in forward.loops:
            summed += [_to_sum(sums[key], rule, like=sums["norm_sum"])
                       for key, rule in LOOP_SUMS_OVER_RANKS.items() if key in sums]
        for calls in forward.attention.values():
            summed += [entropy for entropy, _ in calls]
            maxed += [max_logit for _, max_logit in calls]
        for norms in forward.layer_norms.values():
            summed += norms
    total, highest = _all_reduce(summed, dist.ReduceOp.SUM), _all_reduce(maxed, dist.ReduceOp.MAX)
    for forward in forwards:  # read back in the order written above
        for sums in forward.loops:
            for key, rule in LOOP_SUMS_OVER_RANKS.items():
                if key in sums:
                    sums[key] = _from_sum(next(total), rule, world)
        for calls in forward.attention.values():
            calls[:] = [(next(total) / world, next(highest)) for _ in calls]
        for norms in forward.layer_norms.values():
            norms[:] = [next(total) / world for _ in norms]


def _to_sum(value: Tensor | int | None, rule: str, like: Tensor) -> Tensor:
    """What a rank contributes to the sum over ranks of one per-loop value."""
    if value is None:  # no gradient arrived: NaN once combined
        return like.new_tensor(math.nan)
    if not isinstance(value, Tensor):  # a count
        value = like.new_tensor(value)
    return value if rule == "sum" else value**2


def _from_sum(total: Tensor, rule: str, world: int) -> Tensor:
    if rule == "sum":
        return total
    return total.sqrt() if rule == "norm" else total.sqrt() / world


def _all_reduce(values: list[Tensor], op: dist.ReduceOp) -> Iterator[Tensor]:
    if not values:
        return iter(())
    packed = torch.stack(values)
    dist.all_reduce(packed, op=op)
    return iter(packed.unbind())


def to_host(tree: Any) -> Any:
    """The same nested dicts / lists / tuples with every tensor replaced by a Python number,
    all fetched with one `stack(...).tolist()`: a single device sync."""
    return _map_leaves(tree, lambda packed: iter(packed.tolist()))


def sum_over_ranks(tree: Any) -> Any:
    """The same tree with every tensor (a 0-d sum over this rank's part) replaced by its sum
    over the ranks: one all-reduce. Every rank calls it alike."""

    def all_reduce(packed: Tensor) -> Iterator[Tensor]:
        dist.all_reduce(packed)
        return iter(packed.unbind())

    return _map_leaves(tree, all_reduce)


def _map_leaves(tree: Any, on_packed: Callable[[Tensor], Iterator[Any]]) -> Any:
    """`tree` with its 0-d tensor leaves replaced, in order, by what `on_packed` makes of
    them stacked into one tensor (on the first leaf's device)."""
    leaves: list[Tensor] = []

    def collect(node: Any) -> None:
        if isinstance(node, Tensor):
            leaves.append(node)
        elif isinstance(node, dict):
            for value in node.values():
                collect(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                collect(value)

    collect(tree)
    if not leaves:
        return tree
    device = leaves[0].device
    values = on_packed(torch.stack([leaf.to(device) for leaf in leaves]))

    def rebuild(node: Any) -> Any:
        if isinstance(node, Tensor):
            return next(values)
        if isinstance(node, dict):
            return {key: rebuild(value) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(rebuild(value) for value in node)
        return node

    return rebuild(tree)


def forward_stats(forwards: Sequence[tuple[list, dict, dict]]) -> Record:
    """Per-loop lists from the synced (loops, attention, layer_norms) of each forward: each
    loop's value is the mean over the forwards that reached it (micro-batches)."""
    per_forward: list[dict[str, list[float]]] = []
    for loops, attention, layer_norms in forwards:
        finished = [finish_loop(sums) for sums in loops]
        # act_grad_norm exists only for loops whose output needed a gradient: NaN elsewhere
        names = dict.fromkeys(name for loop in finished for name in loop)
        stats = {name: [loop.get(name, math.nan) for loop in finished] for name in names}
        n_loops = len(loops)
        if attention:
            calls = [attention.get(k, []) for k in range(n_loops)]
            stats["attn_entropy"] = [_mean([e for e, _ in c]) for c in calls]
            stats["attn_max_logit"] = [max((m for _, m in c), default=math.nan) for c in calls]
        n_layers = max((len(norms) for norms in layer_norms.values()), default=0)
        for layer in range(n_layers):
            stats[f"resid_norm/layer_{layer + 1:02d}"] = [
                _at(layer_norms.get(k, []), layer) for k in range(n_loops)]
        per_forward.append(stats)
    record: Record = {"n_loops": max((len(loops) for loops, _, _ in forwards), default=0)}
    for name in dict.fromkeys(name for stats in per_forward for name in stats):
        series = [stats[name] for stats in per_forward if name in stats]
        record[name] = [_mean([s[k] for s in series if k < len(s)])
                        for k in range(max(len(s) for s in series))]
    return record


def flatten_record(record: Record) -> dict[str, float]:
    """`/`-namespaced scalars: a per-loop list `resid_norm` becomes `resid_norm/loop_01`, ...
    (1-based, two digits or more), the keys W&B and the frames use."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, (list, tuple)):
            flat.update({f"{key}/loop_{k:02d}": v for k, v in enumerate(value, start=1)})
        else:
            flat[key] = value
    return flat


def records_frame(records: Sequence[Record]) -> pd.DataFrame:
    """One row per record, per-loop values as columns (`resid_norm/loop_01`, ...)."""
    import pandas as pd

    return pd.DataFrame([flatten_record(record) for record in records])


def records_loop_frame(records: Sequence[Record]) -> pd.DataFrame:
    """Long format, one row per (step, loop, stat): the per-loop lists only, loop 1-based,
    in record order (the run store's builder, rows ordered by step)."""
    from loopdiag.store.reader import metric_frames

    loops = metric_frames(records)[1]
    return loops.sort_values("step", kind="stable", ignore_index=True)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _at(values: Sequence[float], index: int) -> float:
    return values[index] if index < len(values) else math.nan
