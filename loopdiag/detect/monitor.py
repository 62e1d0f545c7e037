"""Live collapse alerts: detectors fed one record at a time, their events fanned out to sinks.

A sink is anything with `emit(event)`. A failing sink is reported once and then skipped:
an alert channel that breaks (a network hiccup, a full disk) must never stop training.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from loopdiag.detect import SEVERITIES, Detector, Event, FailedToTrain, default_detectors
from loopdiag.detect.base import blind_detectors, not_judged_message, raw_scalar
from loopdiag.detect.symptoms import CONTEXT_FREE_MARGIN, EMA_SPAN, few_records_message

SEVERITY_STYLE = {"info": "cyan", "warn": "yellow", "critical": "bold red"}
# Records after which a detector that judged none says so (its statistic is not recorded).
NOT_JUDGED_AFTER = 10


class AlertSink(Protocol):
    def emit(self, event: Event) -> None: ...


class ConsoleSink:
    """Events as one coloured line each on a rich console (stderr by default)."""

    def __init__(self, console: Any = None, prefix: str = ""):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.prefix = prefix

    def emit(self, event: Event) -> None:
        style = SEVERITY_STYLE[event.severity]
        self.console.print(
            f"[{style}]{event.severity.upper()}[/] {self.prefix}step {event.step} "
            f"[bold]{event.detector}[/]: {event.message}",
            highlight=False,
        )


class CallbackSink:
    """Hands every event to a user function."""

    def __init__(self, callback: Callable[[Event], Any]):
        self.callback = callback

    def emit(self, event: Event) -> None:
        self.callback(event)


class EventLogSink:
    """Appends events to a run's `events.jsonl` through its `RunWriter`."""

    def __init__(self, writer: Any):
        self.writer = writer

    def emit(self, event: Event) -> None:
        self.writer.event(event.to_dict())


class Monitor:
    """Runs `detectors` on each record and sends what they fire to `sinks`.

    With `stop_on` set to a severity, the first event at or above it sets `stop_event`
    (training loops check `should_stop`). `sinks`: a list of objects with `emit(event)`
    (`CallbackSink(f)` for a function). The losses may be given as floats, numpy scalars or
    0-d tensors.
    """

    def __init__(
        self,
        detectors: Iterable[Detector] | None = None,
        sinks: Iterable[AlertSink] = (),
        stop_on: str | None = None,
        thresholds: Mapping[str, Mapping[str, Any]] | None = None,
        expected_loss: float | None = None,
        context_free_loss: float | None = None,
        reference_losses: Sequence[tuple[int, float]] | None = None,
        best_known_loss: float | None = None,
    ):
        if stop_on is not None and stop_on not in SEVERITIES:
            raise ValueError(f"stop_on must be one of {', '.join(SEVERITIES)} or None, got {stop_on!r}")
        expected_loss, context_free_loss, best_known_loss = (
            _plain_loss(expected_loss), _plain_loss(context_free_loss), _plain_loss(best_known_loss))
        reference_losses = _plain_losses(reference_losses)
        if detectors is not None and (thresholds or expected_loss is not None
                                      or context_free_loss is not None
                                      or reference_losses is not None
                                      or best_known_loss is not None):
            raise ValueError("pass either detectors or thresholds / expected_loss / "
                             "context_free_loss / reference_losses / best_known_loss for the "
                             "default detectors, not both")
        self.detectors = (list(detectors) if detectors is not None
                          else default_detectors(expected_loss, context_free_loss=context_free_loss,
                                                 reference_losses=reference_losses,
                                                 best_known_loss=best_known_loss,
                                                 **(thresholds or {})))
        self.context_free_loss = context_free_loss  # the verdict's test of a recovery
        # A reference that ended at the context-free level, so no detector judges by that line: said once.
        self._unreached_line = (None if detectors is not None
                                or self._failed_to_train().config.context_free_line_holds
                                else (expected_loss, context_free_loss))
        self.sinks = _checked_sinks(sinks)
        self.stop_on = stop_on
        self.events: list[Event] = []
        self.stop_event: Event | None = None
        self._broken_sinks: set[int] = set()
        self._records = 0
        self._keys_seen: set[str] = set()
        # the default detectors read a smoothed loss: a run with too few losses is told so
        self._counts_losses = detectors is None
        self._losses = 0
        self._last_step: Any = None

    @property
    def should_stop(self) -> bool:
        return self.stop_event is not None

    @property
    def expected_loss(self) -> float | None:
        """The loss the run is judged against (`failed_to_train`'s reference); None when
        it is judged without one."""
        failed = self._failed_to_train()
        return None if failed is None else failed.config.expected_loss

    def _failed_to_train(self) -> FailedToTrain | None:
        return next((detector for detector in self.detectors if isinstance(detector, FailedToTrain)),
                    None)

    def update(self, record: Mapping[str, Any]) -> list[Event]:
        fired = [event for detector in self.detectors for event in detector.update(record)]
        self._count(record)
        if self._records == 1 and self._unreached_line is not None:
            fired.append(self._unreached_line_event(record))
        if self._records <= NOT_JUDGED_AFTER:
            self._keys_seen.update(record)
        if self._records == NOT_JUDGED_AFTER and self.not_judged():
            fired.append(self._not_judged_event(record))
        self._fire(fired)
        return fired

    def finish(self) -> list[Event]:
        """The detectors' end-of-run judgements (call once, when training ended), and, when
        none found a failure in a run of fewer than `EMA_SPAN` losses, a line saying that a
        stable verdict there is weak evidence."""
        fired = [event for detector in self.detectors for event in detector.finish()]
        failed = any(event.severity == "critical" for event in (*self.events, *fired))
        if self._counts_losses and 0 < self._losses < EMA_SPAN and not failed:
            fired.append(Event(step=self._last_step if isinstance(self._last_step, int) else self._records,
                               detector="monitor", severity="info", evidence={"records": self._losses},
                               message=few_records_message(self._losses)))
        self._fire(fired)
        return fired

    def restore(self, record: Mapping[str, Any]) -> None:
        """Feed an already-judged record (a resumed run's history): the detectors catch up
        and its events count towards the verdict, but nothing is sent and nothing stops."""
        self._count(record)
        if self._records <= NOT_JUDGED_AFTER:
            self._keys_seen.update(record)
        self.events.extend(event for detector in self.detectors for event in detector.update(record))

    def _count(self, record: Mapping[str, Any]) -> None:
        self._records += 1
        self._last_step = record.get("step", self._last_step)
        if raw_scalar(record, "loss") is not None:
            self._losses += 1

    def not_judged(self) -> dict[str, tuple[str, ...]]:
        """`blind_detectors` so far: those that have judged no record because the records
        lack the keys they read, with those keys."""
        return blind_detectors(self.detectors, self._keys_seen)

    def _not_judged_event(self, record: Mapping[str, Any]) -> Event:
        not_judged = self.not_judged()
        step = record.get("step")
        return Event(step=step if isinstance(step, int) else self._records, detector="monitor",
                     severity="info", evidence={"not_judged": not_judged},
                     message=not_judged_message(not_judged, all_blind=len(not_judged) == len(self.detectors)))

    def _unreached_line_event(self, record: Mapping[str, Any]) -> Event:
        expected, context_free = self._unreached_line
        step = record.get("step")
        return Event(step=step if isinstance(step, int) else self._records, detector="monitor",
                     severity="info",
                     evidence={"expected_loss": expected, "context_free_loss": context_free},
                     message=(f"The reference ended at {expected:.4g}, not "
                              f"{100 * CONTEXT_FREE_MARGIN:.0f}% below {context_free:.4g}, what "
                              f"the data's token frequencies alone give: with this data and "
                              f"budget it learned no more than that, so no run is judged by "
                              f"that line or by identical positions, only by its gap to the "
                              f"reference."))

    def _fire(self, fired: list[Event]) -> None:
        for event in fired:
            self.events.append(event)
            self._dispatch(event)
            if self.stop_event is None and self._at_least(event.severity, self.stop_on):
                self.stop_event = event

    def _dispatch(self, event: Event) -> None:
        for index, sink in enumerate(self.sinks):
            if index in self._broken_sinks:
                continue
            try:
                sink.emit(event)
            except Exception as error:  # noqa: BLE001 - an alert channel must not stop training
                self._broken_sinks.add(index)
                warnings.warn(f"alert sink {type(sink).__name__} failed and is disabled: {error!r}", stacklevel=2)

    @staticmethod
    def _at_least(severity: str, threshold: str | None) -> bool:
        return threshold is not None and SEVERITIES.index(severity) >= SEVERITIES.index(threshold)


