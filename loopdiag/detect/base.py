"""The detector protocol: events, validated configs, warm-up and hysteresis, replay.

A detector reads one record at a time (`update`) and returns the events it fires. The
same object runs online, fed by the recorder, and offline, fed by `replay` over a saved
run, so a verdict never depends on where it was made.

Counts (warm-up, windows, patience, cooldown) are in records, i.e. logged steps: a
detector knows only what it is shown. With `log_every = n` a window of 50 records spans
50·n training steps; scale the counts down when logging sparsely.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final

import numpy as np

if TYPE_CHECKING:
    from loopdiag.detect.columns import RecordColumns

SEVERITIES: Final = ("info", "warn", "critical")
_RANK: Final = {severity: rank for rank, severity in enumerate(SEVERITIES)}


@dataclass(frozen=True)
class Event:
    """One firing: what was seen (`message`, one sentence with the numbers) and the values
    and window behind it (`evidence`, plain JSON values; NaN/Inf as the store writes them)."""

    step: int
    detector: str
    severity: str
    message: str
    evidence: dict[str, Any]

    def __post_init__(self) -> None:
        if self.severity not in _RANK:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "detector": self.detector, "severity": self.severity,
                "message": self.message, "evidence": plain(self.evidence)}


@dataclass(frozen=True)
class Finding:
    """What `_check` reports when its condition holds on a record."""

    severity: str
    message: str
    evidence: dict[str, Any]


class Unjudged:
    def __repr__(self) -> str:
        return "UNJUDGED"


# `_check` returns this when the record lacks what the detector reads. Such a record
# neither fires nor counts towards clearing the condition.
UNJUDGED: Final = Unjudged()


@dataclass(frozen=True)
class DetectorConfig:
    """Thresholds shared by every detector. Subclasses (frozen dataclasses too: a detector
    sizes its windows from them once) add theirs with defaults, and range checks in
    `_validate`; field types are checked from the annotations, so a suite file cannot
    smuggle a string or a bool into a threshold."""

    warmup: int = 0  # records before the detector may fire
    cooldown: int = 10  # clear records before the same severity may fire again (0: no latch)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", int) and not is_int(value):
                raise ValueError(f"{field.name} must be an integer, got {value!r}")
            if field.type in ("float", float):
                if not _is_number(value) or not math.isfinite(value):
                    raise ValueError(f"{field.name} must be a finite number, got {value!r}")
                object.__setattr__(self, field.name, float(value))  # 8 → 8.0
        require(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        require(self.cooldown >= 0, f"cooldown must be >= 0, got {self.cooldown}")
        self._validate()

    def _validate(self) -> None:
        """Range checks of a subclass's own fields (types are already checked)."""


