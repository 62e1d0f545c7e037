"""The model registry: every architecture of docs/design.md §2 built from one `ModelConfig`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loopdiag.models.config import PRESETS, ModelConfig, preset
from loopdiag.models.flt import FullyLoopedTransformer
from loopdiag.models.layers import HookPoint, LoopedLM, norm
from loopdiag.models.looped import LoopedTransformer
from loopdiag.models.recurrent_depth import RecurrentDepthTransformer
from loopdiag.models.transformer import StandardTransformer

ARCHITECTURES: dict[str, Callable[[ModelConfig], LoopedLM]] = {
    "standard": StandardTransformer,
    "looped": lambda cfg: LoopedTransformer(cfg, "looped"),
    "looped-inject": lambda cfg: LoopedTransformer(cfg, "looped-inject"),
    "looped-scaled": lambda cfg: LoopedTransformer(cfg, "looped-scaled"),
    "recurrent-depth": RecurrentDepthTransformer,
    "flt-res": lambda cfg: FullyLoopedTransformer(cfg, "flt-res"),
    "flt-ai1": lambda cfg: FullyLoopedTransformer(cfg, "flt-ai1"),
    "flt": lambda cfg: FullyLoopedTransformer(cfg, "flt"),
}


def build_model(arch: str, config: ModelConfig | None = None, **overrides: Any) -> LoopedLM:
    """Build `arch` from `config` (defaults if None) with field `overrides` applied."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    config = (config or ModelConfig()).with_(**overrides)
    return ARCHITECTURES[arch](config)


__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "FullyLoopedTransformer",
    "HookPoint",
    "LoopedLM",
    "LoopedTransformer",
    "ModelConfig",
    "RecurrentDepthTransformer",
    "StandardTransformer",
    "build_model",
    "norm",
    "preset",
]
