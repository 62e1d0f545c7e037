"""What the loss and the representation say about a run, shared by the detectors that may
only go critical with such a symptom: a growing stream or a vanishing gradient is not a
collapse by itself, a model that stopped learning because of it is.

The thresholds here are mechanisms, not fits:
- `COLLAPSED_DECORRELATION`: 1 − token correlation at the last loop. When every position
  carries the same vector the statistic is float32 rounding: under 1e-7 as recorded now
  (the unit vectors' spread about their mean), ±7e-7 at 64 tokens in records taken from
  their sum before that (seen: −4.9e-7 … 1.9e-6 in collapsed runs); a model that keeps any
  per-token information sits above 2e-5 (the closest healthy approach on the development
  seed 0, a tiny looped model's unigram phase, was 2.3e-5; larger models keep more).
  1e-5 is between the two. A healthy model may still pass through the state itself (plain
  `looped` under a warm-up or with the loss on every loop, for tens of records) and leave it.
- A loss "rose" when its EMA is ≥ (1 + gap) × its running best, the definition of a
  visible failure that `ground_truth_onset` uses too. `RecentRise` reads a rise on a noisy
  loss: against the best of the last 100 records, and by at least 8 σ of the EMA's noise
  (a flat noisy loss stands ever further above its deepest dip; see its docstring).
- A loss has "stalled" when it fell by less than `min_progress` (2 %) over its last
  `window` records, as the Theil–Sen line through its last `window` + 5 losses reads it:
  the stall rule of `representation_collapse`, `residual_blowup`, `gradient_oscillation` and
  the end judgements. The line's slope is the median of every pair's, so one odd batch never
  moves it, and it reads every loss of the span: on a flat loss with 2 % noise per batch it
  reads a 2 % fall 3.6 % of the time, where a median of the last 5 losses against that of
  the 5 `window` records before reads one 8.5 % of the time (`benchmarks/stall_null.py`).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loopdiag.detect.base import DetectorConfig, Ema, finite_scalar, loop_values, require

COLLAPSED_DECORRELATION = 1e-5
# The labels' 10 % gap measured from the context-free loss: a loss within it (below) learned
# next to nothing beyond token frequencies; a reference under this fraction of it learned
# nearly everything (`behind_from`).
CONTEXT_FREE_MARGIN = 0.10
# How far above the context-free loss a model that learned the token frequencies ends: the
# smoothed loss's noise and what is left to fit there. On data with nothing more to learn the
# one-loop models ended 0.13 % above it at most (random characters); 2 % is 15 times that. A
# reference stalled higher did not learn even the frequencies (`reference_at_token_frequencies`).
# Set after a tiny model on Perl had references at 1.09–1.10× pass a first edge of 10 %; a
# suite on Nettle's manual (1.034×) was held out for it.
FREQUENCIES_LEARNED_WITHIN = 0.02
MIN_PROGRESS = 0.02  # the stall rule: a loss < 2 % better over the window
MEDIAN_OF = 5  # losses per median where one loss is quoted: one odd batch never moves it
# Losses the stall rule's line reads beyond its window: a stall is read from the 25th loss on.
STALL_EXTRA = 5


def collapsed_from(record: Mapping[str, Any], max_decorrelation: float = COLLAPSED_DECORRELATION
                   ) -> int | None:
    """The first loop (1-based) from which every loop's output has all positions identical
    (1 − token correlation < `max_decorrelation`); None if the last loop's has not."""
    corr = loop_values(record, "token_corr")
    if corr is None or not 1 - corr[-1] < max_decorrelation:
        return None
    first = len(corr)
    while first > 1 and 1 - corr[first - 2] < max_decorrelation:
        first -= 1
    return first


