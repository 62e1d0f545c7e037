"""Gradient oscillation of the shared weights: the optimiser bouncing across a valley.

Oscillation is the FLT paper's second cause of a looped collapse, but it hurts only when the
bouncing stops the descent: gradients that alternate while the loss still falls are
information, the same gradients while the loss has stalled or risen are a warning."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from loopdiag.detect.base import (
    UNJUDGED,
    Detector,
    Finding,
    Unjudged,
    finite_scalar,
    require,
    window_span,
)
from loopdiag.detect.columns import RecordColumns, codes, judged_streaks, near, trailing_means
from loopdiag.detect.symptoms import (
    SolvedLineConfig,
    Symptoms,
    solved_line,
)


@dataclass(frozen=True)
class GradientOscillationConfig(SolvedLineConfig):
    warmup: int = 20  # the first steps' statistics are NaN or dominated by initialisation
    cooldown: int = 20
    window: int = 8  # records each statistic is averaged over
    patience: int = 5  # consecutive records the averaged statistic must stay past threshold
    # Consecutive minibatch gradients of a healthy run are mostly positively aligned (a tiny
    # healthy run: cos ≈ 0.1–0.4, single steps down to ≈ −0.4); a mean of −0.5 over a
    # window means each step largely undoes the last.
    cos_threshold: float = -0.5
    # Increments of a white-noise norm series have lag-1 autocorrelation −0.5, so −0.5 is
    # where a healthy noisy run sits; a period-2 oscillation of amplitude a over noise σ
    # gives −(4a² + σ²)/(4a² + 2σ²): −0.83 at a = σ, −0.85 at a = 1.1σ, → −1 as it grows.
    # The threshold is set by that null: over the recorder's 32-step window, logged every
    # step, the 8-record mean of white noise sits at −0.47 ± 0.12, and 5 records in a row at
    # or below −0.8 happen 0.28 times per 10k records (a quarter of the whole false-warning
    # budget, 1 per 10k), at or below −0.85 0.005 times (2M simulated records). A shorter
    # recorder window is noisier: lower it there.
    autocorr_threshold: float = -0.85
    # The loss symptom that makes oscillation a warning (see `Symptoms`): the smoothed loss
    # ≥ `gap` above its best, or < `min_progress` better over
    # `stall_window` records (the stall rule of `residual_blowup` and
    # `representation_collapse`).
    gap: float = 0.10
    min_progress: float = 0.02
    stall_window: int = 20

    def _validate(self) -> None:
        require(self.gap > 0 and self.min_progress > 0,
                f"gap and min_progress must be > 0, got {self.gap}, {self.min_progress}")
        require(self.stall_window >= 1, f"stall_window must be >= 1, got {self.stall_window}")
        require(self.window >= 1, f"window must be >= 1, got {self.window}")
        require(self.patience >= 1, f"patience must be >= 1, got {self.patience}")
        require(-1 <= self.cos_threshold < 0,
                f"cos_threshold must be in [-1, 0), got {self.cos_threshold}")
        require(-1 <= self.autocorr_threshold < -0.5,
                f"autocorr_threshold must be in [-1, -0.5) (white noise sits at -0.5), "
                f"got {self.autocorr_threshold}")


class GradientOscillation(Detector):
    """Oscillating shared-weight gradients, sustained.

    Rolling means over `window` records of `grad_cos` (cosine between consecutive steps'
    gradients) and `gnorm_autocorr` (lag-1 autocorrelation of the shared-grad-norm
    increments); warn when either is at or below its threshold for `patience` records in
    a row: warn when the loss has stalled or risen (`Symptoms`), info while it still falls
    (or too early to tell). `sign_flip` and `gnorm_cv` ride along as evidence. Oscillation
    precedes many collapses but does not prove one, so it never goes critical.
    """

    name = "gradient_oscillation"
    reads = ("grad_cos", "gnorm_autocorr")  # either one is judged
    config_class = GradientOscillationConfig
    config: GradientOscillationConfig

    def _reset_state(self) -> None:
        self._cos: deque[tuple[int, float]] = deque(maxlen=self.config.window)
        self._autocorr: deque[tuple[int, float]] = deque(maxlen=self.config.window)
        self._streak = 0
        self._symptoms = Symptoms(self.config.gap, self.config.min_progress, self.config.stall_window,
                                  floor=solved_line(self.config))

    def _check(self, record: Mapping[str, Any]) -> Finding | None | Unjudged:
        self._symptoms.update(record)
        step = record.get("step")
        cos = finite_scalar(record, "grad_cos")
        autocorr = finite_scalar(record, "gnorm_autocorr")
        if cos is None and autocorr is None:
            return UNJUDGED
        if cos is not None:
            self._cos.append((step, cos))
        if autocorr is not None:
            self._autocorr.append((step, autocorr))
        mean_cos = self._full_mean(self._cos)
        mean_autocorr = self._full_mean(self._autocorr)
        if mean_cos is None and mean_autocorr is None:
            return UNJUDGED
        cos_low = mean_cos is not None and mean_cos <= self.config.cos_threshold
        autocorr_low = (mean_autocorr is not None
                        and mean_autocorr <= self.config.autocorr_threshold)
        self._streak = self._streak + 1 if cos_low or autocorr_low else 0
        if self._streak < self.config.patience:
            return None
        return self._oscillation(record, mean_cos, mean_autocorr, cos_low, autocorr_low)

    def _oscillation(self, record: Mapping[str, Any], mean_cos: float | None,
                     mean_autocorr: float | None, cos_low: bool, autocorr_low: bool) -> Finding:
        parts = []
        if cos_low:
            parts.append(f"mean cosine between consecutive gradients {mean_cos:.2f} "
                         f"(threshold {self.config.cos_threshold:.2f})")
        if autocorr_low:
            parts.append(f"mean lag-1 autocorrelation of grad-norm increments "
                         f"{mean_autocorr:.2f} (threshold {self.config.autocorr_threshold:.2f})")
        source = self._cos if cos_low else self._autocorr
        message = (f"Gradients oscillate: {' and '.join(parts)} over the last "
                   f"{self.config.window} records, for {self._streak} records in a row")
        symptom = self._symptoms.current(representation=False)
        if symptom is None and self._symptoms.stalled():
            symptom = f"the loss stopped falling (median {self._symptoms.loss.current_median():.4g})"
        severity = "warn" if symptom is not None else "info"
        if symptom is not None:
            message += f", and {symptom}."
        elif self._symptoms.loss.progress() is None:
            message += ", too early to tell whether the loss has stalled."
        else:
            message += ", while the loss still falls."
        return Finding(severity, message, {
            "mean_grad_cos": mean_cos, "mean_gnorm_autocorr": mean_autocorr,
            "sign_flip": finite_scalar(record, "sign_flip"),
            "gnorm_cv": finite_scalar(record, "gnorm_cv"), "streak": self._streak,
            "symptom": symptom,
            "window": window_span(s for s, _ in source),
            "thresholds": {"cos_threshold": self.config.cos_threshold,
                           "autocorr_threshold": self.config.autocorr_threshold,
                           "patience": self.config.patience}})

    def _judge_columns(self, columns: RecordColumns) -> tuple[np.ndarray, Callable[[int], Any]]:
        window = self.config.window
        series = {key: _Trailing(columns, key, window) for key in ("grad_cos", "gnorm_autocorr")}
        cos, autocorr = series["grad_cos"], series["gnorm_autocorr"]
        judged = (cos.present | autocorr.present) & (cos.full | autocorr.full)
        cos_low = cos.at_or_below(self.config.cos_threshold)
        autocorr_low = autocorr.at_or_below(self.config.autocorr_threshold)
        streak, _ = judged_streaks(judged, judged & (cos_low | autocorr_low))

        def judge(index: int) -> Finding:
            self._streak = int(streak[index])
            self._cos, self._autocorr = cos.deque_at(index), autocorr.deque_at(index)
            self._symptoms = columns.symptoms_at(index, self.config.gap, self.config.min_progress,
                                                 self.config.stall_window,
                                                 floor=solved_line(self.config))
            return self._oscillation(columns.records[index], cos.mean_at(index),
                                     autocorr.mean_at(index), bool(cos_low[index]),
                                     bool(autocorr_low[index]))
        return codes(judged, streak >= self.config.patience, certain=True), judge

    def _full_mean(self, values: deque[tuple[int, float]]) -> float | None:
        if len(values) < self.config.window:
            return None
        return statistics.fmean(value for _, value in values)


class _Trailing:
    """One statistic's finite values and their trailing `window` means, per record."""

    def __init__(self, columns: RecordColumns, key: str, window: int) -> None:
        values = columns.finite(key)
        self.columns, self.window = columns, window
        self.present = np.isfinite(values)
        self.positions = np.flatnonzero(self.present)
        self.values: list[float] = values[self.positions].tolist()
        self.seen = np.cumsum(self.present)  # values up to and including each record
        self.full = self.seen >= window
        means = trailing_means(values[self.positions], window)
        self.means = np.full(len(values), math.nan)
        self.means[self.full] = means[self.seen[self.full] - 1]

    def at_or_below(self, threshold: float) -> np.ndarray:
        """mean <= threshold per record (False without a full window), the summed means
        checked again with `statistics.fmean` near the threshold."""
        low = self.full & (self.means <= threshold)
        for index in np.flatnonzero(self.full & near(self.means, threshold)).tolist():
            low[index] = self.mean_at(index) <= threshold
        return low

    def mean_at(self, index: int) -> float | None:
        """`GradientOscillation._full_mean` after the record at `index`."""
        if not self.full[index]:
            return None
        return statistics.fmean(self.values[self.seen[index] - self.window:self.seen[index]])

    def deque_at(self, index: int) -> deque[tuple[int, float]]:
        seen = int(self.seen[index])
        start = max(0, seen - self.window)
        return deque(((self.columns.step(int(self.positions[k])), self.values[k])
                      for k in range(start, seen)), maxlen=self.window)
