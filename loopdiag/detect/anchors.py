"""Loss-spike rules of widely used training stacks, re-implemented as detectors so the
detection-quality benchmark can score ours against them on the same records.

They are faithful to their sources in rule and defaults, with two shared departures:
non-finite losses are skipped (the sources either poison their history with them or
leave them to a separate NaN check, which here is `NonFinite`), and a window or sample
counts records rather than training steps or micro-batches. They only warn, and with
`cooldown = 0` they fire on every record that meets the rule, as the sources do.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
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
    require,
    window_span,
)


@dataclass(frozen=True)
class WindowSigmaConfig(DetectorConfig):
    cooldown: int = 0
    window: int = 128
    threshold_std: float = 6.0

    def _validate(self) -> None:
        require(self.window >= 2, f"window must be >= 2, got {self.window}")
        require(self.threshold_std > 0, f"threshold_std must be > 0, got {self.threshold_std}")


class OlmoSpike(Detector):
    """OLMo-core's `StabilityMonitorCallback` rule: a loss above mean + 6σ of the previous
    128 values is a spike.

    As there: judged only once the window is full, σ is the population standard deviation,
    the history keeps every value (spikes included), and σ < 1e-10 never flags.
    """

    name = "olmo_6sigma_128"
    config_class = WindowSigmaConfig
    two_sided = False

    def _reset_state(self) -> None:
        self._history: deque[tuple[int, float]] = deque(maxlen=self.config.window)

    def _check(self, record: Mapping[str, Any]) -> Finding | None | Unjudged:
        loss = finite_scalar(record, "loss")
        if loss is None:
            return UNJUDGED
        history = list(self._history)
        self._history.append((record.get("step"), loss))
        if len(history) < self.config.window:
            return UNJUDGED
        values = np.array([value for _, value in history])
        mean, std = float(values.mean()), float(values.std())
        if std < 1e-10:
            return None
        z = (loss - mean) / std
        if (abs(z) if self.two_sided else z) <= self.config.threshold_std:
            return None
        message = (f"Loss {loss:.4g} at step {record.get('step')} is {z:+.1f}σ from the mean "
                   f"{mean:.4g} of the previous {len(history)} records.")
        return Finding("warn", message, {
            "loss": loss, "mean": mean, "std": std, "z": z,
            "window": window_span(step for step, _ in history),
            "thresholds": {"threshold_std": self.config.threshold_std}})


@dataclass(frozen=True)
class ShortWindowSigmaConfig(WindowSigmaConfig):
    window: int = 30
    threshold_std: float = 3.0


class ZScore30(OlmoSpike):
    """The common hand-rolled rule |z| > 3 over the previous 30 losses (population σ, full
    window required). Two-sided and short-windowed, it fires on healthy noise: Gaussian
    noise alone crosses 3σ in ≈ 0.3 % of records, and a decaying loss drops below
    mean − 3σ of a 30-record window readily."""

    name = "zscore_3sigma_30"
    config_class = ShortWindowSigmaConfig
    two_sided = True


@dataclass(frozen=True)
class MegatronSpikeConfig(DetectorConfig):
    cooldown: int = 0
    factor: float = 10.0  # Megatron-LM's SPIKY_LOSS_FACTOR
    num_samples: int = 100  # values the reference maximum is estimated from

    def _validate(self) -> None:
        require(self.factor > 1, f"factor must be > 1, got {self.factor}")
        require(self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}")


class MegatronSpike(Detector):
    """Megatron-LM's spiky-loss check (`--check-for-spiky-loss`).

    `pretrain_gpt.py` validates each loss with `RerunStateMachine.is_unexpectedly_large`
    (megatron/core/rerun_state_machine.py) at `SPIKY_LOSS_FACTOR = 10`. That helper takes
    the absolute value, ignores NaN/Inf, records the maximum of the first `num_samples`
    (100) values without ever flagging them, and from then on flags a value ≥ 10 × that
    maximum. The maximum is frozen after the sample, not a running one: since it is
    usually set by the high losses at initialisation, a spike must be ten times the
    *initial* loss to be seen.
    """

    name = "megatron_10x_max"
    config_class = MegatronSpikeConfig
    config: MegatronSpikeConfig

    def _reset_state(self) -> None:
        self._sampled = 0
        self._reference_max = 0.0

    def _check(self, record: Mapping[str, Any]) -> Finding | None | Unjudged:
        loss = finite_scalar(record, "loss")
        if loss is None:
            return UNJUDGED
        value = math.fabs(loss)
        if self._sampled < self.config.num_samples:
            self._sampled += 1
            self._reference_max = max(self._reference_max, value)
            return UNJUDGED
        if value < self.config.factor * self._reference_max:
            return None
        message = (f"|loss| {value:.4g} at step {record.get('step')} is ≥ {self.config.factor:g}× "
                   f"the maximum {self._reference_max:.4g} of the first "
                   f"{self.config.num_samples} records.")
        return Finding("warn", message, {
            "loss": loss, "reference_max": self._reference_max,
            "thresholds": {"factor": self.config.factor, "num_samples": self.config.num_samples}})


@dataclass(frozen=True)
class FoundryHighLossConfig(DetectorConfig):
    cooldown: int = 0
    # llm-foundry sizes the window as 5 % of the run's batches, at least 100; a detector
    # does not know the run's length, so the minimum, which is what runs of up to 2,000
    # steps get.
    window: int = 100
    max_loss_cap: float = 10.0
    outlier_multiplier: float = 2.0
    patience: int = 4

    def _validate(self) -> None:
        require(self.window >= 2, f"window must be >= 2, got {self.window}")
        require(self.max_loss_cap > 0, f"max_loss_cap must be > 0, got {self.max_loss_cap}")
        require(self.outlier_multiplier > 1,
                f"outlier_multiplier must be > 1, got {self.outlier_multiplier}")
        require(self.patience >= 0, f"patience must be >= 0, got {self.patience}")


class FoundryHighLoss(Detector):
    """llm-foundry's `KillLossSpike` callback (llmfoundry/callbacks/kill_loss_spike_callback.py).

    Once its window of losses is full: a loss ≥ `outlier_multiplier` × the window's mean
    for more than `patience` records in a row is a spike; otherwise, from twice the window
    on, at least half the window above the loss cap (the first window's maximum, at most
    `max_loss_cap`) is a persistently high loss. The window holds the losses before the
    current one, as there.
    """

    name = "llmfoundry_high_loss"
    config_class = FoundryHighLossConfig
    config: FoundryHighLossConfig

    def _reset_state(self) -> None:
        self._window: deque[float] = deque(maxlen=self.config.window)
        self._seen = 0
        self._loss_cap: float | None = None
        self._outliers = 0

    def _check(self, record: Mapping[str, Any]) -> Finding | None | Unjudged:
        loss = finite_scalar(record, "loss")
        if loss is None:
            return UNJUDGED
        self._seen += 1
        try:
            return self._judge(loss, record.get("step"))
        finally:
            self._window.append(loss)

    def _judge(self, loss: float, step: Any) -> Finding | None | Unjudged:
        if len(self._window) < self.config.window:
            return UNJUDGED
        if self._loss_cap is None:
            self._loss_cap = min(max(self._window), self.config.max_loss_cap)
        mean = float(np.mean(self._window))
        thresholds = {"window": self.config.window, "loss_cap": self._loss_cap,
                      "outlier_multiplier": self.config.outlier_multiplier,
                      "patience": self.config.patience}
        if loss >= self.config.outlier_multiplier * mean:
            self._outliers += 1
            if self._outliers > self.config.patience:
                return Finding("warn", f"Loss {loss:.4g} at step {step} has been ≥ "
                                       f"{self.config.outlier_multiplier:g}× the window mean "
                                       f"{mean:.4g} for {self._outliers} records.",
                               {"loss": loss, "mean": mean, "outliers": self._outliers,
                                "thresholds": thresholds})
        else:
            self._outliers = 0
        if self._seen <= 2 * self.config.window:
            return None
        high = sum(value > self._loss_cap for value in self._window)
        if high < self.config.window / 2:
            return None
        return Finding("warn", f"{high} of the last {len(self._window)} losses are above the "
                               f"cap {self._loss_cap:.4g} (the first window's maximum).",
                       {"loss": loss, "high_losses": high, "thresholds": thresholds})


def anchor_detectors() -> list[Detector]:
    """The four anchor rules with their sources' defaults."""
    return [OlmoSpike(), ZScore30(), MegatronSpike(), FoundryHighLoss()]