def _checked_sinks(sinks: Iterable[AlertSink]) -> list[AlertSink]:
    """`sinks` as a list, refused here rather than at the first alert, which a bad sink would
    lose."""
    if callable(getattr(sinks, "emit", None)):
        raise TypeError(f"sinks must be a list of sinks, got one {type(sinks).__name__}: pass sinks=[...]")
    if not isinstance(sinks, Iterable) or isinstance(sinks, (str, bytes)):
        raise TypeError(f"sinks must be a list of sinks, got {type(sinks).__name__}")
    sinks = list(sinks)
    for sink in sinks:
        if not callable(getattr(sink, "emit", None)):
            name = getattr(sink, "__name__", "f")
            hint = f": wrap a function as CallbackSink({name})" if callable(sink) else ""
            raise TypeError(f"each sink needs an emit(event) method; got {sink!r}{hint}")
    return sinks


def _plain_loss(value: Any) -> Any:
    """A loss given as a numpy scalar or a 0-d tensor (a baseline's last `loss`) as a float;
    anything else as given, for the detectors to check."""
    if isinstance(value, (int, float)):
        return value  # as given, so that an error names it so
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        value = value.item()
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else value


def _plain_losses(losses: Any) -> Any:
    """`reference_losses` with each loss as `_plain_loss` makes it; a negative loss refused,
    as `expected_loss` is, since the curve stands for it."""
    if not isinstance(losses, (list, tuple)):
        return losses
    pairs = [(pair[0], _plain_loss(pair[1])) if isinstance(pair, (list, tuple)) and len(pair) == 2 else pair
             for pair in losses]
    for pair in pairs:
        if isinstance(pair, tuple) and isinstance(pair[1], float) and pair[1] < 0:
            raise ValueError(f"reference_losses must hold (step, loss) pairs with losses >= 0, got {pair!r}")
    return pairs