class Detector(ABC):
    """A streaming detector: `update(record) -> events`.

    Hysteresis: once a severity has fired, that severity (and any lower one) stays quiet
    until the condition has been clear for `cooldown` judged records in a row; a higher
    severity (warn → critical) fires at once. Subclasses implement `_check` (one record →
    a `Finding`, None when the condition is clear, or `UNJUDGED`) and `_reset_state`.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[DetectorConfig]] = DetectorConfig
    # What a critical event of this detector says broke ("representation", "gradient",
    # "residual", "plateau", "loss"); the verdict names it. None: not a collapse detector.
    mechanism: ClassVar[str | None] = None
    # Record keys the detector reads, named when a run never carries any of them.
    reads: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: DetectorConfig | None = None, **thresholds: Any) -> None:
        if config is not None and thresholds:
            raise TypeError("pass either a config or threshold keywords, not both")
        config = self.config_class(**thresholds) if config is None else config
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} needs a {self.config_class.__name__}, "
                            f"got {type(config).__name__}")
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget everything seen, as if no record had arrived."""
        self._records_seen = 0
        self._last_step = 0
        self.records_judged = 0
        self._latched: str | None = None
        self._clear_streak = 0
        self._reset_state()

    def update(self, record: Mapping[str, Any]) -> list[Event]:
        """Judge one record; the events it fires (mostly none)."""
        self._records_seen += 1
        step = record.get("step")
        self._last_step = int(step) if is_int(step) else self._records_seen
        return self._judged(self._check(record))

    def _judged(self, finding: Finding | None | Unjudged) -> list[Event]:
        """The hysteresis: what one judgement of the record just seen fires. The per-record
        and the vectorised paths both go through here."""
        if finding is UNJUDGED:
            return []
        if finding is None:
            self._clears(1)
            return []
        self.records_judged += 1
        self._clear_streak = 0
        if self._silenced(finding.severity):
            return []
        if self.config.cooldown > 0:
            self._latched = finding.severity
        return [self._event(self._last_step, finding)]

    def _silenced(self, severity: str) -> bool:
        """A finding of `severity` on the record just seen stays quiet: warm-up or latch."""
        return self._records_seen <= self.config.warmup or (
            self._latched is not None and _RANK[severity] <= _RANK[self._latched])

    def _clears(self, count: int) -> None:
        """`count` judged records in a row with the condition clear."""
        self.records_judged += count
        self._clear_streak += count
        if self._latched is not None and self._clear_streak >= self.config.cooldown:
            self._latched = None

    def replay_columns(self, columns: RecordColumns) -> list[tuple[int, Event]]:
        """Judge every record of `columns` from a reset, as `update` would one by one: the
        events with the index of the record that fired each. Afterwards the detector holds
        what `finish` reads, not a state to continue `update` from.

        `_judge_columns` says per record whether `_check` would return UNJUDGED, None, or
        something to judge exactly; only the latter run through `_judged` one by one (with
        the record's position set first), a stretch of clear records in one `_clears`. A
        record certain to be a finding that the latch or warm-up would silence anyway is
        not worked out, and once the latch silences one, the findings after it up to the
        next clear record or a finding that may outrank the latch go in one step."""
        from loopdiag.detect.columns import CLEAR_CODE, OPEN_CODE, highest_severity

        self.reset()
        codes, judge = self._judge_columns(columns)
        clear_before = np.cumsum(codes == CLEAR_CODE)
        candidates = np.flatnonzero(codes >= OPEN_CODE)
        ceiling = highest_severity(codes[candidates])  # -1 where it must be judged
        clears = clear_before[candidates]
        quiet_until = {rank: _next_break(ceiling, clears, rank) for rank in _RANK.values()}
        fired: list[tuple[int, Event]] = []
        counted, position = 0, 0
        while position < len(candidates):
            index = int(candidates[position])
            self._clears(int(clears[position]) - counted)
            counted = int(clears[position])
            self._records_seen, self._last_step = index + 1, columns.last_step(index)
            rank = int(ceiling[position])
            if rank >= 0 and self._silenced(SEVERITIES[rank]):
                end = position + 1
                if self._records_seen > self.config.warmup:  # the latch holds until a clear
                    end = int(quiet_until[_RANK[self._latched]][position])
                self.records_judged += end - position
                self._clear_streak = 0
                last = int(candidates[end - 1])
                self._records_seen, self._last_step = last + 1, columns.last_step(last)
                position = end
                continue
            fired.extend((index, event) for event in self._judged(judge(index)))
            position += 1
        if len(columns):
            self._clears(int(clear_before[-1]) - counted)
            self._records_seen, self._last_step = len(columns), columns.last_step(len(columns) - 1)
        return fired

    def _judge_columns(self, columns: RecordColumns
                       ) -> tuple[np.ndarray, Callable[[int], Finding | None | Unjudged]]:
        """(a code per record, the exact judgement of an OPEN record by its index). Called
        on a reset detector; `judge` is called on the OPEN records in order. Without a
        vectorised judgement every record is OPEN and judged by `_check`."""
        from loopdiag.detect.columns import OPEN_CODE

        records = columns.records
        return np.full(len(records), OPEN_CODE, dtype=np.int8), lambda index: self._check(records[index])

    def finish(self) -> list[Event]:
        """Judge the run as a whole once it has ended (after its last record): the events
        that only the end can tell. Most detectors have none."""
        finding = self._check_end()
        if finding is None or (self._latched is not None
                               and _RANK[finding.severity] <= _RANK[self._latched]):
            return []
        return [self._event(self._last_step, finding)]

    def _check_end(self) -> Finding | None:
        return None

    def _event(self, step: int, finding: Finding) -> Event:
        return Event(step=step, detector=self.name, severity=finding.severity,
                     message=finding.message, evidence=plain(finding.evidence))

    @abstractmethod
    def _check(self, record: Mapping[str, Any]) -> Finding | None | Unjudged:
        """Judge one record; keep whatever running state the judgement needs."""

    @abstractmethod
    def _reset_state(self) -> None:
        """Set the running state to its value before the first record."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def _next_break(ceiling: np.ndarray, clears: np.ndarray, latched: int) -> np.ndarray:
    """Per candidate p, the first candidate after it that a latch at rank `latched` may not
    silence: one that must be judged or may outrank it, or one after a clear record."""
    count = len(ceiling)
    breaks = (ceiling < 0) | (ceiling > latched)
    breaks[1:] |= clears[1:] != clears[:-1]
    at = np.where(breaks, np.arange(count), count)
    first_from = np.minimum.accumulate(at[::-1])[::-1]
    return np.append(first_from[1:], count)


def replay(records: Iterable[Mapping[str, Any]], detectors: Iterable[Detector], *,
           finished: bool = False, vectorised: bool = True) -> list[Event]:
    """Feed saved records through `detectors` (reset first) exactly as training would have:
    the events, in record order, then detector order; with `finished`, the run ended
    there and each detector's end-of-run judgement follows.

    `vectorised` judges each detector over whole columns (`Detector.replay_columns`), which
    gives the same events as feeding the records one by one (`vectorised=False`, the path
    training takes) in a fraction of the time. Records training never judged
    (`judged_in_training`) are left out, so windows counted in records line up as they did."""
    from loopdiag.detect.columns import RecordColumns

    detectors = list(detectors)
    records = [record for record in records if judged_in_training(record)]
    events: list[Event] = []
    if vectorised:
        columns = RecordColumns(records)
        fired = [(index, position, event) for position, detector in enumerate(detectors)
                 for index, event in detector.replay_columns(columns)]
        fired.sort(key=lambda item: item[:2])
        events.extend(event for _, _, event in fired)
    else:
        for detector in detectors:
            detector.reset()
        for record in records:
            for detector in detectors:
                events.extend(detector.update(record))
    if finished:
        for detector in detectors:
            events.extend(detector.finish())
    return events


def blind_detectors(detectors: Iterable[Detector], keys_seen: set[str]) -> dict[str, tuple[str, ...]]:
    """Detectors that judged no record because the records carry none of the keys they read
    (a user's model without token correlations, say), with those keys. One with nothing to
    judge in records that do carry its keys (one loop has no loop to compare with) is not
    listed."""
    return {detector.name: detector.reads for detector in detectors
            if detector.records_judged == 0 and detector.reads and not keys_seen.intersection(detector.reads)}


def not_judged_message(blind: Mapping[str, tuple[str, ...]], *, all_blind: bool) -> str:
    """`blind_detectors` in one sentence, grouped by the statistic they lack."""
    by_missing: dict[tuple[str, ...], list[str]] = {}
    for name, keys in blind.items():
        by_missing.setdefault(keys, []).append(name)
    missing = "; ".join(f"no {' or '.join(keys)}: {', '.join(names)}" for keys, names in by_missing.items())
    # With every detector blind a verdict of stable says nothing: the line must say so.
    if all_blind:
        return (f"Nothing on this run is judged: its records carry none of what the detectors "
                f"read ({missing}), so its verdict cannot tell a failed run from a healthy one.")
    return f"Not judged on this run, its records carrying {missing}; the other detectors apply."


def judged_in_training(record: Mapping[str, Any]) -> bool:
    """Whether the monitor judged this record while the run trained. A validation loss taken
    at a step the probes did not log is stored as a record of its own (a step and `val_*`
    values), which training never showed the detectors."""
    return "loss" in record or any(key != "step" and not key.startswith("val_") for key in record)


# --- reading records -------------------------------------------------------------------

def raw_scalar(record: Mapping[str, Any], key: str) -> float | None:
    """The number under `key`, NaN/Inf included; None when missing or not a number."""
    value = record.get(key)
    return float(value) if _is_number(value) else None


def finite_scalar(record: Mapping[str, Any], key: str) -> float | None:
    """The number under `key` when present and finite, else None."""
    value = raw_scalar(record, key)
    return value if value is not None and math.isfinite(value) else None


def loop_values(record: Mapping[str, Any], key: str) -> np.ndarray | None:
    """The per-loop values of `key` as floats, loop 1 first (None entries → NaN): a list
    under `key` as the run store holds them, or the flattened `key/loop_01`, ... columns
    of W&B and the recorder's frames. None when absent."""
    values = record.get(key)
    if values is None:
        prefix = f"{key}/loop_"
        loops = sorted(((int(name[len(prefix):]), value) for name, value in record.items()
                        if name.startswith(prefix) and name[len(prefix):].isdigit()),
                       key=lambda loop_value: loop_value[0])
        values = [value for _, value in loops]
    if not isinstance(values, (list, tuple)) or not values:
        return None
    return np.array([float(v) if _is_number(v) else math.nan for v in values])


# --- small shared pieces ---------------------------------------------------------------

class Ema:
    """Exponential moving average with pandas' `span` convention (alpha = 2/(span+1)),
    started at the first value rather than at 0 so it carries no start-up bias."""

    def __init__(self, span: float) -> None:
        self.alpha = 2.0 / (span + 1.0)
        self.value: float | None = None

    def update(self, x: float) -> float:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)
        return self.value


def window_span(steps: Iterable[int]) -> dict[str, int]:
    """Evidence entry naming the records a windowed statistic was computed over."""
    steps = list(steps)
    return {"first_step": steps[0], "last_step": steps[-1], "records": len(steps)}


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def plain(value: Any) -> Any:
    """`value` with numpy scalars/arrays and tuples turned into builtin JSON types."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def is_int(value: Any) -> bool:
    """An integer, numpy's included (records read back as arrays hold them); never a bool.
    The one integer test of the package: configs, suite files and the store use it too."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
