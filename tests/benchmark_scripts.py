"""Import a script from benchmarks/ as a module, for tests of its pure functions."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def loaded(script: str, name: str) -> Iterator[ModuleType]:
    """Yield `benchmarks/<script>` imported as `name`; a fixture's body."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]
