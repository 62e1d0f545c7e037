"""Detectors that read the loss (and, for non-finite values, the gradient norm)."""

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
    DetectorConfig,
    Finding,
    Unjudged,
    finite_scalar,
    is_int,
    raw_scalar,
    require,
    window_span,
)
from loopdiag.detect.columns import MARGIN, RecordColumns, codes, expand, streaks, trailing_medians
from loopdiag.detect.symptoms import (
    MIN_NOISE_DIFFERENCES,
    RISE_BATCH_CAP,
    RISE_BEST_WINDOW,
    RISE_NOISE_Z,
    RecentRise,
    RiseState,
    SolvedLineConfig,
    solved_line,
    validate_rise,
)
from loopdiag.detect.trend import mann_kendall_rising_p, rolling_rising_p, sen_line

# MAD × 1.4826 estimates σ for Gaussian noise, so the robust z reads like a plain z-score.
MAD_TO_SIGMA = 1.4826
# A median and MAD of fewer values than this say nothing about the noise.
MIN_HISTORY = 3
SPIKE_CHUNK = 1 << 14  # windows sorted at once


@dataclass(frozen=True)
class NonFiniteConfig(DetectorConfig):
    warmup: int = 0  # a NaN is never part of a healthy start
    cooldown: int = 10  # finite records before a new non-finite episode is reported


class NonFinite(Detector):
    """Non-finite loss or global gradient norm → critical, on the record it appears."""

    name = "non_finite"
    reads = ("loss", "grad_norm")  # either one is judged
    config_class = NonFiniteConfig

    def _reset_state(self) -> None:
        pass

    def _check(self, record: Mapping[str, Any]) -> Finding | None | Unjudged:
        present = {key: value for key in ("loss", "grad_norm")
                   if (value := raw_scalar(record, key)) is not None}
        if not present:
            return UNJUDGED
        bad = {key: value for key, value in present.items() if not math.isfinite(value)}
        if not bad:
            return None
        what = " and ".join(f"{key} ({value})" for key, value in bad.items())
        return Finding("critical", f"Non-finite {what} at step {record.get('step')}.", present)

    def _judge_columns(self, columns: RecordColumns) -> tuple[np.ndarray, Callable[[int], Any]]:
        (loss, loss_present), (grad, grad_present) = columns.raw("loss"), columns.raw("grad_norm")
        bad = (loss_present & ~np.isfinite(loss)) | (grad_present & ~np.isfinite(grad))
        return codes(loss_present | grad_present, bad, certain=True), lambda i: self._check(columns.records[i])


@dataclass(frozen=True)
class LossSpikeConfig(DetectorConfig):
    warmup: int = 20
    cooldown: int = 10
    window: int = 50  # trailing records the median and MAD come from
    # 6 robust σ: Gaussian noise essentially never gets there, heavier-tailed batch noise
    # rarely; the relative floor catches the rest.
    z: float = 6.0
    # ... and the loss must be ≥ (1 + rel_floor) × the median: late in training the MAD is
    # tiny and a 3 % wobble can score z > 6; tiny-batch healthy runs wobble by up to ~15 %.
    rel_floor: float = 0.2
    # One record's loss is one batch: a hard batch lifts it once, an unstable step lifts the
    # next batches' too. So a spike warns when it lasts `persist` records in a row (llm-foundry
    # waits for a spike to persist as well), or at once when the loss is ≥ `ratio_now` × the
    # median (llm-foundry's outlier multiplier); a lone smaller one is information.
    persist: int = 2
    ratio_now: float = 2.0

    def _validate(self) -> None:
        require(self.window >= MIN_HISTORY, f"window must be >= {MIN_HISTORY}, got {self.window}")
        require(self.z > 0, f"z must be > 0, got {self.z}")
        require(self.rel_floor >= 0, f"rel_floor must be >= 0, got {self.rel_floor}")
        require(self.persist >= 1, f"persist must be >= 1, got {self.persist}")
        require(self.ratio_now > 1, f"ratio_now must be > 1, got {self.ratio_now}")


