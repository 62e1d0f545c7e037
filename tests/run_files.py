"""What many test files build: a run folder written through the real `RunWriter`, and the
tiny model the training tests train. No torch at import: torchless test files use it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from loopdiag.store import RunWriter


def write_run(run_dir: Path, records: Iterable[Mapping[str, Any]], config: Mapping[str, Any], *,
              events: Iterable[Mapping[str, Any]] = (), summary: Mapping[str, Any] | None = None,
              **writer_options: Any) -> Path:
    """A closed run folder holding `records` and `events`, with `summary` as its verdict."""
    with RunWriter(run_dir, config, **writer_options) as run:
        for record in records:
            run.log(record)
        for event in events:
            run.event(event)
        run.close(summary)
    return run_dir


def tiny_model_config() -> Any:
    """The smallest model the training tests use: `preset("tiny")` over 16 tokens."""
    from loopdiag.models import preset

    return preset("tiny", seq_len=16)
