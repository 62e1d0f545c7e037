"""The end-of-run verdict, and the operational collapse onset detectors are scored against."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from loopdiag.detect.base import Ema, Event, is_int, plain, raw_scalar
from loopdiag.detect.failure import FailedToTrain
from loopdiag.detect.loss import NonFinite
from loopdiag.detect.registry import DETECTORS

# Every shipped detector that can go critical, bar non_finite and failed_to_train, is a
# collapse detector with a mechanism.
DETECTOR_MECHANISMS = {name: cls.mechanism for name, cls in DETECTORS.items() if cls.mechanism}

STATUSES = ("stable", "collapsed", "recovered", "diverged", "failed_to_train", "interrupted")
FAILED_STATUSES = ("collapsed", "diverged", "failed_to_train")
# Verdicts few suites have: legends and per-cell counts name them only where a run has them.
RARE_STATUSES = ("recovered", "interrupted")
MECHANISMS = ("representation", "gradient", "residual", "plateau", "loss")
ONSET_EMA_SPAN = 20
ONSET_GAP = 0.10


def verdict(records: Sequence[Mapping[str, Any]], events: Iterable[Event | Mapping[str, Any]],
            *, finished: bool, context_free_loss: float | None = None) -> dict[str, Any]:
    """Judge a run from its records and the events its detectors fired.

    Rule, first match wins:
    - "diverged": a non-finite loss in the records, or a `non_finite` critical event;
    - "recovered": a critical event from a collapse detector, and then the run trained out
      of it: it finished with its smoothed loss ≥ `ONSET_GAP` below the data's
      `context_free_loss` (what identical positions, or a model that ignores its context,
      cannot beat) and less than `ONSET_GAP` above its best, and no `failed_to_train`
      critical event (with a reference: it reached the loss it should);
    - "collapsed": a critical event from a collapse detector, whose mechanism
      (`MECHANISMS`: representation, gradient, residual, plateau, loss) the verdict names;
    - "failed_to_train": a critical `failed_to_train` event (a loss that ended far above
      what the model should reach, stalled at what the data's token frequencies alone
      give, or went back above where it started; without a reference, a step that
      rewrote the weights) and no collapse;
    - "interrupted": no critical event and `finished` is False (the run did not end);
    - "stable": otherwise.
    A run stopped because it collapsed is "collapsed", not "interrupted": the failure is
    the finding. `step`, `signal`, `mechanism` and `evidence` describe the earliest failure
    signal of the chosen kind (the first critical event, or the first non-finite loss if
    that came first), so a run that collapsed and later diverged reports where it first
    failed, and a recovered one the collapse it recovered from; they are None for stable
    and interrupted runs. `first_warning_step` is the
    first warn or critical event, `last_loss` the last logged loss, `final_smoothed_loss`
    the loss's EMA (span 20 records, as `ground_truth_onset` smooths it) at the last record.
    """
    fired = sorted((e.to_dict() if isinstance(e, Event) else dict(e) for e in events),
                   key=lambda e: e["step"])
    critical = [e for e in fired if e.get("severity") == "critical"]
    collapses = [e for e in critical if e.get("detector") not in (NonFinite.name, FailedToTrain.name)]
    losses = [(record["step"], raw_scalar(record, "loss")) for record in records
              if is_int(record.get("step"))]
    losses = [(step, loss) for step, loss in losses if loss is not None]
    non_finite = next(((step, loss) for step, loss in losses if not math.isfinite(loss)), None)
    finite = [loss for _, loss in losses if math.isfinite(loss)]
    final_smoothed, best = smoothed_ends(finite)
    # A recovery, added after the recipe corpus's `looped-k04-lr3e-3-s39` (critical at step 73,
    # ended 5 % above `standard`); the warmup corpus was held out for it.
    trained_past = finished and trained_out(final_smoothed, best, context_free_loss)

    failure = critical[0] if critical else None
    if non_finite is not None and (failure is None or non_finite[0] < failure["step"]):
        failure = {"step": non_finite[0], "detector": NonFinite.name,
                   "evidence": {"loss": non_finite[1]}}
    if non_finite is not None or any(e["detector"] == NonFinite.name for e in critical):
        status = "diverged"
    elif collapses and trained_past and not any(e["detector"] == FailedToTrain.name for e in critical):
        status, failure = "recovered", collapses[0]
    elif collapses:
        status, failure = "collapsed", collapses[0]
    elif critical:
        status = "failed_to_train"
    else:
        status = "stable" if finished else "interrupted"

    warned = [e["step"] for e in fired if e.get("severity") in ("warn", "critical")]
    return {
        "status": status,
        "mechanism": (DETECTOR_MECHANISMS.get(failure["detector"])
                      if status in ("collapsed", "recovered") else None),
        "step": failure["step"] if failure else None,
        "signal": failure["detector"] if failure else None,
        "evidence": plain(failure["evidence"]) if failure else None,
        "message": failure.get("message") if failure else None,
        "first_warning_step": warned[0] if warned else None,
        "last_loss": losses[-1][1] if losses else None,
        "final_smoothed_loss": final_smoothed,
        "best_loss": min(finite) if finite else None,
    }


def smoothed_ends(losses: Iterable[float]) -> tuple[float | None, float]:
    """The loss's EMA (span `ONSET_EMA_SPAN` records) at the last finite loss, and its lowest;
    (None, inf) without a finite loss."""
    ema, best = Ema(ONSET_EMA_SPAN), math.inf
    for loss in losses:
        if math.isfinite(loss):
            best = min(best, ema.update(loss))
    return ema.value, best


def trained_out(final_smoothed: float | None, best_smoothed: float,
                context_free_loss: float | None) -> bool:
    """A run that trained out of a collapse: its smoothed loss ended ≥ `ONSET_GAP` below the
    data's context-free loss (what identical positions cannot beat) and less than `ONSET_GAP`
    above its best."""
    return (context_free_loss is not None and final_smoothed is not None
            and final_smoothed <= (1 - ONSET_GAP) * context_free_loss
            and final_smoothed - best_smoothed < ONSET_GAP * best_smoothed)


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
