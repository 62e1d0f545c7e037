"""loopdiag: training-stability diagnostics for looped (weight-tied) transformers.

The public API is re-exported here and imported on first use, so `import loopdiag` stays
light (no torch, wandb or matplotlib until a name that needs them is touched).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ARCHITECTURES": "loopdiag.models",
    "ModelConfig": "loopdiag.models",
    "build_model": "loopdiag.models",
    "preset": "loopdiag.models",
    "load_corpus": "loopdiag.data",
    "AdditionTask": "loopdiag.data",
    "PointerChasingTask": "loopdiag.data",
    "exact_match_accuracy": "loopdiag.data",
    "unigram_loss": "loopdiag.data",
    "TrainConfig": "loopdiag.train",
    "train": "loopdiag.train",
    "attach": "loopdiag.probes",
    "LoopRecorder": "loopdiag.probes",
    "RecorderCallback": "loopdiag.probes",
    "RunWriter": "loopdiag.store",
    "load_run": "loopdiag.store",
    "load_suite": "loopdiag.store",
    "Event": "loopdiag.detect",
    "default_detectors": "loopdiag.detect",
    "replay": "loopdiag.detect",
    "verdict": "loopdiag.detect",
    "Monitor": "loopdiag.detect.monitor",
    "ConsoleSink": "loopdiag.detect.monitor",
    "CallbackSink": "loopdiag.detect.monitor",
    "RunSession": "loopdiag.run.session",
    "WandbRun": "loopdiag.run.wandb_logging",
    "RunSpec": "loopdiag.run.runner",
    "run_one": "loopdiag.run.runner",
    "suite_table": "loopdiag.analysis",
    "write_report": "loopdiag.analysis",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loopdiag' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
