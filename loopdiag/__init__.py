"""loopdiag: training-stability diagnostics for looped (weight-tied) transformers."""

from loopdiag.models import ARCHITECTURES, ModelConfig, build_model

__version__ = "0.1.0"

__all__ = ["ARCHITECTURES", "ModelConfig", "build_model", "__version__"]