class LossSpike(Detector):
    """A loss far above its recent typical value: robust z-score over a trailing window.

    z = (loss − median) / (1.4826 · MAD) over the previous `window` finite losses; a spike
    is z ≥ `z` and loss − median ≥ `rel_floor` · |median|. Median and MAD ignore the spike
    itself and any earlier ones, so a 3× spike stands out however noisy the window. Warn
    when spikes last `persist` records in a row or one reaches `ratio_now` × the median;
    a lone smaller spike is `info`. A spike alone is not a failed run, so it never goes
    critical.
    """

    name = "loss_spike"
    reads = ("loss",)
    config_class = LossSpikeConfig
    config: LossSpikeConfig

    def _reset_state(self) -> None:
        self._history: deque[tuple[int, float]] = deque(maxlen=self.config.window)
        self._run = 0  # spikes in a row, this record's included

    def _check(self, record: Mapping[str, Any]) -> Finding | None | Unjudged:
        loss = finite_scalar(record, "loss")
        if loss is None:
            return UNJUDGED
        history = list(self._history)
        self._history.append((record.get("step"), loss))
        return self._spike(record.get("step"), loss, history)

    def _spike(self, step: Any, loss: float, history: list[tuple[Any, float]]
               ) -> Finding | None | Unjudged:
        """The judgement of `loss` against the (step, loss) pairs before it."""
        if len(history) < MIN_HISTORY:
            return UNJUDGED
        values = [value for _, value in history]
        median, sigma, z = self._robust_z(loss, values)
        if not self._spiked(loss, median, z):
            self._run = 0
            return None
        self._run += 1
        ratio = loss / median if median > 0 else math.inf
        message = (f"Loss {loss:.4g} at step {step} is {ratio:.2f}× the trailing "
                   f"median {median:.4g} (robust z = {z:.1f} over the last {len(history)} "
                   f"records)")
        if self._run >= self.config.persist:
            severity, message = "warn", f"{message}, {self._run} records in a row above it."
        elif ratio >= self.config.ratio_now:
            severity, message = "warn", f"{message}."
        else:
            severity, message = "info", f"{message}; one batch so far."
        return Finding(severity, message, {
            "loss": loss, "median": median, "sigma": sigma, "z": z, "ratio": ratio,
            "records_in_a_row": self._run,
            "window": window_span(step for step, _ in history),
            "thresholds": {"z": self.config.z, "rel_floor": self.config.rel_floor,
                           "persist": self.config.persist, "ratio_now": self.config.ratio_now}})

    @staticmethod
    def _robust_z(loss: float, values: list[float]) -> tuple[float, float, float]:
        """(median, robust σ, robust z of `loss`) over `values`."""
        median = statistics.median(values)
        sigma = MAD_TO_SIGMA * statistics.median(abs(value - median) for value in values)
        excess = loss - median
        return median, sigma, excess / sigma if sigma > 0 else (math.inf if excess > 0 else 0.0)

    def _spiked(self, loss: float, median: float, z: float) -> bool:
        return z >= self.config.z and loss - median >= self.config.rel_floor * abs(median)

    def _is_spike(self, loss: float, values: list[float]) -> bool:
        median, _, z = self._robust_z(loss, values)
        return self._spiked(loss, median, z)

    def _judge_columns(self, columns: RecordColumns) -> tuple[np.ndarray, Callable[[int], Any]]:
        # Over the finite losses alone: the j-th is judged against the `window` before it.
        loss = columns.finite("loss")
        positions = np.flatnonzero(np.isfinite(loss))
        losses = loss[positions]
        window = self.config.window
        medians = np.full(len(losses), math.nan)
        medians[1:] = trailing_medians(losses, window)[:-1]
        excess = losses - medians
        # A spike needs the loss above the median by rel_floor of it: a cheap screen.
        maybe = excess >= self.config.rel_floor * np.abs(medians) - MARGIN * (
            np.abs(losses) + np.abs(medians))
        enough = np.arange(len(losses)) >= MIN_HISTORY
        full = np.arange(len(losses)) >= window
        # With a full window the screened records are judged here, with `_spike`'s float
        # operations on sorted windows: the median of sorted values is the same number.
        spikes = _spikes(losses, np.flatnonzero(maybe & full), window, self.config.z,
                         self.config.rel_floor)
        values = losses.tolist()
        # The first windows are short and few: judged exactly, so that every spike is known
        # and each one's place in a run of spikes (its severity) with it.
        for j in np.flatnonzero(maybe & enough & ~full).tolist():
            spikes[j] = self._is_spike(values[j], values[max(0, j - window):j])
        in_a_row = streaks(spikes)
        order = {index: j for j, index in enumerate(positions.tolist())}

        def judge(index: int) -> Finding | None | Unjudged:
            j = order[index]
            self._run = int(in_a_row[j - 1]) if j else 0
            history = [(columns.step(positions[k]), values[k]) for k in range(max(0, j - window), j)]
            return self._spike(columns.step(index), values[j], history)
        return (codes(expand(positions, enough, len(loss), False),
                      expand(positions, spikes, len(loss), False), certain=True), judge)


