"""Do the loops compute? Accuracy per task depth and loop count, set beside how much each
loop still changes the stream.

A stable looped model can be stable because its extra loops do nothing: it settles on a
fixed point after a few loops and the rest repeat it. Two numbers tell that apart per
trained model: the loop after which its accuracy stops improving (`useful_loops`, from the
test-time loop-scaling rows) and the loop from which every loop moves the stream by less
than `IDLE_UPDATE` (`idle_from`, from the recorded per-loop relative update).

The inputs are the long loop-scaling rows of `loopdiag.evaluation.loop_scaling`, whose
per-depth metrics are named `accuracy_<h>hop`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from loopdiag.detect.loops import IDLE_UPDATE, loops_from
from loopdiag.store import SuiteData

HOP_METRIC = re.compile(r"^accuracy_(\d+)hop$")  # see `hop_accuracy_metric`
# A further loop is useful when it raises accuracy (mean over depths) by at least this
# much: two examples in a hundred, above the ±1.5-point noise of 512 held-out examples at
# the accuracies that matter.
USEFUL_GAIN = 0.02
# Fraction of a run's last records whose median relative update counts as its end state.
END_FRACTION = 0.1


def hop_accuracy_metric(hops: int) -> str:
    """The loop-scaling metric of accuracy on `hops`-hop examples."""
    return f"accuracy_{hops}hop"


def depth_rows(loop_scaling: pd.DataFrame) -> pd.DataFrame:
    """The per-depth accuracy rows, with a `hops` column; empty when no run has any."""
    hops = loop_scaling["metric"].astype(str).str.extract(HOP_METRIC)[0]
    rows = loop_scaling[hops.notna()].copy()
    rows["hops"] = hops[hops.notna()].astype(int)
    return rows


def matched_seeds(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """`rows` (from `depth_rows`) cut, per architecture, to the seeds it was trained with at
    every loop count it was trained at, and a line per set of seeds left out. A mean over
    seeds then compares loop counts, not seeds: a suite trained part of the way (a shard,
    a study under way) would otherwise average K = 1 over three seeds and K = 12 over
    two. An architecture no seed has whole keeps all its seeds, and its line says so."""
    if "seed" not in rows.columns or rows.empty:
        return rows, []
    kept, missing_by_seed, mixed = [], {}, []
    for arch, runs in rows.groupby("arch", sort=False):
        every_k = set(runs["train_loops"])
        trained = runs.groupby("seed")["train_loops"].agg(set)
        whole = [seed for seed, ks in trained.items() if ks == every_k]
        if not whole:
            mixed.append(arch)
            kept.append(runs)
            continue
        kept.append(runs[runs["seed"].isin(whole)])
        for seed, ks in trained.items():
            if ks != every_k:
                missing = ", ".join(str(k) for k in sorted(every_k - ks))
                missing_by_seed.setdefault((seed, missing), []).append(str(arch))
    lines = [f"Seed {seed} of {', '.join(archs)} left out of the accuracy means: not yet trained "
             f"at K = {missing}." for (seed, missing), archs in missing_by_seed.items()]
    lines += [f"{arch}: no seed trained at every K, so its accuracy means mix seeds." for arch in mixed]
    return pd.concat(kept).sort_index(), lines


def depth_accuracy(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy over seeds per (arch, train_loops, hops, eval_loops), from
    `depth_rows`."""
    return (rows.groupby(["arch", "train_loops", "hops", "eval_loops"], sort=True)["value"]
            .mean().rename("accuracy").reset_index())


def useful_loops(accuracy: pd.DataFrame, arch: str, train_loops: int) -> int | None:
    """The smallest K' ≤ K after which no further loop (up to K) raises the mean accuracy
    over depths by `USEFUL_GAIN`: the loop where the model trained at K stops improving.
    None when the model was evaluated at fewer than two K' ≤ K (a fixed-depth model, such
    as the depth-matched control, runs at its own depth only: nothing to compare)."""
    rows = accuracy[(accuracy["arch"] == arch) & (accuracy["train_loops"] == train_loops)
                    & (accuracy["eval_loops"] <= train_loops)]
    curve = rows.groupby("eval_loops")["accuracy"].mean().sort_index()
    if len(curve) < 2:
        return None
    best = curve.max()
    return int(curve[curve >= best - USEFUL_GAIN].index[0])


