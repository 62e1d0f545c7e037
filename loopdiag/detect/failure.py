"""Failure to train: a run that ends far above what the model should reach.

With a known reference (`expected_loss`: the loss the same architecture reaches with one
loop in the same suite, or what the user expects) the judgement is made at the end of the
run, when the run and the reference have had the same training: its smoothed loss ≥ `gap`
above the reference. Mid-run the comparison is unfair: a reference's final loss is below
what any run has half-way through its schedule, and a constant-then-decay schedule keeps a
healthy run on a plateau until the decay (a mid-run stall rule called healthy runs failed on
the development runs, and on two of the reference study's at lr 1e-2, which is why it went). Without a reference, llm-foundry's
persistent-high-loss rule judges online: from twice its window on, half the window above
the first window's maximum means the loss went back above where it started.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from loopdiag.detect.base import UNJUDGED, Detector, DetectorConfig, Finding, Unjudged, require
from loopdiag.detect.columns import RecordColumns, codes, expand
from loopdiag.detect.symptoms import LossTrack, validate_expected_loss


@dataclass(frozen=True)
class FailedToTrainConfig(DetectorConfig):
    cooldown: int = 20
    expected_loss: float | None = None
    # 10 %: the gap the loss-only outcome labels use, and ground_truth_onset's.
    gap: float = 0.10
    high_loss_window: int = 100  # llm-foundry's minimum window, used without a reference

    def _validate(self) -> None:
        validate_expected_loss(self.expected_loss)
        require(self.gap > 0, f"gap must be > 0, got {self.gap}")
        require(self.high_loss_window >= 2,
                f"high_loss_window must be >= 2, got {self.high_loss_window}")


class FailedToTrain(Detector):
    """With `expected_loss`: critical when the run ended (`finish`) with its smoothed loss
    (EMA, span 20 records) ≥ `gap` above it. Without: critical when half of the last
    `high_loss_window` losses exceed the first window's maximum (after two windows)."""

    name = "failed_to_train"
    config_class = FailedToTrainConfig
    config: FailedToTrainConfig

    def _reset_state(self) -> None:
        self._loss = LossTrack()
        self._first_window_max: float | None = None
        self._first: list[float] = []
        self._recent: deque[float] = deque(maxlen=self.config.high_loss_window)
        self._records = 0

    def _check(self, record: Mapping[str, Any]) -> Finding | None | Unjudged:
        loss = self._loss.update(record)
        if loss is None:
            return UNJUDGED
        self._records += 1
        if self.config.expected_loss is not None:
            return None  # judged at the end (`_check_end`)
        return self._high_loss(loss)

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
        self._loss = columns.loss_track_at(len(columns) - 1, window=20)  # what `finish` reads
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
        expected, smoothed = self.config.expected_loss, self._loss.smoothed
        if expected is None or smoothed is None or smoothed < (1 + self.config.gap) * expected:
            return None
        return Finding("critical", (
            f"The run ended with its smoothed loss at {smoothed:.4g}, "
            f"{100 * (smoothed / expected - 1):.0f}% above the {expected:.4g} this model "
            f"should reach."),
            {"smoothed_loss": smoothed, "expected_loss": expected,
             "thresholds": self._thresholds()})

    def _thresholds(self) -> dict[str, Any]:
        names = ("expected_loss", "gap", "high_loss_window")
        return {"thresholds": {name: getattr(self.config, name) for name in names}}