def _spikes(losses: np.ndarray, candidates: np.ndarray, window: int, z: float,
            rel_floor: float) -> np.ndarray:
    """Where `LossSpike._spike` fires among `candidates` (positions with `window` losses
    before them), as a mask over `losses`."""
    fires = np.zeros(len(losses), dtype=bool)
    if not len(candidates):
        return fires
    windows = np.lib.stride_tricks.sliding_window_view(losses, window)
    for start in range(0, len(candidates), SPIKE_CHUNK):
        at = candidates[start:start + SPIKE_CHUNK]
        history = windows[at - window]
        median = _middle(np.sort(history, axis=1))
        sigma = MAD_TO_SIGMA * _middle(np.sort(np.abs(history - median[:, None]), axis=1))
        excess = losses[at] - median
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(sigma > 0, excess / sigma, np.where(excess > 0, math.inf, 0.0))
        fires[at] = ~((score < z) | (excess < rel_floor * np.abs(median)))
    return fires


def _middle(rows: np.ndarray) -> np.ndarray:
    """`statistics.median` of each sorted row."""
    half = rows.shape[1] // 2
    return rows[:, half] if rows.shape[1] % 2 else (rows[:, half - 1] + rows[:, half]) / 2


@dataclass(frozen=True)
class LossRiseConfig(SolvedLineConfig):
    # Until the noise can be read, a noisy start rises 10 % above its first batches.
    warmup: int = MIN_NOISE_DIFFERENCES + 2
    cooldown: int = 20  # clear records before a new rise warns again
    ema_span: int = 20  # records; the smoothing of `ground_truth_onset`
    # The labels' gap: a smoothed loss this far above its best is a visibly failed run
    # (`ground_truth_onset`), and the symptom that lets the residual detectors warn.
    gap: float = 0.10
    # One batch enters the smoothed loss at no more than this × it, so a lone spike moves
    # it by at most α·0.5 ≈ 5 % (span 20), half the gap: one bad batch is `loss_spike`'s,
    # a run that keeps getting worse crosses all the same. Added after the uncapped rule
    # warned one healthy loops-compute run (a recovering 11 % rise), so that study is
    # in-sample for it; 1.25× and 2× score the same on every detection set.
    batch_cap: float = RISE_BATCH_CAP
    best_window: int = RISE_BEST_WINDOW  # records the best and the noise are read over
    noise_z: float = RISE_NOISE_Z  # σ of the smoothed loss's noise the rise must also reach

    def _validate(self) -> None:
        require(self.ema_span >= 1, f"ema_span must be >= 1, got {self.ema_span}")
        require(self.gap > 0, f"gap must be > 0, got {self.gap}")
        require(self.batch_cap > 1, f"batch_cap must be > 1, got {self.batch_cap}")
        validate_rise(self.best_window, self.noise_z)


