"""The loss a run should reach: what the same architecture reaches with one loop.

A looped model trained at K loops on the same data and seed as its one-loop counterpart has
at least that model's capacity; ending far above it means the run failed to train, whether
the loops or the learning rate are to blame. The reference is the suite's finished one-loop
run of the architecture and seed at the gentlest learning rate it tried, no higher than the
run's own (the best of several at that rate; where a rate is unknown, the best of all;
neither interrupted nor diverged, `finished_final_loss`): `chosen_reference`. The gentlest
rate is the setting least at risk of its own instability, and the same bar for every rate
above it, so a run at a rate too high for the model is judged against the same model at a
gentle one, and a stability map compares every rate with one model. A run at a lower
learning rate is not held to what a higher one reaches in the same steps: it learns more
slowly, which no detector here is about (when the reference was the best one-loop run at any
rate, a sweep over lr 3e-3 and 1e-2 judged 18 of 81 healthy runs failed to train, the
one-loop models at 3e-3 among them, 14 % behind the same models at 1e-2). Nor is a run at a
fast rate held to the best one-loop run below it, which the reference was next: at lr 1e-1
it judged runs that ended within 10 % of the gentle model failed to train, or collapsed
where they had recovered from a collapse (43 healthy runs on two sweeps up to 1e-1; none
under this rule, nor on a third trained after it, where that one judged 25;
`docs/held-out.md`, "The gentlest rate"). A gentle rate too slow for the budget makes a weak
bar: a run ending ≥ 10 % behind a faster one-loop run but within 10 % of the slow one is
judged stable, and the report's findings name such rates; where the slow run stalled at the
token frequencies, the model's best known loss (below) says so. The choice reads no verdict
that a reference decides (an interrupted or diverged run is passed over; a collapsed one at
the gentlest rate is still what that rate gives), so references never depend on the order
runs are judged; a suite starts a run only once the runs it may take its reference from have
finished (`reference_candidate`). The loss is the EMA of the train loss at the last record
(`final_smoothed_loss`, recomputed from the records for runs judged before that field
existed).

Its records give the reference's loss curve, which a run that stopped learning at token
statistics is compared with step by step while it trains (`recorded_losses`).

A looped run is also told its model's best known loss: the best of the one-loop runs of its
architecture and seed at any learning rate (`best_known_run`). It is not held to that loss;
it tells whether the data holds more than its token frequencies where a slow reference
stalled at them (`ReferenceLineConfig.best_known_loss`), so a suite starts a looped run only
once those runs have finished too (`best_known_candidate`).

The loss no run should stall at is the data's context-free loss (what its token frequencies
alone give), which a run's config records under `data`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from loopdiag.detect.base import Ema, finite_scalar, is_int
from loopdiag.detect.verdict import ONSET_EMA_SPAN
from loopdiag.store._files import SUMMARY_FILE, read_manifest
from loopdiag.store.reader import read_records


def reference_candidate(candidate: Mapping[str, Any], cell: Mapping[str, Any]) -> bool:
    """Whether the run of cell `candidate` (`{"arch", "n_loops", "seed", "lr"}`) is one `cell`'s
    run may take its reference from: another one-loop run of its architecture and seed, at its
    learning rate or a lower one (either lr unknown: any)."""
    if candidate.get("n_loops") != 1 or candidate == cell:
        return False
    if any(candidate.get(key) != cell.get(key) for key in ("arch", "seed")):
        return False
    lr, own_lr = candidate.get("lr"), cell.get("lr")
    return lr is None or own_lr is None or lr <= own_lr * (1 + 1e-9)


def best_known_candidate(candidate: Mapping[str, Any], cell: Mapping[str, Any]) -> bool:
    """Whether the run of cell `candidate` tells what the model of `cell`, a run of more than
    one loop, reaches on this data in any setting (`best_known_run`): a one-loop run of its
    architecture and seed at any learning rate. Not for a one-loop run, whose reference is a
    one-loop run at a lower learning rate that would wait for it in turn."""
    return (cell.get("n_loops") != 1 and candidate.get("n_loops") == 1
            and all(candidate.get(key) == cell.get(key) for key in ("arch", "seed")))


def chosen_reference(candidates: Iterable[tuple[Mapping[str, Any], float, str]]) -> tuple[str, float] | None:
    """(run id, loss) of the reference among finished candidates ((cell, final smoothed loss,
    run id), each a `reference_candidate` of the same run): the best at the gentlest learning
    rate; the best of all where a candidate's rate is unknown or not a finite number (nothing
    to order by). None without candidates."""
    candidates = list(candidates)
    if not candidates:
        return None
    rates = [cell.get("lr") for cell, _, _ in candidates]
    if all(isinstance(lr, (int, float)) and math.isfinite(lr) for lr in rates):
        gentlest = min(rates)
        candidates = [c for c, lr in zip(candidates, rates) if math.isclose(lr, gentlest, rel_tol=1e-9)]
    return lowest(candidates)


def lowest(candidates: Iterable[tuple[Mapping[str, Any], float, str]]) -> tuple[str, float] | None:
    """(run id, loss) of the lowest final smoothed loss among (cell, loss, run id), ties to
    the first run id; None without candidates."""
    best = min(candidates, key=lambda c: (c[1], c[2]), default=None)
    return None if best is None else (best[2], best[1])


def reference_run(suite_dir: str | Path, cell: Mapping[str, Any]) -> tuple[str, float] | None:
    """(run id, final smoothed loss) of the reference in the suite at `suite_dir` (from its
    `suite.json`) of `cell`'s run: `chosen_reference` of its finished `reference_candidate`s;
    None when there is none (not run yet, or unfinished)."""
    return chosen_reference(_finished(Path(suite_dir), lambda candidate: reference_candidate(candidate, cell)))


def best_known_run(suite_dir: str | Path, cell: Mapping[str, Any]) -> tuple[str, float] | None:
    """(run id, final smoothed loss) of the best finished `best_known_candidate` of `cell` in
    the suite at `suite_dir`; None when there is none."""
    return lowest(_finished(Path(suite_dir), lambda candidate: best_known_candidate(candidate, cell)))


def reference_record(suite_dir: str | Path, cell: Mapping[str, Any]) -> dict[str, Any] | None:
    """What `cell`'s run is judged against, as its config and summary record it: the
    reference's `run` and `expected_loss` (`reference_run`), and, where a one-loop run at a
    higher learning rate got lower (`best_known_run`), that run as `best_known_run` and its
    loss as `best_known_loss`, which tells whether the data holds more than its token
    frequencies; None without a reference."""
    reference = reference_run(suite_dir, cell)
    if reference is None:
        return None
    record: dict[str, Any] = {"run": reference[0], "expected_loss": reference[1]}
    best = best_known_run(suite_dir, cell)
    if best is not None and best[1] < reference[1]:
        record.update(best_known_run=best[0], best_known_loss=best[1])
    return record


def _finished(suite_dir: Path, accepts: Callable[[Mapping[str, Any]], bool]
              ) -> list[tuple[Mapping[str, Any], float, str]]:
    """(cell, final smoothed loss, run id) of the suite's finished runs whose cell `accepts`."""
    try:
        manifest = read_manifest(suite_dir)
    except (FileNotFoundError, ValueError):
        return []
    finished = []
    for entry in manifest["runs"]:
        cell = entry.get("cell", {})
        if accepts(cell):
            loss = finished_final_loss(suite_dir / entry["run_id"])
            if loss is not None:
                finished.append((cell, loss, entry["run_id"]))
    return finished


