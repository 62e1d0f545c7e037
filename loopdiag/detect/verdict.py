"""The end-of-run verdict, and the operational collapse onset detectors are scored against."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from loopdiag.detect.base import Ema, Event, is_int, plain, raw_scalar
from loopdiag.detect.loss import NonFinite

STATUSES = ("stable", "collapsed", "diverged", "interrupted")
ONSET_EMA_SPAN = 20
ONSET_GAP = 0.10


def verdict(records: Sequence[Mapping[str, Any]], events: Iterable[Event | Mapping[str, Any]],
            *, finished: bool) -> dict[str, Any]:
    """Judge a run from its records and the events its detectors fired.

    Rule, first match wins:
    - "diverged": a non-finite loss in the records, or a `non_finite` critical event;
    - "collapsed": a critical event from any other detector (every shipped detector that
      can go critical — residual explosion, slow divergence, collapse plateau — is a
      collapse detector);
    - "interrupted": no critical event and `finished` is False (the run did not end);
    - "stable": otherwise.
    A run stopped because it collapsed is "collapsed", not "interrupted": the failure is
    the finding. `step`, `signal` and `evidence` describe the earliest failure signal (the
    first critical event, or the first non-finite loss if that came first), so a run that
    collapsed and later diverged reports where it first failed; all three are None for
    stable and interrupted runs. `first_warning_step` is the first warn or critical event.
    """
    fired = sorted((e.to_dict() if isinstance(e, Event) else dict(e) for e in events),
                   key=lambda e: e["step"])
    critical = [e for e in fired if e.get("severity") == "critical"]
    losses = [(record["step"], raw_scalar(record, "loss")) for record in records
              if is_int(record.get("step"))]
    losses = [(step, loss) for step, loss in losses if loss is not None]
    non_finite = next(((step, loss) for step, loss in losses if not math.isfinite(loss)), None)

    failure = critical[0] if critical else None
    if non_finite is not None and (failure is None or non_finite[0] < failure["step"]):
        failure = {"step": non_finite[0], "detector": NonFinite.name,
                   "evidence": {"loss": non_finite[1]}}
    if non_finite is not None or any(e["detector"] == NonFinite.name for e in critical):
        status = "diverged"
    elif critical:
        status = "collapsed"
    else:
        status = "stable" if finished else "interrupted"

    finite = [loss for _, loss in losses if math.isfinite(loss)]
    warned = [e["step"] for e in fired if e.get("severity") in ("warn", "critical")]
    return {
        "status": status,
        "step": failure["step"] if failure else None,
        "signal": failure["detector"] if failure else None,
        "evidence": plain(failure["evidence"]) if failure else None,
        "first_warning_step": warned[0] if warned else None,
        "final_loss": losses[-1][1] if losses else None,
        "best_loss": min(finite) if finite else None,
    }


def ground_truth_onset(losses: Sequence[float], steps: Sequence[int], *,
                       ema_span: int = ONSET_EMA_SPAN, gap: float = ONSET_GAP) -> int | None:
    """The step a run visibly failed, for scoring detectors; None for a healthy run.

    Smooth the loss with an EMA (pandas `span` convention, default 20 records, started at
    the first finite value; non-finite losses leave it unchanged). A record is failed
    when its loss is non-finite or the EMA is ≥ (1 + `gap`) × the best EMA so far
    (default 10 %). The onset is the step of the first record from which every record to
    the end is failed: a transient spike that recovers has no onset, and a run that ends
    non-finite has one at the latest where its non-finite tail begins. The span smooths
    tiny-batch noise (the EMA keeps noise / √span: 1 % of 5 % noise, ten times under the
    gap) without hiding a real rise for long (half-life ≈ 7 records).
    """
    losses = np.asarray(losses, dtype=float)
    steps = list(steps)
    if len(losses) != len(steps):
        raise ValueError(f"losses and steps differ in length: {len(losses)} != {len(steps)}")
    if ema_span < 1 or not gap > 0:
        raise ValueError(f"need ema_span >= 1 and gap > 0, got {ema_span}, {gap}")
    ema, best = Ema(ema_span), math.inf
    failed = np.zeros(len(losses), dtype=bool)
    for index, loss in enumerate(losses):
        if not math.isfinite(loss):
            failed[index] = True
            continue
        smoothed = ema.update(loss)
        best = min(best, smoothed)
        failed[index] = smoothed - best >= gap * abs(best)
    if not len(failed) or not failed[-1]:
        return None
    healthy = np.flatnonzero(~failed)
    return int(steps[healthy[-1] + 1 if len(healthy) else 0])