class LossRise(Detector):
    """The smoothed loss risen clearly above its recent best: the run is now visibly worse
    than it was. The smoothing and the gap are `ground_truth_onset`'s (an EMA of span
    `ema_span`, non-finite losses skipped; a batch counts at most `batch_cap` × the
    smoothed loss before it); the best is the lowest smoothed loss of the last
    `best_window` records, and the rise must also reach `noise_z` × the smoothed loss's
    noise there (`RecentRise`). On a loss whose batches scatter less than about 5.6 % that
    is the gap itself, so a rise warns on about the first record the labels count as
    failed, whatever the mechanism behind it (the residual detectors name one when they
    see it); on a noisier loss, only a rise that noise alone would not reach warns. Never
    critical: a rise that recovers is no collapse (`slow_divergence` and
    `collapse_plateau` judge one that stays).

    With `context_free_loss`, a best under `context_free_margin` × it counts as that line:
    a model there has solved its data, and its loss, near 0, is set by its rare confident
    misses (one wrong digit in a batch of addition moves it by ~0.02 nats), so a relative
    rise measures how sure its right answers are. The rise that warns is the gap above the
    line, as `failed_to_train` judges a run behind a reference that solved its task.
    """

    name = "loss_rise"
    reads = ("loss",)
    config_class = LossRiseConfig
    config: LossRiseConfig

    def _reset_state(self) -> None:
        self._rise = self._recent_rise()

    def _recent_rise(self) -> RecentRise:
        config = self.config
        return RecentRise(config.ema_span, config.gap, config.best_window, config.noise_z,
                          config.batch_cap, solved_line(config))

    def _check(self, record: Mapping[str, Any]) -> Finding | None | Unjudged:
        loss = finite_scalar(record, "loss")
        if loss is None:
            return UNJUDGED
        return self._finding(self._rise.update(loss, record.get("step")))

    def _finding(self, state: RiseState) -> Finding | None:
        if not state.risen:
            return None
        noise = f", {state.above / state.noise:.0f}σ of its noise" if state.noise else ""
        if state.floor > state.best:
            above = (f"{state.floor:.4g}, {self.config.context_free_margin:.0%} of the "
                     f"context-free loss (its best in the last {self.config.best_window} "
                     f"records, {state.best:.4g} at step {state.best_step}, was under that "
                     f"line: it had solved its data)")
        else:
            above = (f"its best {state.best:.4g} (step {state.best_step}) in the last "
                     f"{self.config.best_window} records")
        message = (f"The smoothed loss {state.smoothed:.4g} is {100 * state.above:.0f}% above "
                   f"{above}{noise}: the run is worse than it was.")
        return Finding("warn", message, {
            "smoothed_loss": state.smoothed, "best": state.best, "best_step": state.best_step,
            "rise_from": state.base, "noise": state.noise, "needed_rise": state.needed,
            "thresholds": {"gap": self.config.gap, "ema_span": self.config.ema_span,
                           "batch_cap": self.config.batch_cap, "best_window": self.config.best_window,
                           "noise_z": self.config.noise_z,
                           "context_free_loss": self.config.context_free_loss,
                           "context_free_margin": self.config.context_free_margin}})

    def _judge_columns(self, columns: RecordColumns) -> tuple[np.ndarray, Callable[[int], Any]]:
        # The same `RecentRise` over the finite losses, so both paths compute alike.
        positions = columns.loss_positions()
        run = columns.rise_run(self._recent_rise())
        size = len(columns)
        return (codes(expand(positions, np.ones(len(positions), dtype=bool), size, False),
                      expand(positions, run.risen, size, False), certain=True),
                lambda index: self._finding(run[int(np.searchsorted(positions, index))]))


@dataclass(frozen=True)
class SlowDivergenceConfig(DetectorConfig):
    warmup: int = 50
    cooldown: int = 20
    window: int = 100  # records the trend is fitted over
    # One-sided Mann–Kendall p-value: overlapping windows test again every record, so the
    # per-test level is strict.
    alpha: float = 1e-3
    # Fitted rise over the window, relative to the fitted start. A flat noisy loss fits
    # ≈ ±1 % over 100 records (5 % noise); 3 % is well clear of that and well before the
    # 10 % at which a run counts as visibly failed (see `ground_truth_onset`).
    warn_rise: float = 0.03
    critical_rise: float = 0.10  # the loss is now visibly worse and still rising
    patience: int = 3  # consecutive records the trend must hold

    def _validate(self) -> None:
        require(self.window >= 10, f"window must be >= 10, got {self.window}")
        require(0 < self.alpha < 1, f"alpha must be in (0, 1), got {self.alpha}")
        require(0 < self.warn_rise <= self.critical_rise,
                f"need 0 < warn_rise <= critical_rise, got {self.warn_rise}, {self.critical_rise}")
        require(self.patience >= 1, f"patience must be >= 1, got {self.patience}")