def end_updates(rel_update: pd.DataFrame) -> pd.Series:
    """Per loop, the median relative update over the run's last `END_FRACTION` of records.
    `rel_update` is a run's loop table (steps × loops)."""
    table = rel_update.dropna(how="all")
    tail = table.iloc[-max(1, int(np.ceil(len(table) * END_FRACTION))):]
    return tail.median()


def idle_from(rel_update: pd.DataFrame) -> int | None:
    """The first loop k ≥ 2 from which every loop's relative update is below `IDLE_UPDATE`
    at the end of training (`end_updates`); None when the last loop still moves the
    stream. `rel_update` is a run's loop table (steps × loops)."""
    values = end_updates(rel_update).to_numpy(dtype=float)
    if len(values) < 2 or not values[-1] < IDLE_UPDATE:
        return None
    first = len(values)
    while first > 2 and values[first - 2] < IDLE_UPDATE:
        first -= 1
    return first


@dataclass
class LoopStates:
    """What each cell's loops did by the end of training, from one read of every run's
    relative update: `updates` (arch, train_loops, loop, value) per run, and per cell
    (arch, K) `idle` (the latest idle loop over seeds; None unless every seed's loops go
    idle) and `stable` (every seed's verdict stable)."""

    updates: pd.DataFrame
    idle: dict[tuple[str, int], int | None]
    stable: dict[tuple[str, int], bool]


def loop_states(suite: SuiteData, table: pd.DataFrame) -> LoopStates:
    """`LoopStates` of the runs in `table` (a `suite_table` of `suite`)."""
    frames, idle, stable = [], {}, {}
    for (arch, n_loops), cell in table.groupby(["arch", "n_loops"], sort=False):
        starts = []
        for run_id in cell["run_id"]:
            updates = suite.runs[run_id].loop_table("rel_update").dropna(how="all")
            ends = end_updates(updates) if len(updates) else pd.Series(dtype=float)
            starts.append(idle_from(updates) if len(updates) else None)
            frames.append(pd.DataFrame({"arch": arch, "train_loops": n_loops,
                                        "loop": ends.index.to_numpy(dtype=np.int64),
                                        "value": ends.to_numpy(dtype=float)}))
        idle[(arch, n_loops)] = None if None in starts or not starts else max(starts)
        stable[(arch, n_loops)] = bool((cell["status"] == "stable").all())
    updates = (pd.concat(frames, ignore_index=True) if frames
               else pd.DataFrame(columns=["arch", "train_loops", "loop", "value"]))
    return LoopStates(updates, idle, stable)


def depth_findings(accuracy: pd.DataFrame, idle: dict[tuple[str, int], int | None],
                   stable: dict[tuple[str, int], bool]) -> list[str]:
    """One sentence per architecture at its largest trained K: where accuracy stops
    improving, where the loops go idle, and plainly when a stable model's loops do not
    compute. `idle` and `stable` are keyed by (arch, train_loops)."""
    lines = []
    for arch in dict.fromkeys(accuracy["arch"]):
        largest = int(accuracy.loc[accuracy["arch"] == arch, "train_loops"].max())
        if largest < 2:
            continue
        at_k = accuracy[(accuracy["arch"] == arch) & (accuracy["train_loops"] == largest)
                        & (accuracy["eval_loops"] == largest)]
        per_depth = ", ".join(f"{h} hop{'s' if h > 1 else ''} {a:.2f}"
                              for h, a in zip(at_k["hops"], at_k["accuracy"]))
        useful = useful_loops(accuracy, arch, largest)
        idle_loop = idle.get((arch, largest))
        line = f"{arch} trained at K={largest}: accuracy {per_depth}"
        if useful is not None:
            line += f"; accuracy stops improving after loop {useful}"
        line += ("; every loop still moves the stream by ≥ 1 %" if idle_loop is None
                 else f"; {loops_from(idle_loop, largest, 'move')} the stream by < 1 %"
                      + (" each" if idle_loop < largest else ""))
        if stable.get((arch, largest)) and useful is not None and useful < largest:
            line += (f". It is stable, but {loops_from(useful + 1, largest, 'add')} no accuracy: "
                     f"its loops beyond {useful} do not compute")
        lines.append(line + ".")
    return lines
