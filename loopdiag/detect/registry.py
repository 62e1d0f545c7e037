"""The default detector set, with thresholds overridable by name (as a suite file does)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from loopdiag.detect.base import Detector
from loopdiag.detect.behind import BehindReference, checked_losses
from loopdiag.detect.blowup import ResidualBlowup
from loopdiag.detect.collapse import CollapsePlateau
from loopdiag.detect.failure import FailedToTrain
from loopdiag.detect.gradient import GradientOscillation
from loopdiag.detect.loops import DeadLoops, IdleLoops, RepresentationCollapse, VanishingGradient
from loopdiag.detect.loss import LossRise, LossSpike, NonFinite, SlowDivergence
from loopdiag.detect.residual import ResidualExplosion
from loopdiag.detect.symptoms import still_learning, validate_loss
from loopdiag.detect.update import UpdateSize

DETECTORS: dict[str, type[Detector]] = {cls.name: cls for cls in (
    NonFinite, UpdateSize, RepresentationCollapse, VanishingGradient, DeadLoops, IdleLoops,
    ResidualBlowup,
    ResidualExplosion, GradientOscillation, LossSpike, LossRise, SlowDivergence, CollapsePlateau,
    BehindReference, FailedToTrain)}


def default_detectors(expected_loss: float | None = None, *,
                      context_free_loss: float | None = None,
                      reference_losses: Sequence[tuple[int, float]] | None = None,
                      best_known_loss: float | None = None,
                      **overrides: Mapping[str, Any]) -> list[Detector]:
    """One of each detector in `DETECTORS`, with `overrides` applied, e.g.
    `default_detectors(loss_spike={"z": 8})` or `default_detectors(**suite["detectors"])`.
    `expected_loss` (the loss this model should reach, e.g. the same architecture's with
    one loop), `context_free_loss` (what the data's token frequencies alone give, e.g.
    `loopdiag.data.unigram_loss` of the training tokens) and `reference_losses` (the
    (step, train loss) pairs of the run `expected_loss` came from; whether they were still
    falling at the end goes as `reference_learning`) and `best_known_loss` (the lowest loss
    the same model reached on this data in any setting, e.g. a suite's one-loop runs at
    every learning rate) go to every detector that takes them, unless its overrides set them.

    Raises ValueError naming the detector and threshold for an unknown detector, an
    unknown threshold, or a value of the wrong type or range.
    """
    unknown = sorted(set(overrides) - set(DETECTORS))
    if unknown:
        raise ValueError(f"unknown detector(s) {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(DETECTORS)}")
    validate_loss(expected_loss)
    validate_loss(context_free_loss, "context_free_loss")
    validate_loss(best_known_loss, "best_known_loss")
    given = {key: value for key, value in (("expected_loss", expected_loss),
                                           ("context_free_loss", context_free_loss),
                                           ("reference_losses", reference_losses),
                                           ("best_known_loss", best_known_loss))
             if value is not None}
    if reference_losses is not None:
        try:
            given["reference_learning"] = still_learning(checked_losses(reference_losses))
        except ValueError:
            pass  # behind_reference refuses the curve below, naming itself
    detectors = []
    for name, cls in DETECTORS.items():
        thresholds = dict(overrides.get(name, {})) if isinstance(overrides.get(name, {}), Mapping) \
            else overrides[name]
        if isinstance(thresholds, dict):
            fields = {field.name for field in dataclasses.fields(cls.config_class)}
            for key, value in given.items():
                if key in fields:
                    thresholds.setdefault(key, value)
        detectors.append(_build(name, cls, thresholds))
    return detectors


def _build(name: str, cls: type[Detector], thresholds: Mapping[str, Any]) -> Detector:
    if not isinstance(thresholds, Mapping):
        raise ValueError(f"{name}: thresholds must be a mapping of name to value, "
                         f"got {type(thresholds).__name__}")
    known = [field.name for field in dataclasses.fields(cls.config_class)]
    unknown = sorted(set(thresholds) - set(known))
    if unknown:
        raise ValueError(f"{name}: unknown threshold(s) {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(known)}")
    try:
        return cls(cls.config_class(**thresholds))
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