class SlowDivergence(Detector):
    """A loss that creeps upward: a significant rising trend over a window.

    The trend is the Theil–Sen line through the last `window` finite losses against their
    steps (the line is the smoother; smoothing first would correlate the residuals and
    void the p-value), its significance the one-sided Mann–Kendall test (Kendall's τ).
    Both are rank-based, so a lone spike neither makes nor breaks a trend. Warn when
    p < `alpha` and the fitted rise ≥ `warn_rise` for `patience` records; critical once
    the rise reaches `critical_rise`. A 6σ-over-128-steps spike rule never sees this: the
    trend inflates its σ as fast as it raises the loss.
    """

    name = "slow_divergence"
    mechanism = "loss"
    reads = ("loss",)
    config_class = SlowDivergenceConfig
    config: SlowDivergenceConfig

    def _reset_state(self) -> None:
        self._history: deque[tuple[int, float]] = deque(maxlen=self.config.window)
        self._streak = 0

    def _check(self, record: Mapping[str, Any]) -> Finding | None | Unjudged:
        loss = finite_scalar(record, "loss")
        step = record.get("step")
        if loss is None or not is_int(step):
            return UNJUDGED
        self._history.append((step, loss))
        if len(self._history) < self.config.window:
            return UNJUDGED
        steps = np.array([s for s, _ in self._history], dtype=float)
        losses = np.array([value for _, value in self._history])
        p = mann_kendall_rising_p(losses)
        slope, start, rise = self._rise(p, steps, losses)
        trending = p < self.config.alpha and rise >= self.config.warn_rise
        self._streak = self._streak + 1 if trending else 0
        if self._streak < self.config.patience:
            return None
        return self._trend(steps, p, slope, start, rise)

    def _rise(self, p: float, steps: np.ndarray, losses: np.ndarray) -> tuple[float, float, float]:
        """(Theil–Sen slope, fitted start, relative rise over the window); NaN unless the
        trend is significant: the slope is the costly part and only matters then."""
        if not p < self.config.alpha:
            return math.nan, math.nan, math.nan
        slope, start = sen_line(steps, losses)
        return slope, start, slope * (steps[-1] - steps[0]) / start if start > 0 else math.nan

    def _trend(self, steps: np.ndarray, p: float, slope: float, start: float,
               rise: float) -> Finding:
        severity = "critical" if rise >= self.config.critical_rise else "warn"
        message = (f"Loss has risen {100 * rise:.1f}% over the last {len(steps)} records "
                   f"(steps {int(steps[0])}–{int(steps[-1])}; Theil–Sen slope {slope:.3g}/step, "
                   f"Mann–Kendall p = {p:.1g}).")
        return Finding(severity, message, {
            "rise": rise, "slope_per_step": slope, "p_value": p,
            "fitted_start": start, "streak": self._streak,
            "window": window_span(int(s) for s in steps),
            "thresholds": {"alpha": self.config.alpha, "warn_rise": self.config.warn_rise,
                           "critical_rise": self.config.critical_rise,
                           "patience": self.config.patience}})

    def _judge_columns(self, columns: RecordColumns) -> tuple[np.ndarray, Callable[[int], Any]]:
        # Over the records with a finite loss and an integer step, each judged on the
        # `window` of them ending there from the window-th on.
        loss = columns.finite("loss")
        steps, int_step = columns.int_steps()
        positions = np.flatnonzero(np.isfinite(loss) & int_step)
        losses, window_steps = loss[positions], steps[positions].astype(float)
        n = self.config.window
        ends = np.arange(n - 1, len(positions))
        p = np.full(len(positions), math.nan)
        p[ends] = rolling_rising_p(losses, n)
        rises = {}
        for j in np.flatnonzero(p < self.config.alpha).tolist():
            rises[j] = self._rise(p[j], window_steps[j - n + 1:j + 1], losses[j - n + 1:j + 1])
        trending = np.zeros(len(positions), dtype=bool)
        for j, (_, _, rise) in rises.items():
            trending[j] = rise >= self.config.warn_rise
        streak = streaks(trending)
        order = {index: j for j, index in enumerate(positions.tolist())}

        def judge(index: int) -> Finding:
            j = order[index]
            self._streak = int(streak[j])
            return self._trend(window_steps[j - n + 1:j + 1], float(p[j]), *rises[j])
        judged = np.arange(len(positions)) >= n - 1
        return (codes(expand(positions, judged, len(loss), False),
                      expand(positions, streak >= self.config.patience, len(loss), False),
                      certain=True), judge)

