"""The model registry: every architecture of docs/design.md §2 built from one `ModelConfig`."""

from __future__ import annotations

from typing import Any

from loopdiag.models.config import PRESETS, ModelConfig, preset
from loopdiag.models.flt import FullyLoopedTransformer
from loopdiag.models.layers import HookPoint, LoopedLM, norm
from loopdiag.models.looped import LoopedTransformer
from loopdiag.models.recurrent_depth import RecurrentDepthTransformer
from loopdiag.models.transformer import StandardTransformer

# Classes, not builders: what a class says of its models (`fixed_depth`) is read without
# building one.
ARCHITECTURES: dict[str, type[LoopedLM]] = {
    "standard": StandardTransformer,
    **dict.fromkeys(LoopedTransformer.variants, LoopedTransformer),
    "recurrent-depth": RecurrentDepthTransformer,
    **dict.fromkeys(FullyLoopedTransformer.variants, FullyLoopedTransformer),
}


def build_model(arch: str, config: ModelConfig | None = None, **overrides: Any) -> LoopedLM:
    """Build `arch` from `config` (defaults if None) with field `overrides` applied."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    config = (config or ModelConfig()).with_(**overrides)
    model_class = ARCHITECTURES[arch]
    return model_class(config, arch) if model_class.variants else model_class(config)


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
