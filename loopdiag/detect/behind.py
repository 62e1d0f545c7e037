"""A run stuck at token statistics while its reference, at the same step, had left them.

`failed_to_train` judges a run against its reference's final loss only at the end: mid-run,
a final loss is a target no run has reached yet. The reference's loss curve is a fair
target at every step: the same data, schedule and number of steps seen. A suite trains the
one-loop reference first, so its curve is known while the looped run trains.

Being behind the curve is not enough: on a constant-then-decay schedule a healthy looped
run can sit 10 % behind its reference on the plateau and close the gap in the decay. What
this detector reads is the collapse the FLT paper describes: a loss that has stopped
falling at the data's context-free loss (within its margin: the model predicts from token
frequencies alone), while the reference's loss at the same step is below that line and the
run's is the labels' gap above it. Every model passes through the context-free plateau early, and
a looped one may leave it later than its one-loop reference (on two-digit addition, a
plateau of hundreds of steps, up to 1.75× as late in the development runs): the run is held
to it only once it has spent `patience` times as long there as the reference did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loopdiag.detect.base import UNJUDGED, Detector, Ema, Finding, Unjudged, is_int, require
from loopdiag.detect.columns import UNJUDGED_CODE, RecordColumns, codes, expand
from loopdiag.detect.symptoms import (
    EMA_SPAN, MIN_PROGRESS, LossTrack, SolvedLineConfig, learned_past_token_frequencies, times,
)


@dataclass(frozen=True)
class BehindReferenceConfig(SolvedLineConfig):
    cooldown: int = 20
    # (step, train loss) of the reference run's records: the same model with one loop in a
    # suite. Without it, without `context_free_loss`, or when the reference never got below
    # the line drawn from that loss, the detector judges nothing.
    reference_losses: tuple[tuple[int, float], ...] | None = field(default=None, repr=False)
    gap: float = 0.10  # the labels' gap, as `failed_to_train`'s
    window: int = 20  # records over which a stall is read (`MIN_PROGRESS` over them)
    # Judged from this many times the step at which the reference left token statistics:
    # looped runs that solved two-digit addition left its plateau up to 1.75× as late as
    # their one-loop reference (the development runs, `probes/addition-references.toml`).
    patience: float = 2.0

    def _validate(self) -> None:
        require(self.gap > 0, f"gap must be > 0, got {self.gap}")
        require(self.window >= 2, f"window must be >= 2, got {self.window}")
        require(self.patience >= 1, f"patience must be >= 1, got {self.patience}")
        if self.reference_losses is not None:
            object.__setattr__(self, "reference_losses", checked_losses(self.reference_losses))


def checked_losses(losses: Any) -> tuple[tuple[int, float], ...]:
    """`losses` as (step, loss) pairs; ValueError unless they are pairs of an integer step
    (increasing) and a finite loss, at least one of them."""
    require(isinstance(losses, Sequence) and not isinstance(losses, (str, bytes)),
            f"reference_losses must be a sequence of (step, loss) pairs, got {type(losses).__name__}")
    pairs = []
    for pair in losses:
        require(isinstance(pair, Sequence) and not isinstance(pair, (str, bytes)) and len(pair) == 2
                and is_int(pair[0]) and isinstance(pair[1], (int, float))
                and not isinstance(pair[1], bool) and math.isfinite(pair[1]),
                f"reference_losses must hold (step, finite loss) pairs, got {pair!r}")
        pairs.append((int(pair[0]), float(pair[1])))
    require(bool(pairs), "reference_losses is empty")
    steps = [step for step, _ in pairs]
    require(all(a < b for a, b in zip(steps, steps[1:])),
            "reference_losses' steps must increase")
    return tuple(pairs)


class BehindReference(Detector):
    """Warn when the smoothed loss (EMA, span 20 records) has stalled (< 2 % better over
    `window` records, `LossTrack.progress`) within `context_free_margin` of the context-free
    loss or above it, while the reference's smoothed loss at the latest of its steps up to
    this one is below that line and the run's is ≥ `gap` above it, from `patience` × the first
    step at which the reference's was below that line."""

    name = "behind_reference"
    config_class = BehindReferenceConfig
    config: BehindReferenceConfig
    reads = ("loss",)

    def _reset_state(self) -> None:
        self._loss = LossTrack(window=self.config.window)
        self._steps, self._smoothed = reference_curve(self.config.reference_losses)
        # The first step at which the reference had learned past token statistics.
        left = np.flatnonzero(np.asarray(learned_past_token_frequencies(
            self._smoothed, self.config.context_free_loss, self.config.context_free_margin)))
        self._left_at = int(self._steps[left[0]]) if len(left) else None

    @property
    def _active(self) -> bool:
        return self._left_at is not None

    @property
    def _judged_from(self) -> float:
        return self.config.patience * self._left_at

    def _check(self, record: Mapping[str, Any]) -> Finding | None | Unjudged:
        if not self._active:
            return UNJUDGED
        if self._loss.update(record) is None:
            return UNJUDGED
        return self._finding(self._loss, self._last_step)

    def _finding(self, track: LossTrack, step: int) -> Finding | None:
        smoothed, at = track.smoothed, int(np.searchsorted(self._steps, step, side="right")) - 1
        if (smoothed is None or at < 0 or step < self._judged_from
                or not self._behind(smoothed, self._smoothed[at])):
            return None
        progress = track.progress()
        if progress is None or progress >= MIN_PROGRESS:
            return None
        floor, reference = self.config.context_free_loss, float(self._smoothed[at])
        where = ("above" if smoothed >= floor
                 else f"within {max(1, round(100 * (1 - smoothed / floor)))}% of")
        return Finding("warn", (
            f"The loss has stopped falling at {smoothed:.4g} (smoothed; "
            f"{100 * abs(progress):.1f}% {'lower' if progress >= 0 else 'higher'} than "
            f"{self.config.window} records ago on its trend line), {where} "
            f"{floor:.4g}, what the data's token "
            f"frequencies alone give, while its reference was at {reference:.4g} by step "
            f"{int(self._steps[at])}, {100 * (1 - reference / smoothed):.0f}% lower: the "
            f"reference learned past token statistics by step {self._left_at}, and this run "
            f"has not in {times(step / self._left_at)} as many steps."),
            {"smoothed_loss": smoothed, "reference_loss": reference,
             "reference_step": int(self._steps[at]), "reference_left_at": self._left_at,
             "progress": progress,
             "thresholds": {"gap": self.config.gap, "window": self.config.window,
                            "patience": self.config.patience,
                            "min_progress": MIN_PROGRESS,
                            "context_free_loss": floor,
                            "context_free_margin": self.config.context_free_margin}})

    def _behind(self, smoothed: Any, reference: Any) -> Any:
        """Where the run has not learned past token statistics, its reference has, and the
        run is `gap` or more above it (floats or arrays)."""
        floor, margin = self.config.context_free_loss, self.config.context_free_margin
        return (~np.asarray(learned_past_token_frequencies(smoothed, floor, margin))
                & np.asarray(learned_past_token_frequencies(reference, floor, margin))
                & (smoothed >= (1 + self.config.gap) * reference))

    def _judge_columns(self, columns: RecordColumns
                       ) -> tuple[np.ndarray, Callable[[int], Finding | None | Unjudged]]:
        count = len(columns)
        if not self._active:
            return np.full(count, UNJUDGED_CODE, dtype=np.int8), lambda index: UNJUDGED
        history = columns.loss_history(EMA_SPAN)
        positions = history.positions
        steps, integer = columns.int_steps()
        # `last_step`: a record whose step is not an integer counts as its position
        steps = np.where(integer, steps, np.arange(1, count + 1))[positions]
        at = np.searchsorted(self._steps, steps, side="right") - 1
        smoothed = np.array(history.smoothed)
        reference = self._smoothed[np.maximum(at, 0)]
        flagged = (at >= 0) & (steps >= self._judged_from) & self._behind(smoothed, reference)
        judged = np.isfinite(columns.finite("loss"))
        return (codes(judged, expand(positions, flagged, count, False)),
                lambda index: self._finding(columns.loss_track_at(index, self.config.window),
                                            columns.last_step(index)))


def reference_curve(losses: tuple[tuple[int, float], ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """(steps, smoothed losses) of a reference: the EMA a run's own loss is smoothed with."""
    if not losses:
        return np.empty(0, dtype=np.int64), np.empty(0)
    ema = Ema(EMA_SPAN)
    return (np.array([step for step, _ in losses], dtype=np.int64),
            np.array([ema.update(loss) for _, loss in losses]))
