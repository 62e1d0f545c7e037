"""Residual explosion: the residual stream growing beyond what a healthy run shows. It is
an alarm only with a loss or representation symptom (`loopdiag.detect.symptoms.Symptoms`):
warn past the warning thresholds, critical past the critical ones; with a loss that has
begun to rise, read against its noise (`Symptoms.rising`), a warning at most. Growth
without either is one `info` event per episode."""

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
    loop_values,
    require,
    window_span,
)
from loopdiag.detect.columns import RecordColumns, codes, expand, near, trailing_medians
from loopdiag.detect.symptoms import (
    ReferenceLineConfig,
    Symptoms,
    solved_line,
)


@dataclass(frozen=True)
class ResidualExplosionConfig(ReferenceLineConfig):
    # With zero-initialised output projections the stream starts at ‖N(e)‖ = √d and grows
    # several-fold in the first tens of steps as the residual branches switch on (a tiny
    # healthy run: 8 → 15.6 by step 25, settling near 8 by step 50). A baseline taken then
    # would call that growth an explosion, so it is taken after `warmup`.
    warmup: int = 50
    cooldown: int = 20
    baseline_window: int = 20  # records after warm-up whose median is the baseline
    smooth: int = 5  # rolling median over this many records, so one odd batch never fires
    # After warm-up a healthy run drifts up slowly as the weights grow (a tiny one: ×1.1
    # over 550 steps); 3× is well beyond that, 10× an order of magnitude.
    growth_warn: float = 3.0
    growth_critical: float = 10.0
    # Per-loop geometric growth (r_K / r_1)^(1/(K-1)), comparable across loop counts (and
    # valid when K is sampled per step). The normalising architectures restart near √d
    # every loop (tiny healthy runs: ≈ 0.97); `looped-scaled` accumulates (≈ 1.1). 2.0
    # doubles the stream every loop, 2^(K-1) in all: an explosion however it is built.
    loop_growth_warn: float = 1.5
    loop_growth_critical: float = 2.0
    # The loss symptom that makes growth an alarm (see `Symptoms`).
    gap: float = 0.10

    def _validate(self) -> None:
        require(self.gap > 0, f"gap must be > 0, got {self.gap}")
        require(self.baseline_window >= 1,
                f"baseline_window must be >= 1, got {self.baseline_window}")
        require(self.smooth >= 1, f"smooth must be >= 1, got {self.smooth}")
        for low, high in (("growth_warn", "growth_critical"),
                          ("loop_growth_warn", "loop_growth_critical")):
            require(1 < getattr(self, low) <= getattr(self, high),
                    f"need 1 < {low} <= {high}, got {getattr(self, low)}, {getattr(self, high)}")