def dead_from(record: Mapping[str, Any], max_update: float) -> int | None:
    """The first loop k ≥ 2 from which every loop's relative update is below `max_update`
    (the loops from k on change nothing); None when the last loop still changes the
    stream or no relative update was recorded."""
    updates = loop_values(record, "rel_update")
    if updates is None or len(updates) < 2 or not updates[-1] < max_update:
        return None
    first = len(updates)
    while first > 2 and updates[first - 2] < max_update:
        first -= 1
    return first


def gradient_ratio(record: Mapping[str, Any]) -> float | None:
    """Gradient norm reaching loop 1's output over the last loop's (`act_grad_norm`), or
    None when the record has no usable pair."""
    grads = loop_values(record, "act_grad_norm")
    if grads is None or len(grads) < 2:
        return None
    first, last = grads[0], grads[-1]
    if not (math.isfinite(first) and math.isfinite(last) and last > 0):
        return None
    return float(first / last)


def embedding_gradient(record: Mapping[str, Any]) -> float | None:
    """The embedding's gradient norm when the record has one: a `grad_norm/<group>` whose
    group names an embedding (`wte`, `embed...`)."""
    for key, value in record.items():
        group = key.partition("grad_norm/")[2].lower()
        if group and (group == "wte" or "embed" in group) and isinstance(value, (int, float)):
            return float(value)
    return None


def capped(loss: float, smoothed: float | None, batch_cap: float | None) -> float:
    """What one loss adds to an EMA that counts a batch at most `batch_cap` × the EMA before
    it (None: uncapped; nothing is capped before a positive EMA exists)."""
    if batch_cap is None or smoothed is None or not smoothed > 0:
        return loss
    return min(loss, batch_cap * smoothed)


EMA_SPAN = 20  # records: the smoothing of the labels (`ground_truth_onset`)


def first_loss_weight(records: int) -> float:
    """The weight a run's first loss still has in its smoothed loss after `records` losses
    (the EMA of span `EMA_SPAN`, started at the first)."""
    return (1 - 2 / (EMA_SPAN + 1)) ** max(records - 1, 0)


def few_records_message(records: int) -> str:
    """Why a stable verdict read from fewer than `EMA_SPAN` losses is weak evidence."""
    return (f"Judged from only {records} record{'' if records == 1 else 's'}, fewer than the {EMA_SPAN} "
            f"the loss is smoothed over: its final smoothed loss still gives its first loss a weight of "
            f"{first_loss_weight(records):.0%}, which narrows its gap to what the model should reach, so "
            f"a stable verdict here is weak evidence. Record more often (log_every) or train longer.")


class LossTrack:
    """The loss's EMA (span `ema_span`), its running best and the step it was reached at,
    and its recent losses, to tell a stall from learning over `window` records."""

    def __init__(self, ema_span: int = EMA_SPAN, window: int = 20) -> None:
        self._ema = Ema(ema_span)
        self.best = math.inf
        self.best_step: Any = None
        self._window = window
        self._recent: deque[float] = deque(maxlen=window + STALL_EXTRA)

    @property
    def smoothed(self) -> float | None:
        return self._ema.value

    def update(self, record: Mapping[str, Any]) -> float | None:
        loss = finite_scalar(record, "loss")
        if loss is not None:
            smoothed = self._ema.update(loss)
            if smoothed < self.best:
                self.best, self.best_step = smoothed, record.get("step")
            self._recent.append(loss)
        return loss

    def above_best(self, floor: float = 0.0) -> float | None:
        """Smoothed loss over its running best (or `floor`, when the best is under it),
        minus one; None before any loss."""
        base = max(self.best, floor)
        if self.smoothed is None or not base > 0:
            return None
        return self.smoothed / base - 1

    def progress(self) -> float | None:
        """Relative fall of the loss over the last `window` records (positive: still
        learning), read from the Theil–Sen line through the recent losses: its fall over
        the window over its value at the window's start. None until that much history
        exists, or where that value is not positive."""
        line = self._line()
        if line is None:
            return None
        slope, intercept = line
        before = intercept + slope * (len(self._recent) - 1 - self._window)
        return -slope * self._window / before if before > 0 else None

    def ahead(self, records: int) -> float | None:
        """Where the line `progress` reads puts the loss `records` after the last one: its
        pace carried on (the raw losses' trend, without the EMA's lag). None until
        `progress` has its history."""
        line = self._line()
        if line is None:
            return None
        slope, intercept = line
        return intercept + slope * (len(self._recent) - 1 + records)

    def _line(self) -> tuple[float, float] | None:
        if len(self._recent) < self._recent.maxlen:
            return None
        return theil_sen(self._recent)

    def current_median(self) -> float | None:
        if len(self._recent) < MEDIAN_OF:
            return None
        return statistics.median(list(self._recent)[-MEDIAN_OF:])


