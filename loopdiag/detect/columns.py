"""A run's records as columns, for judging the whole run at once (`Detector.replay_columns`).

Each array holds, per record, what the per-record readers (`raw_scalar`, `finite_scalar`,
`loop_values`) would return for it, so a vectorised judgement reads the same numbers as
`_check`. Arrays are built on first use and shared by every detector of one replay.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from itertools import chain
from typing import Any

import numpy as np

from loopdiag.detect.base import Ema, is_int, loop_values, raw_scalar
from loopdiag.detect.symptoms import (
    EMA_SPAN,
    MIN_PROGRESS,
    RISE_BATCH_CAP,
    STALL_EXTRA,
    LossTrack,
    RecentRise,
    RiseRun,
    RiseState,
    Symptoms,
)

# Judgement of one record by a vectorised pass: `_check` returns UNJUDGED there, None
# there, something the detector must judge exactly (`OPEN`), or certainly a Finding whose
# content is judged exactly only if the hysteresis may let it fire (`FOUND`).
UNJUDGED_CODE, CLEAR_CODE, OPEN_CODE, FOUND_CODE = 0, 1, 2, 3
# Certainly a Finding of a known severity: silenced by a latch at that severity or above
# without being worked out. FOUND_CODE's severity is unknown, so only a critical latch
# silences it.
FOUND_INFO_CODE, FOUND_WARN_CODE = 4, 5
# Relative margin around a threshold inside which a statistic computed over whole
# columns (summed or ordered differently from the per-record path) is recomputed exactly.
MARGIN = 1e-7

_PLAIN_NUMBERS = frozenset({float, int})


class RecordColumns:
    """The records of one run and, built on demand, their columns."""

    def __init__(self, records: Sequence[Mapping[str, Any]]) -> None:
        self.records = records
        self._cache: dict[Hashable, Any] = {}

    def __len__(self) -> int:
        return len(self.records)

    def cached(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    # --- per-record readers, as arrays --------------------------------------------------

    def raw(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(`raw_scalar` of every record with NaN where it is None, where it is not None)."""
        return self.cached(("raw", key), lambda: self._raw(key))

    def _raw(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        values = [record.get(key) for record in self.records]
        if set(map(type, values)) <= _PLAIN_NUMBERS:
            return np.array(values, dtype=float), np.ones(len(values), dtype=bool)
        numbers = [raw_scalar(record, key) for record in self.records]
        present = np.array([number is not None for number in numbers], dtype=bool)
        return np.array([math.nan if n is None else n for n in numbers], dtype=float), present

    def finite(self, key: str) -> np.ndarray:
        """`finite_scalar` of every record, NaN where it is None."""
        def compute() -> np.ndarray:
            values, _ = self.raw(key)
            return np.where(np.isfinite(values), values, math.nan)
        return self.cached(("finite", key), compute)

    def loops(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(`loop_values` of every record as rows NaN-padded to the most loops, its length:
        0 where `loop_values` is None)."""
        return self.cached(("loops", key), lambda: self._loops(key))

    def _loops(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        values = [record.get(key) for record in self.records]
        if all(type(value) is list and value for value in values):
            flat = list(chain.from_iterable(values))
            if set(map(type, flat)) <= _PLAIN_NUMBERS:
                lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
                return _grid(np.array(flat, dtype=float), lengths), lengths
        arrays = [loop_values(record, key) for record in self.records]
        lengths = np.array([0 if a is None else len(a) for a in arrays], dtype=np.int64)
        flat = np.concatenate([a for a in arrays if a is not None] or [np.empty(0)])
        return _grid(flat, lengths), lengths

    def last_loop(self, key: str) -> np.ndarray:
        """The last loop's value of `key` per record, NaN where the record has none."""
        def compute() -> np.ndarray:
            grid, lengths = self.loops(key)
            rows = np.flatnonzero(lengths)
            last = np.full(len(lengths), math.nan)
            last[rows] = grid[rows, lengths[rows] - 1]
            return last
        return self.cached(("last_loop", key), compute)

    def int_steps(self) -> tuple[np.ndarray, np.ndarray]:
        """(the step of every record as int64, 0 where it is not an integer; where it is)."""
        def compute() -> tuple[np.ndarray, np.ndarray]:
            steps = [record.get("step") for record in self.records]
            if set(map(type, steps)) <= {int}:
                return np.array(steps, dtype=np.int64), np.ones(len(steps), dtype=bool)
            valid = np.array([is_int(step) for step in steps], dtype=bool)
            return np.array([int(s) if ok else 0 for s, ok in zip(steps, valid)],
                            dtype=np.int64), valid
        return self.cached("int_steps", compute)

    def step(self, index: int) -> Any:
        """The record's `step` as logged (what the per-record evidence quotes)."""
        return self.records[index].get("step")

    def last_steps(self) -> np.ndarray:
        """`last_step` of every record."""
        def compute() -> np.ndarray:
            steps, valid = self.int_steps()
            return np.where(valid, steps, np.arange(1, len(steps) + 1))
        return self.cached("last_steps", compute)

    def last_step(self, index: int) -> int:
        """`Detector._last_step` after the record at `index`."""
        step = self.records[index].get("step")
        return int(step) if is_int(step) else index + 1

    # --- the loss as `LossTrack` follows it ----------------------------------------------

    def loss_history(self, ema_span: int = 20) -> LossHistory:
        return self.cached(("loss_history", ema_span), lambda: LossHistory(self, ema_span))

    def loss_track_at(self, index: int, window: int, ema_span: int = 20) -> LossTrack:
        """The `LossTrack(ema_span, window)` a detector holds after the record at `index`."""
        return self.loss_history(ema_span).track_at(index, window)

    def symptoms_at(self, index: int, gap: float, min_progress: float = MIN_PROGRESS,
                    window: int = 20, reads_rise: bool = False, floor: float = 0.0,
                    positions: bool = True) -> Symptoms:
        """The `Symptoms` a detector holds after the record at `index` (constructed with
        the same `reads_rise`, `floor` and `positions`: only then is the rise read, once
        per run)."""
        symptoms = Symptoms(gap, min_progress, window, floor=floor, positions=positions)
        symptoms.loss = self.loss_track_at(index, window)
        if reads_rise:
            symptoms.rise_state = self.rise_state_at(index, floor)
        symptoms._record = self.records[index]
        return symptoms

    def loss_positions(self) -> np.ndarray:
        """The indices of the records with a finite loss."""
        return self.cached("loss_positions", lambda: np.flatnonzero(np.isfinite(self.finite("loss"))))

    def rise_run(self, rise: RecentRise) -> RiseRun:
        """`rise` run over the finite losses (a fresh `RecentRise`); the noise it reads is
        taken once per run for every rise of the same window and span."""
        positions = self.loss_positions()
        losses = self.cached("finite_losses", lambda: self.finite("loss")[positions].tolist())
        steps = self.cached("loss_steps", lambda: [self.step(index) for index in positions.tolist()])
        noises = self.cached(("rise_noises", rise.noise_key), lambda: rise.noises(losses))
        return rise.run(losses, steps, noises)

    def rise_state_at(self, index: int, floor: float = 0.0) -> RiseState | None:
        """`Symptoms.rise_state` after the record at `index`: the same `RecentRise` over the
        finite losses, held through records without one."""
        run = self.cached(("rise_run", floor), lambda: self.rise_run(
            RecentRise(EMA_SPAN, 0.0, batch_cap=RISE_BATCH_CAP, floor=floor)))
        position = int(np.searchsorted(self.loss_positions(), index, side="right")) - 1
        return run[position] if position >= 0 else None


class LossHistory:
    """The finite losses of a run in order, with `LossTrack`'s EMA, running best and the
    record it was reached at after each, computed by the same float operations in the same
    order."""

    def __init__(self, columns: RecordColumns, ema_span: int) -> None:
        loss = columns.finite("loss")
        self.columns = columns
        self.positions = np.flatnonzero(np.isfinite(loss))
        self.losses: list[float] = loss[self.positions].tolist()
        # finite losses among the records up to and including each record
        self.counts = np.cumsum(np.isfinite(loss))
        self.ema_span = ema_span
        ema = Ema(ema_span)
        self.smoothed: list[float] = []
        self.bests: list[float] = []
        self.best_positions: list[int] = []
        best, best_position = math.inf, -1
        for position, loss_value in zip(self.positions.tolist(), self.losses):
            value = ema.update(loss_value)
            if value < best:
                best, best_position = value, position
            self.smoothed.append(value)
            self.bests.append(best)
            self.best_positions.append(best_position)

    def track_at(self, index: int, window: int) -> LossTrack:
        track = LossTrack(self.ema_span, window)
        seen = int(self.counts[index]) if index >= 0 else 0
        if seen:
            track._ema.value = self.smoothed[seen - 1]
            track.best = self.bests[seen - 1]
            track.best_step = self.columns.step(self.best_positions[seen - 1])
            track._recent.extend(self.losses[max(0, seen - window - STALL_EXTRA):seen])
        return track


# --- pieces of vectorised judgements ----------------------------------------------------

def codes(judged: np.ndarray, flagged: np.ndarray, *, certain: bool | np.ndarray = False
          ) -> np.ndarray:
    """Per-record codes from masks: UNJUDGED off `judged`, else OPEN on `flagged` (FOUND
    where a flagged record is `certain` to be a Finding), else CLEAR."""
    flag = np.where(certain, FOUND_CODE, OPEN_CODE)
    return np.where(judged, np.where(flagged, flag, CLEAR_CODE), UNJUDGED_CODE).astype(np.int8)


def highest_severity(codes: np.ndarray) -> np.ndarray:
    """Per code, the rank (in `SEVERITIES`) of the highest severity a certain finding can
    have; -1 for a record that must be judged."""
    return np.select([codes == FOUND_INFO_CODE, codes == FOUND_WARN_CODE, codes == FOUND_CODE],
                     [0, 1, 2], -1)


def expand(positions: np.ndarray, values: np.ndarray, size: int, fill: Any = 0) -> np.ndarray:
    """Values of a subsequence placed back at their records' positions, `fill` elsewhere."""
    out = np.full(size, fill, dtype=np.result_type(values, np.asarray(fill)))
    out[positions] = values
    return out


def streaks(flags: np.ndarray) -> np.ndarray:
    """At each position, how many positions in a row up to and including it are True."""
    index = np.arange(len(flags))
    last_false = np.maximum.accumulate(np.where(flags, -1, index))
    return np.where(flags, index - last_false, 0)


def judged_streaks(judged: np.ndarray, flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per record, how many judged records in a row up to it have `flags`, skipping
    unjudged ones; the index of the first of them). A detector's `_streak` and `_since`."""
    positions = np.flatnonzero(judged)
    run = streaks(flags[positions])
    streak = expand(positions, run, len(judged))
    first = expand(positions, positions[np.arange(len(positions)) - np.maximum(run - 1, 0)],
                   len(judged))
    return streak, first


def near(values: np.ndarray, threshold: float) -> np.ndarray:
    """Where `values` lie within `MARGIN` (relative) of `threshold`: a comparison there is
    made again with the per-record formula."""
    scale = np.abs(values) + abs(threshold)
    return np.abs(values - threshold) <= MARGIN * scale


def trailing_medians(values: np.ndarray, size: int) -> np.ndarray:
    """Median of the last `size` values up to each position (fewer at the start), to within
    rounding of `statistics.median`; callers recompute near their thresholds."""
    import pandas as pd

    if not len(values):
        return np.empty(0)
    return pd.Series(values).rolling(size, min_periods=1).median().to_numpy()


def trailing_means(values: np.ndarray, size: int) -> np.ndarray:
    """Mean of the last `size` values at each position from `size - 1` on (NaN before), to
    within rounding of `statistics.fmean`; callers recompute near their thresholds."""
    out = np.full(len(values), math.nan)
    if len(values) >= size:
        windows = np.lib.stride_tricks.sliding_window_view(values, size)
        out[size - 1:] = windows.sum(axis=1) / size
    return out


def _grid(flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    width = int(lengths.max(initial=0))
    if width and (lengths == width).all():
        return flat.reshape(len(lengths), width)
    grid = np.full((len(lengths), width), math.nan)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    grid[rows, np.arange(len(flat)) - starts] = flat
    return grid