class ResidualExplosion(Detector):
    """The last-loop residual norm r_K growing beyond what a healthy run shows.

    Two numbers, each a rolling median over `smooth` records:
    - over steps: r_K / its post-warm-up baseline (median of the first `baseline_window`
      records after warm-up) → warn ≥ `growth_warn`, critical ≥ `growth_critical`;
    - over loops (K ≥ 2): per-loop growth (r_K / r_1)^(1/(K-1)) → warn ≥
      `loop_growth_warn`, critical ≥ `loop_growth_critical`;
    with a loss or representation symptom (`Symptoms`) that grade is the event's, with a
    loss that has begun to rise (`Symptoms.rising`) a warning; without either the event is
    `info`.
    """

    name = "residual_explosion"
    mechanism = "residual"
    reads = ("resid_norm",)
    config_class = ResidualExplosionConfig
    config: ResidualExplosionConfig

    def _reset_state(self) -> None:
        self._recent_last: deque[float] = deque(maxlen=self.config.smooth)
        self._recent_per_loop: deque[float] = deque(maxlen=self.config.smooth)
        self._baseline: list[tuple[int, float]] = []  # (step, r_K)
        self._baseline_median: float | None = None
        self._symptoms = Symptoms(self.config.gap, reads_rise=True, floor=solved_line(self.config),
                                  positions=self.config.context_free_line_holds)

    def _check(self, record: Mapping[str, Any]) -> Finding | None | Unjudged:
        self._symptoms.update(record)
        norms = loop_values(record, "resid_norm")
        if norms is None or not (math.isfinite(norms[-1]) and norms[-1] > 0):
            return UNJUDGED
        loops = len(norms)
        evidence: dict[str, Any] = {"loops": loops}
        self._recent_last.append(float(norms[-1]))
        if loops >= 2 and math.isfinite(norms[0]) and norms[0] > 0:
            evidence["loop_ratio"] = loop_ratio = float(norms[-1] / norms[0])
            self._recent_per_loop.append(loop_ratio ** (1 / (loops - 1)))
        if (self._records_seen > self.config.warmup
                and len(self._baseline) < self.config.baseline_window):
            self._baseline.append((record.get("step"), float(norms[-1])))
            if len(self._baseline) == self.config.baseline_window:
                self._baseline_median = statistics.median(r for _, r in self._baseline)
        return self._signals(evidence)

    def _signals(self, evidence: dict[str, Any]) -> Finding | None | Unjudged:
        """The judgement from the trailing medians and the baseline held now."""
        last = evidence["resid_norm_last"] = statistics.median(self._recent_last)
        signals: list[tuple[str, str]] = []  # (severity, sentence); the strongest is reported
        if self._baseline_median is not None:
            baseline = self._baseline_median
            growth = last / baseline
            evidence.update(baseline=baseline, growth=growth,
                            baseline_window=window_span(s for s, _ in self._baseline))
            severity = self._grade(growth, self.config.growth_warn, self.config.growth_critical)
            if severity is not None:
                signals.append((severity, f"Last-loop residual norm {last:.4g} is {growth:.1f}× "
                                          f"its post-warm-up baseline {baseline:.4g}."))
        if self._recent_per_loop:
            per_loop = statistics.median(self._recent_per_loop)
            evidence["per_loop_growth"] = per_loop
            severity = self._grade(per_loop, self.config.loop_growth_warn,
                                   self.config.loop_growth_critical)
            if severity is not None:
                signals.append((severity, f"Residual norm grows {per_loop:.2f}× per loop "
                                          f"from loop 1 to the last (median of the last "
                                          f"{len(self._recent_per_loop)} records)."))
        if not signals:
            return None
        evidence["thresholds"] = {
            name: getattr(self.config, name) for name in
            ("growth_warn", "growth_critical", "loop_growth_warn", "loop_growth_critical")}
        severity, message = max(signals, key=lambda signal: signal[0] == "critical")
        symptom = evidence["symptom"] = self._symptoms.current()
        if symptom is not None:
            return Finding(severity, f"{message[:-1]}, and {symptom}.", evidence)
        rising = evidence["rising"] = self._symptoms.rising()
        if rising is not None:  # the loss has begun to rise: a warning, not yet a collapse
            return Finding("warn", f"{message[:-1]}, and {rising}.", evidence)
        # Growth alone is information: the weights grow as a model learns, and a loss that
        # flattens late in training is a converging run as often as a stalled one.
        return Finding("info", f"{message[:-1]}, with the loss within {100 * self.config.gap:.0f}% "
                               f"of its best and positions distinct.", evidence)

    def _judge_columns(self, columns: RecordColumns) -> tuple[np.ndarray, Callable[[int], Any]]:
        grid, lengths = columns.loops("resid_norm")
        last = columns.last_loop("resid_norm")
        first_loop = grid[:, 0] if grid.shape[1] else np.full(len(lengths), math.nan)
        judged = np.isfinite(last) & (last > 0)
        positions = np.flatnonzero(judged)
        lasts = last[positions]
        last_medians = expand(positions, trailing_medians(lasts, self.config.smooth), len(last),
                              math.nan)
        with_loops = judged & (lengths >= 2) & np.isfinite(first_loop) & (first_loop > 0)
        loop_positions = np.flatnonzero(with_loops)
        with np.errstate(divide="ignore", invalid="ignore"):
            loop_ratios = last / first_loop
        # Python's float power, as `_check` takes it (numpy's may differ in the last bit).
        per_loop = [ratio ** (1 / (loops - 1)) for ratio, loops in
                    zip(loop_ratios[loop_positions].tolist(), lengths[loop_positions].tolist())]
        per_loop_seen = np.cumsum(with_loops)
        per_loop_medians = np.full(len(last), math.nan)
        if per_loop:
            medians = trailing_medians(np.array(per_loop), self.config.smooth)
            has = per_loop_seen > 0
            per_loop_medians[has] = medians[per_loop_seen[has] - 1]
        baseline_positions = positions[positions >= self.config.warmup][:self.config.baseline_window]
        baseline = [(columns.step(index), float(last[index])) for index in baseline_positions.tolist()]
        growth = np.full(len(last), math.nan)
        if len(baseline) == self.config.baseline_window:
            baseline_median = statistics.median(r for _, r in baseline)
            since = int(baseline_positions[-1])
            growth[since:] = last_medians[since:] / baseline_median

        def maybe(values: np.ndarray, threshold: float) -> np.ndarray:
            return (values >= threshold) | near(values, threshold)
        open_ = judged & (maybe(growth, self.config.growth_warn)
                          | maybe(per_loop_medians, self.config.loop_growth_warn))
        seen = np.cumsum(judged)
        lasts_list = lasts.tolist()

        def judge(index: int) -> Finding | None | Unjudged:
            smooth = self.config.smooth
            self._recent_last = deque(lasts_list[max(0, seen[index] - smooth):seen[index]],
                                      maxlen=smooth)
            self._recent_per_loop = deque(per_loop[max(0, per_loop_seen[index] - smooth):
                                                   per_loop_seen[index]], maxlen=smooth)
            self._baseline = [entry for entry, at in zip(baseline, baseline_positions) if at <= index]
            self._baseline_median = (statistics.median(r for _, r in self._baseline)
                                     if len(self._baseline) == self.config.baseline_window else None)
            self._symptoms = columns.symptoms_at(index, self.config.gap, reads_rise=True,
                                                 floor=solved_line(self.config),
                                                 positions=self.config.context_free_line_holds)
            evidence: dict[str, Any] = {"loops": int(lengths[index])}
            if with_loops[index]:
                evidence["loop_ratio"] = float(loop_ratios[index])
            return self._signals(evidence)
        return codes(judged, open_), judge

    @staticmethod
    def _grade(value: float, warn: float, critical: float) -> str | None:
        if value >= critical:
            return "critical"
        return "warn" if value >= warn else None