@functools.cache
def _pairs(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    first, second = np.triu_indices(count, 1)
    return first, second, (second - first).astype(float)


def theil_sen(values: Sequence[float]) -> tuple[float, float]:
    """(slope, intercept) of the Theil–Sen line through `values` at positions 0, 1, ...: the
    median of the slopes between every pair, and the median of what is left under it.
    `scipy.stats.theilslopes` gives the slope too, in 10× the time (it also computes a
    confidence interval), on a line the detectors may read at every record."""
    y = np.asarray(values, dtype=float)
    first, second, apart = _pairs(len(y))
    slope = float(np.median((y[second] - y[first]) / apart))
    return slope, float(np.median(y - slope * np.arange(len(y))))


# A batch counts at most this many times the smoothed loss in a rise (`loss_rise`,
# `Symptoms.rising`): one odd batch moves the EMA by a bounded amount.
RISE_BATCH_CAP = 1.5
# Records a rise is read over (`RecentRise`): a rise slower than this is a trend,
# `slow_divergence`'s (over the same window).
RISE_BEST_WINDOW = 100
# σ of the smoothed loss's noise a rise must also reach. On a flat loss with Gaussian noise
# (simulated, no run: `benchmarks/loss_rise_null.py`), 8 σ gives 0.6 warnings per 10k
# records and 7 σ 1.8: the false-warning target is ≤ 1.
RISE_NOISE_Z = 8.0
# Fewer second differences than this say nothing about the noise: the gap alone applies.
MIN_NOISE_DIFFERENCES = 10
# For white noise of σ, a second difference x[t+1] − 2x[t] + x[t−1] has σ·√6, and the
# median of its size is 0.6745 × that. Second differences cancel a linear trend, so a
# loss falling (or rising) steadily does not read as noise.
SECOND_DIFFERENCE_MAD = 0.6745 * math.sqrt(6)


@dataclass(frozen=True)
class RiseState:
    """Where the smoothed loss stands against the best of its recent window."""
    smoothed: float
    best: float
    best_step: Any
    noise: float | None  # σ of the smoothed loss at the best (relative); None: unknown
    needed: float  # the rise that counts: max(gap, noise_z × noise)
    floor: float = 0.0  # a rise is read from max(best, floor) (`RecentRise`)

    @property
    def base(self) -> float:
        return max(self.best, self.floor)

    @property
    def above(self) -> float | None:
        return self.smoothed / self.base - 1 if self.base > 0 else None

    @property
    def risen(self) -> bool:
        above = self.above
        return above is not None and above >= self.needed


class RiseRun(Sequence[RiseState]):
    """The states `RecentRise.run` gives, as columns; a `RiseState` is built only where one
    is read."""

    def __init__(self, smoothed: np.ndarray, best: np.ndarray, best_steps: Sequence[Any],
                 noise: np.ndarray, needed: np.ndarray, floor: float) -> None:
        self.smoothed, self.best, self._best_steps = smoothed, best, best_steps
        self.noise, self.needed, self.floor = noise, needed, floor  # noise: NaN where unknown
        base = np.maximum(best, floor)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.risen = (base > 0) & (smoothed / base - 1 >= needed)  # `RiseState.risen`

    @classmethod
    def of(cls, states: Sequence[RiseState], floor: float) -> RiseRun:
        return cls(np.array([state.smoothed for state in states], dtype=float),
                   np.array([state.best for state in states], dtype=float),
                   [state.best_step for state in states],
                   np.array([math.nan if state.noise is None else state.noise for state in states],
                            dtype=float),
                   np.array([state.needed for state in states], dtype=float), floor)

    def __len__(self) -> int:
        return len(self.smoothed)

    def __getitem__(self, index: int) -> RiseState:  # type: ignore[override]
        noise = float(self.noise[index])
        return RiseState(float(self.smoothed[index]), float(self.best[index]),
                         self._best_steps[index], None if math.isnan(noise) else noise,
                         float(self.needed[index]), self.floor)


class RecentRise:
    """A loss that has risen: its EMA (span `ema_span`, each batch counted at most
    `batch_cap` × it when given) at least `gap`, and at least `noise_z` σ of its own noise,
    above the lowest EMA of its last `best_window` records. The noise is read at that best:
    the robust σ of the log loss over the `best_window` losses up to it (the median size of
    second differences; for a best among the first records, before there is enough to read
    it, the noise now), times the EMA's noise factor √(α / (2 − α)).

    Why not the running best over the whole run: on a flat noisy loss that best is the
    deepest noise dip so far, and the EMA stands ever further above it. Why the noise at the
    best: a rise read against the noise it rose from, not the noise of the rise itself.

    A best under `floor` is read as the floor: the rise is measured from there."""

    def __init__(self, ema_span: int, gap: float, best_window: int = RISE_BEST_WINDOW,
                 noise_z: float = RISE_NOISE_Z, batch_cap: float | None = None,
                 floor: float = 0.0) -> None:
        self.gap, self.noise_z, self.batch_cap, self.floor = gap, noise_z, batch_cap, floor
        self._ema_span = ema_span
        self._ema = Ema(ema_span)
        self._factor = math.sqrt(self._ema.alpha / (2 - self._ema.alpha))
        self._best_window = best_window
        self._logs: deque[float] = deque(maxlen=best_window)
        # The second differences' sizes of `_logs`, kept as they come: one new per loss.
        self._sizes: deque[float] = deque(maxlen=best_window - 2)
        # (index, smoothed, step, noise) of the records that can still be the window's lowest:
        # each lower than every one before it, so the first is the lowest (the earliest of
        # equals), as `min` over the whole window would find it.
        self._candidates: deque[tuple[int, float, Any, float | None]] = deque()
        self._count = 0

    @property
    def noise_key(self) -> tuple[int, int]:
        """What `noises` depends on besides the losses: rises alike here share them."""
        return self._best_window, self._ema_span

    def update(self, loss: float, step: Any) -> RiseState:
        if loss > 0:
            self._logs.append(math.log(loss))
            if len(self._logs) >= 3:
                before, now, after = self._logs[-3], self._logs[-2], self._logs[-1]
                self._sizes.append(abs(after - 2 * now + before))
        else:  # no log scale to read noise on
            self._logs.clear()
            self._sizes.clear()
        return self._advance(loss, step, self._noise())

    def run(self, losses: Sequence[float], steps: Sequence[Any],
            noises: np.ndarray | None = None) -> RiseRun:
        """`update` over `losses` (at `steps`) in order: the same states, as columns. Where
        the losses are all positive and finite and nothing came before (a replay over whole
        columns), the noise of every window is taken in one numpy pass (or from `noises`,
        what `noises(losses)` gave for a rise of the same window and span) and the window's
        lowest in another."""
        fresh = not self._count
        if fresh and noises is None:
            noises = self.noises(losses)
        if not fresh or noises is None or not len(losses):
            return RiseRun.of([self.update(loss, step) for loss, step in zip(losses, steps)],
                              self.floor)
        smoothed = self._smoothed(losses)
        window = self._best_window
        # The earliest lowest of each record's window, as `_candidates` keeps it: argmin
        # gives the first of equals; the +inf before the first record is never picked
        # over a finite EMA.
        padded = np.concatenate([np.full(window - 1, np.inf), smoothed])
        best_index = (np.argmin(np.lib.stride_tricks.sliding_window_view(padded, window), axis=1)
                      + np.arange(len(smoothed)) - (window - 1))
        noise = noises[best_index]
        # A best from before the noise could be read: read it now.
        noise = np.where(np.isnan(noise), noises, noise)
        needed = np.where(np.isnan(noise), self.gap, np.maximum(self.gap, self.noise_z * noise))
        self._continue_after(losses, steps, smoothed, noises)
        return RiseRun(smoothed, smoothed[best_index], [steps[index] for index in best_index.tolist()],
                       noise, needed, self.floor)

    def noises(self, losses: Sequence[float]) -> np.ndarray | None:
        """The noise `update` reads after each of `losses` from a fresh state (NaN where
        none can be read yet), in one numpy pass; None where a loss is not positive and
        finite (no log scale to read it on)."""
        if not all(0 < loss < math.inf for loss in losses):
            return None
        logs = np.array([math.log(loss) for loss in losses])  # as `update` takes each
        sizes = np.abs(logs[2:] - 2 * logs[1:-1] + logs[:-2])
        return self._noises(sizes, len(losses))

    def _smoothed(self, losses: Sequence[float]) -> np.ndarray:
        """The EMA after each loss from a fresh state, as `update` computes it: finite for
        finite losses, each value lying between the one before and the loss."""
        ema = Ema(self._ema_span)
        return np.array([ema.update(capped(loss, ema.value, self.batch_cap)) for loss in losses])

    def _continue_after(self, losses: Sequence[float], steps: Sequence[Any],
                        smoothed: np.ndarray, noises: np.ndarray) -> None:
        """The state `update` would have left after `losses`, so records may follow."""
        logs = [math.log(loss) for loss in losses[-self._best_window:]]
        self._logs.extend(logs)
        self._sizes.extend(abs(after - 2 * now + before)
                           for before, now, after in zip(logs, logs[1:], logs[2:]))
        start = max(0, len(losses) - self._best_window)
        self._count = start
        for index in range(start, len(losses)):
            noise = float(noises[index])
            self._ema.value = None if index == 0 else float(smoothed[index - 1])
            self._advance(losses[index], steps[index], None if math.isnan(noise) else noise)

    def _noises(self, sizes: np.ndarray, records: int) -> np.ndarray:
        """`_noise` after each of `records`, from a fresh state and the second differences'
        sizes of their logs, NaN where it is None: the median of those in each record's
        window, the same floats `statistics.median` gives (the middle one, or the mean of
        the middle two)."""
        from scipy.ndimage import rank_filter  # a sliding order statistic, 20× np.median's speed

        full = self._sizes.maxlen  # sizes in a full window
        medians = [float(np.median(sizes[:count]))
                   for count in range(MIN_NOISE_DIFFERENCES, min(len(sizes) + 1, full))]
        if len(sizes) >= full:
            # The window centred at c spans c − full//2 … c + (full − 1) − full//2: the full
            # windows, in order, are those centred from full//2 on.
            start, count = full // 2, len(sizes) - full + 1
            middles = [rank_filter(sizes, rank, size=full)[start:start + count]
                       for rank in sorted({(full - 1) // 2, full // 2})]
            medians += (middles[0] if len(middles) == 1 else (middles[0] + middles[1]) / 2).tolist()
        scaled = np.array(medians) / SECOND_DIFFERENCE_MAD * self._factor
        return np.concatenate([np.full(records - len(scaled), math.nan), scaled])

    def _advance(self, loss: float, step: Any, noise_now: float | None) -> RiseState:
        smoothed = self._ema.update(capped(loss, self._ema.value, self.batch_cap))
        while self._candidates and self._candidates[-1][1] > smoothed:
            self._candidates.pop()
        self._candidates.append((self._count, smoothed, step, noise_now))
        if self._candidates[0][0] <= self._count - self._best_window:
            self._candidates.popleft()
        self._count += 1
        _, best, best_step, noise = self._candidates[0]
        if noise is None:  # a best from before the noise could be read: read it now
            noise = noise_now
        needed = self.gap if noise is None else max(self.gap, self.noise_z * noise)
        return RiseState(smoothed, best, best_step, noise, needed, self.floor)

    def _noise(self) -> float | None:
        if len(self._logs) < MIN_NOISE_DIFFERENCES + 2:
            return None
        return statistics.median(self._sizes) / SECOND_DIFFERENCE_MAD * self._factor


def validate_rise(best_window: int, noise_z: float) -> None:
    require(best_window >= 2 * MIN_NOISE_DIFFERENCES,
            f"best_window must be >= {2 * MIN_NOISE_DIFFERENCES}, got {best_window}")
    require(noise_z >= 0, f"noise_z must be >= 0, got {noise_z}")


class Symptoms:
    """The loss or representation symptom that turns a warning into a collapse: the loss
    rose ≥ `gap` above its best (a best under `floor`, the line under which a model has
    solved its data, read as that line: `solved_line`), or all positions became
    identical. (An expected loss is what a model reaches at the end of its training; a run
    in mid-course is not behind it in any sense that tells a collapse, so it is judged at
    the end, by `failed_to_train`.)

    `rising` is the earlier sign a mechanism may warn on, never a collapse by itself: the
    loss has begun to rise, read against its own noise rather than the labels' 10 %. Only a
    detector that asks for it (`reads_rise`) pays for reading that noise every record."""

    def __init__(self, gap: float, min_progress: float = MIN_PROGRESS, window: int = 20,
                 reads_rise: bool = False, floor: float = 0.0, positions: bool = True) -> None:
        self.gap, self.min_progress, self.floor = gap, min_progress, floor
        self.positions = positions  # whether identical positions are a symptom here
        self.loss = LossTrack(window=window)
        self._rise = (RecentRise(EMA_SPAN, 0.0, batch_cap=RISE_BATCH_CAP, floor=floor)
                      if reads_rise else None)
        self.rise_state: RiseState | None = None
        self._record: Mapping[str, Any] = {}

    def update(self, record: Mapping[str, Any]) -> None:
        loss = self.loss.update(record)
        if loss is not None and self._rise is not None:
            self.rise_state = self._rise.update(loss, record.get("step"))
        self._record = record

    def rising(self) -> str | None:
        """One clause when the loss has begun to rise, or None: its EMA (one batch counted
        at most `RISE_BATCH_CAP` × it) `RISE_NOISE_Z` σ of its noise or more above the best
        of its last `RISE_BEST_WINDOW` records, and the median of its last 5 losses above
        that best too, so that one odd batch cannot make it. On a flat loss with Gaussian
        batch noise of 2–10 % that happens 0.4–0.8 times per 10k records (simulated; the
        8 σ is `loss_rise`'s, from `benchmarks/loss_rise_null.py`). Unknown (None) until the
        noise can be read."""
        # The rise is read with no gap, so `risen` is the noise rule alone once it is known.
        state, median = self.rise_state, self.loss.current_median()
        if (state is None or state.noise is None or not state.risen
                or median is None or not median > state.base):
            return None
        significance = (f"{state.above / state.noise:.0f}σ of its noise" if state.noise > 0
                        else "it had no noise")
        return (f"the loss has begun to rise: smoothed {state.smoothed:.4g}, "
                f"{100 * state.above:.1f}% ({significance}) above "
                + (solved_clause(state.floor, state.best) if state.floor > state.best else
                   f"its recent best {state.best:.4g} (step {state.best_step})"))

    def current(self, representation: bool = True) -> str | None:
        """One clause naming the symptom present now, or None; `representation=False`
        leaves identical positions out (for a detector that is itself a consequence), as
        does `positions=False` at construction (where they cost the run nothing:
        `ReferenceLineConfig.context_free_line_holds`)."""
        above = self.loss.above_best(self.floor)
        if above is not None and above >= self.gap:
            return (f"the smoothed loss {self.loss.smoothed:.4g} is {100 * above:.0f}% above "
                    + (solved_clause(self.floor, self.loss.best) if self.floor > self.loss.best
                       else f"its best {self.loss.best:.4g}"))
        loop = collapsed_from(self._record) if representation and self.positions else None
        if loop is not None:
            return f"all positions carry the same vector from loop {loop} on"
        return None

    def stalled(self) -> bool:
        """The loss fell by less than `min_progress` over the window (`LossTrack.progress`;
        False without enough loss history to tell)."""
        progress = self.loss.progress()
        return progress is not None and progress < self.min_progress


def learned_past_token_frequencies(loss: Any, context_free_loss: float | None, margin: float) -> Any:
    """Whether a loss (a float, or an array of them) is more than `margin` below what the
    data's token frequencies alone give: a model there reads its input. False while the
    context-free loss is unknown."""
    return context_free_loss is not None and loss < (1 - margin) * context_free_loss


def reference_at_token_frequencies(expected_loss: float | None,
                                   context_free_loss: float | None,
                                   margin: float = CONTEXT_FREE_MARGIN) -> bool:
    """Whether a reference (`expected_loss`, what the same model with one loop reached) ended
    at the data's token-frequency level: from `margin` below the context-free loss to
    `FREQUENCIES_LEARNED_WITHIN` above it. The context-free line assumes the data holds more
    than the margin for a model to learn within its budget; a reference that stopped at that
    level shows this data does not (on a DNA-like text of order-3 Markov bases, 4 % below its
    token frequencies, the one-loop model was 0.06 % below after 150 steps and 2 % after
    600, still learning; on random characters 0.13 % above), and a run stuck there is then no
    further behind than its reference: the gap to the reference judges it, not the line. A
    reference higher than that did not learn even the token frequencies, which a model that
    trains learns in its first steps: it failed to train itself and says nothing of the data,
    so the line still judges (the main job at lr 1e-4: every run, the one-loop models
    included, stalled at 1.13× the context-free loss)."""
    return (expected_loss is not None and context_free_loss is not None
            and not learned_past_token_frequencies(expected_loss, context_free_loss, margin)
            and expected_loss <= (1 + FREQUENCIES_LEARNED_WITHIN) * context_free_loss)


def solved_line(config: Any) -> float:
    """The loss under which a model has solved its data: a detector config's
    `context_free_margin` × its `context_free_loss` (0 while that is unknown). There its
    loss is set by rare confident misses, and a rise or a gap is read from this line rather
    than from the loss (`behind_from`)."""
    if config.context_free_loss is None:
        return 0.0
    return config.context_free_margin * config.context_free_loss


def solved_clause(floor: float, best: float) -> str:
    """What a rise is read from when the best got under the solved line `floor`."""
    return f"{floor:.4g}, the line its best {best:.4g} got under (it had solved its data)"


def validate_context_free(context_free_loss: float | None, margin: float) -> None:
    """The checks of a config's `context_free_loss` and `context_free_margin`."""
    validate_loss(context_free_loss, "context_free_loss")
    require(0 <= margin < 1, f"context_free_margin must be in [0, 1), got {margin}")


@dataclass(frozen=True)
class SolvedLineConfig(DetectorConfig):
    """The data's context-free loss (what its token frequencies alone give; None: unknown)
    and the margin, the labels' 10 %, that draws two lines from it: a loss within the margin
    below it learned next to nothing that needs the input (`learned_past_token_frequencies`),
    and one under margin × it has solved its data, so a rise or a gap is read from that line
    (`solved_line`, `behind_from`). Shared by every detector that reads either line."""

    context_free_loss: float | None = None
    context_free_margin: float = CONTEXT_FREE_MARGIN

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_context_free(self.context_free_loss, self.context_free_margin)


@dataclass(frozen=True)
class ReferenceLineConfig(SolvedLineConfig):
    """`SolvedLineConfig` and the loss the same model reaches with one loop (`expected_loss`;
    None: no reference), which tells whether the context-free line can judge a run here
    (`context_free_line_holds`). Identical positions predict only the token marginals, so
    they are a collapse only where the data holds more than those: on text of uniformly
    random characters the one-loop models ended at the context-free loss and the looped
    ones with every position identical, no worse."""

    expected_loss: float | None = None
    # Whether the reference's loss was still falling at its end (`still_learning` of its
    # curve): then its budget, not the data, kept it within the line. The main job cut to
    # 45 steps left its one-loop model at 3.07 against a line of 2.94, falling 11 % over its
    # last 20 records; on random characters it sat at the line, 0.03 % better over as many.
    reference_learning: bool = False
    # The lowest loss the same model is known to reach on this data in any setting (a
    # suite's one-loop runs at every learning rate; None: unknown). Past the line, it shows
    # the data holds more than its token frequencies, wherever a slower reference stalled:
    # on locale definitions the one-loop models stalled at 0.957× the context-free loss at
    # lr 2e-4 and reached 0.40× at 3e-3.
    best_known_loss: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_loss(self.expected_loss)
        validate_loss(self.best_known_loss, "best_known_loss")
        require(isinstance(self.reference_learning, bool),
                f"reference_learning must be true or false, got {self.reference_learning!r}")

    @property
    def context_free_line_holds(self) -> bool:
        """Whether a loss at the context-free level, or positions that can only predict it,
        can judge a run: not when the reference ended at that level itself
        (`reference_at_token_frequencies`) and stopped learning there, unless the same model
        got past the line in another setting (`best_known_loss`)."""
        return (self.reference_learning
                or not reference_at_token_frequencies(self.expected_loss, self.context_free_loss,
                                                      self.context_free_margin)
                or (self.best_known_loss is not None and learned_past_token_frequencies(
                    self.best_known_loss, self.context_free_loss, self.context_free_margin)))


def still_learning(losses: Sequence[tuple[int, float]]) -> bool:
    """Whether a loss curve ((step, loss) pairs: a reference's records) was still falling at
    its end: it fell by `MIN_PROGRESS` or more over the last 20 records, the
    stall rule's test read the other way."""
    track = LossTrack()
    for step, loss in losses:
        track.update({"step": step, "loss": loss})
    progress = track.progress()
    return progress is not None and progress >= MIN_PROGRESS


def behind_from(expected: float, context_free_loss: float | None, gap: float, margin: float) -> float:
    """The loss from which a run is behind `expected`: `gap` above it, or, for a reference
    under `margin` × the context-free loss (when that is known), `gap` above that line. Such
    a reference learned nearly all the data holds (the loss of a task whose answer follows
    from its prompt heads to 0); a gap relative to what little is left measures how sure its
    right answers are, so a run is behind it only if it did not get near that regime too."""
    base = expected if context_free_loss is None else max(expected, margin * context_free_loss)
    return (1 + gap) * base


def times(ratio: float) -> str:
    """A large ratio as a reader takes it in: "280×", "1,160×"."""
    return f"{ratio:.3g}×" if ratio < 1000 else f"{ratio:,.0f}×"


def validate_loss(value: float | None, name: str = "expected_loss") -> None:
    """The check every loss-valued threshold (`expected_loss`, `context_free_loss`) shares:
    None or > 0."""
    if value is None:
        return
    require(isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0,
            f"{name} must be a positive number, got {value!r}")
