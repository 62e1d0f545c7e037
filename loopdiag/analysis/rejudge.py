"""Judge a stored suite again with today's detectors: replay them over every run's records
and rewrite its verdict and events, as training would have written them. Nothing about the
training changes, so replaying is enough when only the detectors did.

Each run is judged against its reference (`reference_record`): the final loss of the one-loop
run of its architecture and seed at the suite's gentlest learning rate no higher than its own,
that run's loss curve,
and a looped run's best known loss (the one-loop runs at any learning rate), which
replaying does not change, so the order runs are judged in does not matter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loopdiag.detect import Event, default_detectors, replay, verdict
from loopdiag.detect.base import blind_detectors
from loopdiag.store import is_run_dir, read_records
from loopdiag.store._files import (
    CONFIG_FILE,
    EVENTS_FILE,
    SUITE_FILE,
    SUMMARY_FILE,
    read_json_object,
    read_manifest,
    replace_atomically,
    write_json_atomic,
)
from loopdiag.store.reference import context_free_loss, recorded_losses, reference_record


def rejudge_suite(suite_dir: str | Path,
                  on_run: Callable[[str, str | None, str], None] | None = None) -> dict[str, str]:
    """Rejudge every run of the suite in `suite_dir` that has records and a summary; the new
    status by run id. `on_run(run_id, old_status, new_status)` follows each. Interrupted
    runs stay interrupted (the end-of-run judgements need an end)."""
    suite_dir = Path(suite_dir)
    try:
        manifest = read_manifest(suite_dir)
    except FileNotFoundError:
        raise FileNotFoundError(f"{suite_dir} is not a suite folder: it has no {SUITE_FILE}") from None
    statuses = {}
    for entry in manifest.get("runs", []):
        run_dir = suite_dir / entry["run_id"]
        if not is_run_dir(run_dir) or not (run_dir / SUMMARY_FILE).is_file():
            continue
        old, new = rejudge_run(run_dir, entry.get("cell", {}))
        if new is None:
            continue
        statuses[entry["run_id"]] = new["status"]
        if on_run is not None:
            on_run(entry["run_id"], old.get("status"), new["status"])
    return statuses


def rejudge_run(run_dir: Path, cell: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(old summary, new summary) of one run, the new one written with its events; None as
    the new one when the run has no records to replay."""
    old = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    records = read_records(run_dir)
    if not records:
        return old, None
    config = read_json_object(run_dir / CONFIG_FILE)
    thresholds = config.get("detectors") if isinstance(config.get("detectors"), dict) else {}
    reference = reference_record(run_dir.parent, cell)
    finished = old.get("status") != "interrupted"
    events, judged = judge(records, thresholds, None if reference is None else reference["expected_loss"],
                           finished=finished, context_free_loss=context_free_loss(config),
                           reference_losses=(None if reference is None
                                             else recorded_losses(run_dir.parent / reference["run"])),
                           best_known_loss=None if reference is None else reference.get("best_known_loss"))
    if not finished:  # the stored summary's word: the run was stopped before its end
        judged["status"] = "interrupted"
    new = {**old, **judged, "reference": reference, "rejudged_from": old.get("status")}
    replace_atomically(run_dir / EVENTS_FILE,
                       "".join(json.dumps(event.to_dict()) + "\n" for event in events))
    write_json_atomic(run_dir / SUMMARY_FILE, new)
    return old, new


def judge(records: list[dict[str, Any]], thresholds: dict[str, Any], expected_loss: float | None,
          *, finished: bool, context_free_loss: float | None = None,
          reference_losses: Sequence[tuple[int, float]] | None = None,
          best_known_loss: float | None = None) -> tuple[list[Event], dict[str, Any]]:
    """(events, verdict) of the default detectors (with `thresholds`, `expected_loss`,
    `context_free_loss`, `reference_losses` and `best_known_loss`) replayed over `records`;
    the verdict carries `not_judged`. An unfinished run keeps a failure found before its
    end, else reads as interrupted."""
    detectors = default_detectors(expected_loss, context_free_loss=context_free_loss,
                                  reference_losses=reference_losses, best_known_loss=best_known_loss,
                                  **thresholds)
    events = replay(records, detectors, finished=finished)
    judged = verdict(records, events, finished=finished, context_free_loss=context_free_loss)
    judged["not_judged"] = sorted(blind_detectors(detectors, {key for record in records for key in record}))
    return events, judged