def finished_final_loss(run_dir: Path) -> float | None:
    """The run's final smoothed loss when it finished with a finite one, else None. Not of
    an interrupted run, nor of a diverged one: its loss or gradient went non-finite, which
    no reference decides, and its last finite loss (a gentlest rate's run that blew up at
    step 5 ends near its first) is no bar."""
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("status") in (None, "interrupted", "diverged"):
        return None
    loss = summary.get("final_smoothed_loss")
    if loss is None:
        ema = Ema(ONSET_EMA_SPAN)
        for record in read_records(run_dir):
            value = record.get("loss")
            if isinstance(value, (int, float)) and math.isfinite(value):
                ema.update(value)
        loss = ema.value
    return float(loss) if loss is not None and math.isfinite(loss) and loss > 0 else None


def recorded_losses(run_dir: str | Path) -> tuple[tuple[int, float], ...] | None:
    """(step, train loss) of the run's records with an integer step and a finite loss, in
    step order as the store keeps them: a reference's loss curve (`behind_reference`).
    None when it has none."""
    losses = tuple((int(record["step"]), loss) for record in read_records(run_dir)
                   if is_int(record.get("step")) and (loss := finite_scalar(record, "loss")) is not None)
    return losses or None


def context_free_loss(config: Mapping[str, Any]) -> float | None:
    """The context-free loss a run's config records under `data`. For a run recorded before
    configs carried it, rebuilt where the data can be (and torch is installed): a synthetic
    task from its description, the embedded corpus when this interpreter's is the text the
    run trained on (same sha256). None otherwise."""
    data = config.get("data")
    if not isinstance(data, Mapping):
        return None
    recorded = data.get("context_free_loss")
    if isinstance(recorded, (int, float)) and not isinstance(recorded, bool):
        return float(recorded) if math.isfinite(recorded) and recorded > 0 else None
    try:
        from loopdiag.data import EMBEDDED_CORPUS, TASKS, task_from_description
    except ImportError:  # the torch-free install judges without it
        return None
    if data.get("task") in TASKS:
        return task_from_description(dict(data)).context_free_loss
    if data.get("source") == EMBEDDED_CORPUS and isinstance(data.get("sha256"), str):
        return _embedded_context_free_loss(data["sha256"])
    return None


@functools.cache
def _embedded_context_free_loss(sha256: str) -> float | None:
    # Once per process: a suite's runs all replay against the same text.
    from loopdiag.data import embedded_corpus_bytes, load_corpus

    if hashlib.sha256(embedded_corpus_bytes()).hexdigest() != sha256:
        return None
    return load_corpus().context_free_loss
