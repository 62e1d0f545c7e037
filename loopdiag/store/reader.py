"""Reading one run folder into pandas, with nothing but the folder."""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loopdiag.store._files import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    EVENTS_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    RunStoreWarning,
    read_rows,
)

EVENT_COLUMNS = ("step", "detector", "severity", "message", "evidence")


@dataclass
class RunData:
    """One run as tables.

    `steps`: one row per logged step, the records' scalar values (`step` first).
    `loops`: long table (step, loop, stat, value) from every per-loop list, loop 1-based.
    `events`: one row per detector firing; `EVENT_COLUMNS` always present.
    `summary`: the stored verdict, or None when the run never wrote one.
    `config`: as stored, including the writer's `run_info` (start time, versions).
    """

    run_dir: Path
    config: dict[str, Any]
    steps: pd.DataFrame
    loops: pd.DataFrame
    events: pd.DataFrame
    summary: dict[str, Any] | None

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    @property
    def checkpoint_path(self) -> Path | None:
        path = self.run_dir / CHECKPOINT_FILE
        return path if path.is_file() else None


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def load_run(run_dir: str | Path) -> RunData:
    """Load a run folder; unreadable lines are skipped with a `RunStoreWarning`."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        why = "it does not exist" if not run_dir.exists() else f"it has no {CONFIG_FILE}"
        raise FileNotFoundError(f"{run_dir} is not a run folder: {why}")
    config = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    steps, loops = metric_frames(read_rows(run_dir / METRICS_FILE))
    events = event_frame(read_rows(run_dir / EVENTS_FILE))
    return RunData(run_dir=run_dir, config=config, steps=steps, loops=loops, events=events,
                   summary=_read_summary(run_dir / SUMMARY_FILE))


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's records exactly as logged (for replaying detectors); torn lines skipped."""
    return read_rows(Path(run_dir) / METRICS_FILE)


def metric_frames(records: Sequence[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(steps, loops) from records, built column-wise: one frame construction for the
    steps and one array per per-loop stat, never a Python loop over table rows.

    A key counts as per-loop when any record holds a list under it. `loops` rows come
    grouped by stat, then step, then loop.
    """
    table = pd.DataFrame(list(records))
    if table.empty:
        table = pd.DataFrame({"step": pd.Series(dtype="int64")})
    per_loop = [column for column in table.columns if table[column].dtype == object
                and any(isinstance(value, list) for value in table[column])]
    steps = table.drop(columns=per_loop)
    steps = steps[["step", *(column for column in steps.columns if column != "step")]]
    step_numbers = table["step"].to_numpy(dtype=np.int64)
    loops = pd.concat([_loop_rows(stat, step_numbers, table[stat].tolist()) for stat in per_loop],
                      ignore_index=True) if per_loop else _loop_rows("", step_numbers[:0], [])
    return steps, loops


def _loop_rows(stat: str, steps: np.ndarray, column: list[Any]) -> pd.DataFrame:
    """Long rows for one per-loop stat; records without a list for it contribute none."""
    rows = [index for index, value in enumerate(column) if isinstance(value, list)]
    lists = [column[index] for index in rows]
    lengths = np.array([len(values) for values in lists], dtype=np.int64)
    # None (a loop with no value) becomes NaN.
    values = np.array(list(itertools.chain.from_iterable(lists)), dtype=np.float64)
    first_of_own_list = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return pd.DataFrame({
        "step": np.repeat(steps[rows], lengths),
        "loop": np.arange(len(values), dtype=np.int64) - first_of_own_list + 1,
        "stat": stat,
        "value": values,
    })


def event_frame(events: Sequence[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(events))
    extra = [c for c in frame.columns if c not in EVENT_COLUMNS]
    frame = frame.reindex(columns=[*EVENT_COLUMNS, *extra])
    return frame.astype({"step": "int64"})


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        summary = None
    if not isinstance(summary, dict):
        # Written atomically, so this is outside damage; the analyzer can recompute it.
        warnings.warn(f"{path}: not a JSON object, ignored", RunStoreWarning, stacklevel=3)
        return None
    return summary
