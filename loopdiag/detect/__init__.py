"""Collapse detectors: streaming judges of recorded runs, the same online and offline.

Each detector reads one record per logged step (`update(record) -> list[Event]`) and
fires events with evidence; `replay` runs them over a saved run; `verdict` turns a run's
records and events into stable / collapsed (with its mechanism) / diverged / failed to
train / interrupted. Nothing here needs torch: a run recorded on a cluster is judged on a
laptop.
"""

from loopdiag.detect.anchors import FoundryHighLoss, MegatronSpike, OlmoSpike, ZScore30, anchor_detectors
from loopdiag.detect.blowup import ResidualBlowup, ResidualBlowupConfig
from loopdiag.detect.base import SEVERITIES, Detector, DetectorConfig, Event, replay
from loopdiag.detect.behind import BehindReference, BehindReferenceConfig
from loopdiag.detect.collapse import CollapsePlateau, CollapsePlateauConfig
from loopdiag.detect.failure import FailedToTrain, FailedToTrainConfig
from loopdiag.detect.gradient import GradientOscillation, GradientOscillationConfig
from loopdiag.detect.loops import (
    DeadLoops,
    DeadLoopsConfig,
    IdleLoops,
    IdleLoopsConfig,
    RepresentationCollapse,
    RepresentationCollapseConfig,
    VanishingGradient,
    VanishingGradientConfig,
)
from loopdiag.detect.loss import (
    LossRise,
    LossRiseConfig,
    LossSpike,
    LossSpikeConfig,
    NonFinite,
    NonFiniteConfig,
    SlowDivergence,
    SlowDivergenceConfig,
)
from loopdiag.detect.registry import DETECTORS, default_detectors
from loopdiag.detect.residual import ResidualExplosion, ResidualExplosionConfig
from loopdiag.detect.update import UpdateSize, UpdateSizeConfig
from loopdiag.detect.verdict import MECHANISMS, STATUSES, ground_truth_onset, verdict

__all__ = [
    "DETECTORS",
    "MECHANISMS",
    "SEVERITIES",
    "STATUSES",
    "BehindReference",
    "BehindReferenceConfig",
    "CollapsePlateau",
    "CollapsePlateauConfig",
    "DeadLoops",
    "DeadLoopsConfig",
    "IdleLoops",
    "IdleLoopsConfig",
    "FailedToTrain",
    "FailedToTrainConfig",
    "FoundryHighLoss",
    "Detector",
    "DetectorConfig",
    "Event",
    "GradientOscillation",
    "GradientOscillationConfig",
    "LossRise",
    "LossRiseConfig",
    "LossSpike",
    "LossSpikeConfig",
    "MegatronSpike",
    "NonFinite",
    "NonFiniteConfig",
    "OlmoSpike",
    "RepresentationCollapse",
    "RepresentationCollapseConfig",
    "ResidualBlowup",
    "ResidualBlowupConfig",
    "ResidualExplosion",
    "ResidualExplosionConfig",
    "SlowDivergence",
    "SlowDivergenceConfig",
    "UpdateSize",
    "UpdateSizeConfig",
    "VanishingGradient",
    "VanishingGradientConfig",
    "ZScore30",
    "anchor_detectors",
    "default_detectors",
    "ground_truth_onset",
    "replay",
    "verdict",
]
