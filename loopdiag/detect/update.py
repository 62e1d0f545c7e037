"""Oversized update: one optimizer step that rewrites the shared weights.

A healthy step moves the weights by a small fraction of their norm (well under 1 % in
large-model practice; at most 16 % here, on the first steps of Adam at lr 3e-2). A step
that moves them by half their norm or more has thrown away what they held: the learning
rate is far too high for this model, and the loss fails a step or two later, too soon for
any detector that needs a history. This one needs none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from loopdiag.detect.base import UNJUDGED, Detector, DetectorConfig, Finding, Unjudged, finite_scalar, require
from loopdiag.detect.columns import RecordColumns, codes

# Set on the seed-0 runs of the detection benchmark, which it does not score: healthy
# settings peaked at 0.162 (looped-scaled, lr 3e-2, step 2); the settings that collapse
# within 3 steps (lr 1) or inside every other detector's warm-up (lr 0.3) started at 4.77
# and 1.43. 3× the largest healthy value.
OVERSIZED_UPDATE = 0.5


@dataclass(frozen=True)
class UpdateSizeConfig(DetectorConfig):
    warmup: int = 0  # the very first step is where a far-too-high learning rate shows
    cooldown: int = 20
    # Warn only: a step that large says the learning rate is wrong, not yet that the run
    # has collapsed (`failed_to_train` judges the run's end with it when it has no
    # expected loss).
    ratio_warn: float = OVERSIZED_UPDATE

    def _validate(self) -> None:
        require(self.ratio_warn > 0, f"ratio_warn must be > 0, got {self.ratio_warn}")


class UpdateSize(Detector):
    """`update_ratio` (‖ΔW‖ / ‖W‖ of the shared weights over one step) → warn ≥ `ratio_warn`."""

    name = "update_size"
    reads = ("update_ratio",)
    config_class = UpdateSizeConfig
    config: UpdateSizeConfig

    def _reset_state(self) -> None:
        pass

    def _check(self, record: Mapping[str, Any]) -> Finding | None | Unjudged:
        ratio = finite_scalar(record, "update_ratio")
        if ratio is None:
            return UNJUDGED
        if ratio < self.config.ratio_warn:
            return None
        return Finding("warn", f"One step moved the shared weights by {ratio:.2g}× their norm: "
                               f"the learning rate is too high for this model.",
                       {"update_ratio": ratio, "lr": finite_scalar(record, "lr"),
                        "thresholds": {"ratio_warn": self.config.ratio_warn}})

    def _judge_columns(self, columns: RecordColumns) -> tuple[np.ndarray, Callable[[int], Any]]:
        ratio = columns.finite("update_ratio")
        judged = np.isfinite(ratio)
        return (codes(judged, judged & (ratio >= self.config.ratio_warn), certain=True),
                lambda index: self._check(columns.records[index]))
