"""Failure to train: a run that ends far above what the model should reach.

With a known reference (`expected_loss`: the loss the same architecture reaches with one
loop in the same suite, or what the user expects) the judgement is made at the end of the
run, when the run and the reference have had the same training: its smoothed loss ≥ `gap`
above the reference. A reference under a tenth of the context-free loss (below) learned
nearly all the data holds; a run is then behind it from `gap` above that tenth on
(`behind_from`). On two-digit addition a one-loop model ended at 0.0056 nats and two- and
four-loop models that had solved the task too (validation loss ≤ 0.002) at 0.013–0.021:
2.4–3.7× the reference, each judged failed to train before. Mid-run the comparison is
unfair: a reference's final loss is below what any run has half-way through its schedule,
and a constant-then-decay schedule keeps a healthy run on a plateau until the decay (a
mid-run stall rule called healthy runs failed on the development runs, and on two of the
reference study's at lr 1e-2, which is why it went).

Without a reference, two rules. Online, llm-foundry's persistent-high-loss rule: from
twice its window on, half the window above the first window's maximum means the loss went
back above where it started. At the end, the mechanism the loss cannot show without a
reference: a step that moved the shared weights by `oversized_update` × their norm or more
(`update_size`'s threshold) threw away what they held, and the learning rate that did it
keeps the model above the loss it could reach. A converged loss looks the same at any
height, so without this rule such a run was judged stable.

With or without a reference, when the data's context-free loss is known (`context_free_loss`:
what predicting each token from the data's token frequencies alone reaches, the unigram
entropy of a text), a run that ended with its loss stalled within `context_free_margin`
(the labels' 10 %) of it, or above it, learned nothing a model needs its input for: the
collapse the FLT paper describes, a looped model that never gets past token statistics.
Every model passes through that plateau early, so only the end is judged, and not a run
still falling fast enough that one more stall window at its pace (`progress`, the stall
rule's fall over 20 records) would take it `context_free_margin` below that loss: a short run
on its way down is cut off by its budget, not stuck. A run falling more slowly is judged, its
event saying it still falls: one that needs several more windows to leave token statistics
has learned next to nothing in the steps it had. The horizon is the stall rule's own window,
nothing fitted; what prompted it were 8 runs that never trained and that any 2 % fall had
spared, at 0.91–1.03 of the context-free loss after 200–250 steps, falling 2–3 % per 20
records (`user-model-perl`, `-info`, `-go`, `-ramp` and the reference study, in-sample for
it); `user-model-stdlib` and `user-model-short` are its held-out check (docs/held-out.md).
Nor where the reference itself ended at that level, from the margin below to 2 % above
(`reference_at_token_frequencies`): the data then holds too little past its token
frequencies for the line to tell, and the gap to the reference judges alone.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from loopdiag.detect.base import (
    UNJUDGED, Detector, Finding, Unjudged, finite_scalar, loop_values, require,
)
from loopdiag.detect.columns import RecordColumns, codes, expand
from loopdiag.detect.symptoms import (
    COLLAPSED_DECORRELATION, MIN_PROGRESS, LossTrack, ReferenceLineConfig, behind_from,
    learned_past_token_frequencies, times,
)
from loopdiag.detect.update import OVERSIZED_UPDATE

# Records over which the end judgement reads whether the loss still falls: the stall rule's
# window, with its `MIN_PROGRESS`, reused as is. Against an expected loss it changes the
# message only; at the context-free line it spares a run that one more window takes past it.
LOSS_WINDOW = 20


@dataclass(frozen=True)
class FailedToTrainConfig(ReferenceLineConfig):
    cooldown: int = 20
    # 10 %: the gap the loss-only outcome labels use, and ground_truth_onset's.
    gap: float = 0.10
    high_loss_window: int = 100  # llm-foundry's minimum window, used without a reference
    # Without a reference: a step this large (‖ΔW‖ / ‖W‖) means the run failed to train.
    oversized_update: float = OVERSIZED_UPDATE

    def _validate(self) -> None:
        require(self.gap > 0, f"gap must be > 0, got {self.gap}")
        require(self.oversized_update > 0,
                f"oversized_update must be > 0, got {self.oversized_update}")
        require(self.high_loss_window >= 2,
                f"high_loss_window must be >= 2, got {self.high_loss_window}")


class FailedToTrain(Detector):
    """With `expected_loss`: critical when the run ended (`finish`) with its smoothed loss
    (EMA, span 20 records) ≥ `gap` above it. Without: critical when half of the last
    `high_loss_window` losses exceed the first window's maximum (after two windows), or
    at the end when a step's `update_ratio` reached `oversized_update`. With
    `context_free_loss`, in either case (unless the expected loss is not past that line
    either): critical at the end when the loss ended at or within `context_free_margin`
    below it, unless it was still falling fast enough to get past that margin in one more
    stall window."""

    name = "failed_to_train"
    reads = ("loss",)
    config_class = FailedToTrainConfig
    config: FailedToTrainConfig

    def _reset_state(self) -> None:
        self._loss = LossTrack(window=LOSS_WINDOW)
        self._first: list[float] = []
        self._recent: deque[float] = deque(maxlen=self.config.high_loss_window)
        self._records = 0
        self._oversized: tuple[int, float] | None = None  # (step, ratio) of the largest step
        # At the last record with a token correlation: every position one vector, so no
        # more steps take the loss below the token frequencies' (it changes the advice only).
        self._identical = False

    def _check(self, record: Mapping[str, Any]) -> Finding | None | Unjudged:
        self._note_update(finite_scalar(record, "update_ratio"), self._last_step)
        corr = loop_values(record, "token_corr")
        if corr is not None and math.isfinite(corr[-1]):
            self._identical = 1 - corr[-1] < COLLAPSED_DECORRELATION
        loss = self._loss.update(record)
        if loss is None:
            return UNJUDGED
        self._records += 1
        if self.config.expected_loss is not None:
            return None  # judged at the end (`_check_end`)
        return self._high_loss(loss)

    def _note_update(self, ratio: float | None, step: int) -> None:
        if (ratio is not None and ratio >= self.config.oversized_update
                and (self._oversized is None or ratio > self._oversized[1])):
            self._oversized = (step, ratio)

    def _high_loss(self, loss: float) -> Finding | None:
        window = self.config.high_loss_window
        if len(self._first) < window:
            self._first.append(loss)
            self._recent.append(loss)
            return None
        cap = max(self._first)
        self._recent.append(loss)
        if self._records <= 2 * window:
            return None
        return self._high(sum(value > cap for value in self._recent), cap)

    def _high(self, high: int, cap: float) -> Finding | None:
        window = self.config.high_loss_window
        if high < window / 2:
            return None
        return Finding("critical", (
            f"{high} of the last {window} losses are above {cap:.4g}, the highest loss of the "
            f"first {window} records: the model never got below where it started."),
            {"high_losses": high, "loss_cap": cap, "thresholds": self._thresholds()})

    def _judge_columns(self, columns: RecordColumns) -> tuple[np.ndarray, Callable[[int], Any]]:
        self._loss = columns.loss_track_at(len(columns) - 1, window=LOSS_WINDOW)  # what `finish` reads
        corr = columns.last_loop("token_corr")
        recorded = np.flatnonzero(np.isfinite(corr))
        self._identical = bool(len(recorded) and 1 - corr[recorded[-1]] < COLLAPSED_DECORRELATION)
        ratio = columns.finite("update_ratio")
        if np.any(ratio >= self.config.oversized_update):
            largest = int(np.nanargmax(ratio))
            self._note_update(float(ratio[largest]), columns.last_step(largest))
        loss = columns.finite("loss")
        judged = np.isfinite(loss)
        window = self.config.high_loss_window
        losses = loss[judged].tolist()
        if self.config.expected_loss is not None or len(losses) <= 2 * window:
            return codes(judged, np.zeros(len(loss), dtype=bool)), lambda index: None
        cap = max(losses[:window])
        above = np.cumsum(np.array(losses) > cap)
        high = np.zeros(len(losses), dtype=np.int64)
        high[window:] = above[window:] - above[:-window]  # over the last `window` losses
        positions = np.flatnonzero(judged)
        open_ = (np.arange(1, len(losses) + 1) > 2 * window) & ~(high < window / 2)
        order = {index: j for j, index in enumerate(positions.tolist())}
        return (codes(judged, expand(positions, open_, len(loss), False), certain=True),
                lambda index: self._high(int(high[order[index]]), cap))

    def _check_end(self) -> Finding | None:
        floor = self._context_free_end()
        if floor is not None:
            return floor
        expected, smoothed = self.config.expected_loss, self._loss.smoothed
        if expected is None:
            return self._oversized_end()
        above = self._above_expected(smoothed)
        if above is None:
            return None
        # A loss still falling at the end is a slow learner cut off by the budget, not a
        # stuck one: the verdict stands (the run did not reach it), the advice differs.
        fall = self._loss.progress()
        falling = fall is not None and fall >= MIN_PROGRESS
        still = ""
        if falling:
            still = (f" It was still falling ({100 * fall:.0f}% over its last {LOSS_WINDOW} "
                     f"records), " + ("but every position carries the same vector: no more steps "
                                      "take it below what token frequencies alone give."
                                      if self._identical else "and more steps may reach it."))
        return Finding("critical", (
            f"The run ended with its smoothed loss at {smoothed:.4g}, {above}.{still}"),
            {"smoothed_loss": smoothed, "expected_loss": expected, "still_falling": falling,
             "identical_positions": self._identical, "thresholds": self._thresholds()})

    def _above_expected(self, smoothed: float | None) -> str | None:
        """"N% above the X this model should reach" when the run ended behind its expected
        loss (`behind_from`); None short of that or without one."""
        expected = self.config.expected_loss
        if expected is None or smoothed is None or smoothed < behind_from(
                expected, self.config.context_free_loss, self.config.gap,
                self.config.context_free_margin):
            return None
        ratio = smoothed / expected
        above = f"{100 * (ratio - 1):.0f}% above" if ratio < 2 else times(ratio)
        return f"{above} the {expected:.4g} this model should reach"

    def _context_free_end(self) -> Finding | None:
        floor, smoothed = self.config.context_free_loss, self._loss.smoothed
        if (smoothed is None or floor is None or not self.config.context_free_line_holds
                or learned_past_token_frequencies(smoothed, floor, self.config.context_free_margin)):
            return None
        fall = self._loss.progress()
        if fall is None:
            return None  # too short to tell
        falling = fall >= MIN_PROGRESS
        line = (1 - self.config.context_free_margin) * floor
        if falling and self._loss.ahead(LOSS_WINDOW) < line:
            return None  # one more window at this pace gets it past: cut off by its budget
        where = ("above" if smoothed >= floor
                 else f"within {max(1, round(100 * (1 - smoothed / floor)))}% of")
        state = (f"still falling at {smoothed:.4g} ({100 * fall:.0f}% over its last {LOSS_WINDOW} "
                 f"records, too slowly to get under {line:.4g} in as many again)" if falling
                 else f"stalled at {smoothed:.4g}")
        above = self._above_expected(smoothed)
        return Finding("critical", (
            f"The run ended with its smoothed loss {state}, {where} "
            f"{floor:.4g}, what predicting each token from the data's token frequencies alone "
            f"reaches: it learned next to nothing that needs its input."
            f"{'' if above is None else f' It is {above}.'}"),
            {"smoothed_loss": smoothed, "context_free_loss": floor, "progress": fall,
             "expected_loss": self.config.expected_loss, "thresholds": self._thresholds()})

    def _oversized_end(self) -> Finding | None:
        if self._oversized is None:
            return None
        step, ratio = self._oversized
        ended = "" if self._loss.smoothed is None else f" at {self._loss.smoothed:.4g}"
        return Finding("critical", (
            f"At step {step} one step moved the shared weights by {ratio:.2g}× their norm: the "
            f"learning rate threw away what they held, and the run ended{ended} with no "
            f"expected loss to show it recovered (give one to judge by the loss)."),
            {"update_ratio": ratio, "update_step": step, "smoothed_loss": self._loss.smoothed,
             "thresholds": self._thresholds()})

    def _thresholds(self) -> dict[str, Any]:
        names = ("expected_loss", "gap", "high_loss_window", "oversized_update",
                 "context_free_loss", "context_free_margin")
        return {name: getattr(self.config, name) for name in names}
