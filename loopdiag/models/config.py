"""One configuration for every model family, and presets as data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256  # byte-level tokens
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2  # L: distinct blocks per loop (the core, for recurrent-depth)
    n_loops: int = 4  # K: default loop count; any forward may pass another
    seq_len: int = 64  # longest context the rotary tables cover
    mlp_ratio: int = 4

    # Switches of the official FLT recipe, kept so their effect on stability can be probed.
    qk_norm: bool = True
    zero_init_out: bool = True  # attention and MLP output projections start at zero
    logit_softcap: float | None = 15.0
    loss_on: str = "last"  # "last": supervise the last loop only (the paper); "all": every loop

    # looped / looped-inject: normalise the stream between loops (h = N(x_L)).
    inter_loop_norm: bool = True
    # looped-scaled: both residual branches are multiplied by residual_lambda / K.
    residual_lambda: float = 1.0

    # recurrent-depth (Huginn-style prelude / core / coda).
    n_prelude: int = 1
    n_coda: int = 1
    init_state_std: float = 1.0  # the loop state starts as N(0, std^2) noise; 0 gives zeros
    sample_loops: bool = False  # in training, draw K from a log-normal Poisson with mean n_loops
    backprop_loops: int | None = None  # truncated backprop: gradients through the last k loops only

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "n_loops", "seq_len", "mlp_ratio"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("ModelConfig: head dimension d_model/n_heads must be even for rotary embeddings")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ValueError(f"ModelConfig.logit_softcap must be positive or None, got {self.logit_softcap!r}")
        if self.loss_on not in ("last", "all"):
            raise ValueError(f"ModelConfig.loss_on must be 'last' or 'all', got {self.loss_on!r}")
        if self.residual_lambda <= 0:
            raise ValueError(f"ModelConfig.residual_lambda must be positive, got {self.residual_lambda!r}")
        if self.n_prelude < 0 or self.n_coda < 0:
            raise ValueError("ModelConfig.n_prelude and n_coda must be >= 0")
        if self.init_state_std < 0:
            raise ValueError(f"ModelConfig.init_state_std must be >= 0, got {self.init_state_std!r}")
        if self.backprop_loops is not None and self.backprop_loops < 1:
            raise ValueError(f"ModelConfig.backprop_loops must be >= 1 or None, got {self.backprop_loops!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {', '.join(unknown)}")
        return cls(**values)

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


# Sizes that train in seconds on two CPU cores are the defaults; `small` is for studies.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=32, n_heads=2, n_layers=2, seq_len=32),
    "default": dict(),
    "small": dict(d_model=128, n_heads=4, n_layers=2, seq_len=128),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
