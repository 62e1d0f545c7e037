"""Residual blow-up: the stream exploding in the first steps, before any baseline exists.

`residual_explosion` judges growth against a post-warm-up baseline, so a stream that has
already exploded during that warm-up becomes its own baseline and looks calm. This
detector compares with the very first record instead (initialisation), where every
reference model starts at ‖N(e)‖ = √d, and needs only a few records.

A growing stream alone is not a collapse: the non-looped model at a high learning rate
grows its stream 1,000–8,000× and trains as well as at a low one. So it warns, and past
`growth_critical` goes critical, only with a loss or representation symptom
(`loopdiag.detect.symptoms.Symptoms`); it also warns, never more, once the loss has begun
to rise, read against its noise (`Symptoms.rising`), before it stands the labels' 10 %
above its best. Without either the growth is one `info` event, saying
whether the loss still falls or has stalled, and that growth is not judged again. A stall
this early is no symptom: healthy models cross a plateau in their first hundred steps (on
the reference study, warning on growth with a stalled loss gave 3 healthy runs a warning
and 1 failed run its first).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from loopdiag.detect.base import UNJUDGED, Detector, Finding, Unjudged, loop_values, require
from loopdiag.detect.columns import RecordColumns, codes
from loopdiag.detect.symptoms import (
    ReferenceLineConfig,
    Symptoms,
    solved_line,
)


@dataclass(frozen=True)
class ResidualBlowupConfig(ReferenceLineConfig):
    # No warm-up: it compares with the first record, and goes beyond information only with
    # a loss or representation symptom, which a healthy start never shows. (It had 5
    # records from when growth alone warned; they only delayed a run that diverges in its
    # first steps, as the learning-rate ramps do by steps 8-10 at d_model 192.)
    warmup: int = 0
    cooldown: int = 20
    smooth: int = 5  # rolling median over this many records, so one odd batch never fires
    # Records it judges: the start of a run, until `residual_explosion` has its baseline
    # (warm-up 50 + 20). A stream that grows 100× over hundreds of records is a long run
    # growing its weights, not a blow-up.
    horizon: int = 70
    # Set on the seed-0 runs of the detection benchmark, which it does not score: over 300
    # steps the healthy settings grew at most 25× over their first record (5-record median);
    # the four collapsing settings reached 104×, 300×, 74,000× and 2,000,000× by step 30.
    # Warn at 4× the healthiest growth seen; critical an order of magnitude further.
    growth_warn: float = 100.0
    growth_critical: float = 1000.0
    # The symptom that makes a blow-up a collapse (see `Symptoms`).
    gap: float = 0.10
    min_progress: float = 0.02
    # Records over which a loss that fell < min_progress has stalled (the info event says
    # which): the window of `representation_collapse`'s stall rule.
    stall_window: int = 20

    def _validate(self) -> None:
        require(self.gap > 0 and self.min_progress > 0,
                f"gap and min_progress must be > 0, got {self.gap}, {self.min_progress}")
        require(self.smooth >= 1, f"smooth must be >= 1, got {self.smooth}")
        require(self.horizon >= self.warmup, f"horizon must be >= warmup, got {self.horizon}")
        require(1 < self.growth_warn <= self.growth_critical,
                f"need 1 < growth_warn <= growth_critical, got {self.growth_warn}, {self.growth_critical}")


class ResidualBlowup(Detector):
    """Last-loop residual norm r_K over its value at the first record, as a rolling median
    over `smooth` records, during the first `horizon` records, ≥ `growth_warn` → warn with a
    loss or representation symptom or a loss that has begun to rise, critical ≥
    `growth_critical` with a symptom; without either, a single info event once the loss
    history tells a falling loss from a stalled one."""

    name = "residual_blowup"
    mechanism = "residual"
    reads = ("resid_norm",)
    config_class = ResidualBlowupConfig
    config: ResidualBlowupConfig

    def _reset_state(self) -> None:
        self._initial: tuple[int, float] | None = None  # (step, r_K) of the first record
        self._recent: deque[float] = deque(maxlen=self.config.smooth)
        self._growth_noted = False
        self._symptoms = Symptoms(self.config.gap, self.config.min_progress, self.config.stall_window,
                                  reads_rise=True, floor=solved_line(self.config),
                                  positions=self.config.context_free_line_holds)

    def _check(self, record: Mapping[str, Any]) -> Finding | None | Unjudged:
        self._symptoms.update(record)
        norms = loop_values(record, "resid_norm")
        if (norms is None or not (math.isfinite(norms[-1]) and norms[-1] > 0)
                or self._records_seen > self.config.horizon):
            return UNJUDGED
        if self._initial is None:
            self._initial = (record.get("step"), float(norms[-1]))
        self._recent.append(float(norms[-1]))
        initial_step, initial = self._initial
        current = statistics.median(self._recent)
        growth = current / initial
        if growth < self.config.growth_warn:
            return None
        symptom = self._symptoms.current()
        message = (f"Last-loop residual norm {current:.4g} is {growth:.0f}× its value {initial:.4g} "
                   f"at step {initial_step}")
        rising = None if symptom is not None else self._symptoms.rising()
        if symptom is not None:
            message += f", and {symptom}"
            severity = "critical" if growth >= self.config.growth_critical else "warn"
        elif rising is not None:
            message += f", and {rising}"
            severity = "warn"
        elif self._growth_noted or self._symptoms.loss.progress() is None:
            return None  # noted already, or too early to tell a stalled loss from a falling one
        else:
            self._growth_noted = True
            if self._symptoms.stalled():
                message += (f"; the loss stopped falling (median "
                            f"{self._symptoms.loss.current_median():.4g}), no symptom yet")
            else:
                message += ", while the loss still falls"
            severity = "info"
        return Finding(severity, message + ".",
                       {"resid_norm_last": current, "initial": initial, "initial_step": initial_step,
                        "growth": growth, "symptom": symptom, "rising": rising,
                        "thresholds": {"growth_warn": self.config.growth_warn,
                                       "growth_critical": self.config.growth_critical}})

    def _judge_columns(self, columns: RecordColumns) -> tuple[np.ndarray, Callable[[int], Any]]:
        # Nothing after `horizon` is judged, and what it judges within depends on its own
        # firing history (growth learned through is judged once): `_check` judges the
        # first `horizon` records one by one.
        judged = np.arange(len(columns)) < self.config.horizon
        return codes(judged, judged), lambda index: self._check(columns.records[index])
