"""Reading one run folder into pandas, with nothing but the folder."""

from __future__ import annotations

import functools
import itertools
import json
import warnings
from collections.abc import Sequence
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
    read_json_object,
    read_rows,
)
from loopdiag.store.columnar import Columns, columnar_path, open_columns, records_from_table, table_columns

EVENT_COLUMNS = ("step", "detector", "severity", "message", "evidence")


class RunData:
    """One run as tables.

    `steps`: one row per logged step, the records' scalar values (`step` first).
    `loops`: long table (step, loop, stat, value) from every per-loop list, loop 1-based.
    `events`: one row per detector firing; `EVENT_COLUMNS` always present.
    `summary`: the stored verdict, or None when the run never wrote one.
    `config`: as stored, including the writer's `run_info` (start time, versions).

    `steps` and `loops` are read from the run's columnar copy when first used (see
    `loopdiag.store.columnar`), so a suite of long runs costs nothing until a table is
    asked for; `loop_table(stat)` reads a single per-loop statistic.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], steps: pd.DataFrame | None = None,
                 loops: pd.DataFrame | None = None, events: pd.DataFrame | None = None,
                 summary: dict[str, Any] | None = None, *, columns: Columns | None = None) -> None:
        self.run_dir, self.config, self.summary = Path(run_dir), config, summary
        self.events = event_frame([]) if events is None else events
        self._steps, self._loops, self._columns = steps, loops, columns
        self._loop_tables: dict[str, pd.DataFrame] = {}
        self._step_series: dict[str, pd.Series] = {}  # columns `steps_of` has read

    def __repr__(self) -> str:
        return f"RunData({str(self.run_dir)!r})"

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    @property
    def checkpoint_path(self) -> Path | None:
        path = self.run_dir / CHECKPOINT_FILE
        return path if path.is_file() else None

    @property
    def steps(self) -> pd.DataFrame:
        if self._steps is None:
            self._steps = (metric_frames([])[0] if self._columns is None
                           else steps_frame(self._columns))
        return self._steps

    @property
    def loops(self) -> pd.DataFrame:
        if self._loops is None:
            self._loops = (metric_frames([])[1] if self._columns is None
                           else loops_frame(self._columns))
        return self._loops

    @property
    def step_columns(self) -> list[str]:
        """The columns `steps` has, known without reading it."""
        if self._steps is not None or self._columns is None:
            return list(self.steps.columns)
        return ["step", *(key for key in _scalar_keys(self._columns) if key != "step")]

    def steps_of(self, names: Sequence[str]) -> pd.DataFrame:
        """`steps` restricted to `step` and those of `names` it has, each column read
        once (the table, the report's curves and its explanations ask for the same)."""
        wanted = ["step", *(name for name in names if name != "step")]
        if self._steps is not None or self._columns is None:
            return self.steps[[name for name in wanted if name in self.steps.columns]]
        scalars = set(_scalar_keys(self._columns))
        present = [name for name in wanted if name in scalars]
        self.read_ahead(present)
        return pd.DataFrame({name: self._step_series[name] for name in present})

    def loop_table(self, stat: str) -> pd.DataFrame:
        """One per-loop statistic as a (step × loop) table, loops numbered from 1; steps
        without it left out. Empty when the run never logged it."""
        if stat not in self._loop_tables:
            if self._loops is not None or self._columns is None:
                rows = self.loops[self.loops["stat"] == stat]
                self._loop_tables[stat] = rows.pivot_table(
                    index="step", columns="loop", values="value", aggfunc="first", dropna=False)
            else:
                self.read_ahead([stat])
                if stat not in self._loop_tables:  # a scalar column has no per-loop table
                    self._loop_tables[stat] = _loop_frame(np.empty(0), np.empty((0, 0)))
        return self._loop_tables[stat]

    def read_ahead(self, names: Sequence[str]) -> None:
        """Read the scalar columns and per-loop statistics among `names` that `steps_of`
        and `loop_table` have not read yet, in one pass over the columnar copy (a sweep's
        table asks both of every run: one file read each instead of two). A name the run
        never logged reads as an empty per-loop table."""
        if self._columns is None:
            return
        scalars = set(_scalar_keys(self._columns))
        # A table already read whole answers its own names.
        unread = [name for name in dict.fromkeys(names)
                  if name not in self._step_series and name not in self._loop_tables
                  and not (self._steps is not None and name in scalars)
                  and not (self._loops is not None and name not in scalars)]
        if not unread:
            return
        table = self._columns.read(dict.fromkeys(["step", *unread]))
        stats = [name for name in unread if name not in scalars]
        listed = [name for name in stats if name in table.column_names]
        frame = _to_frame(table.drop_columns(listed))
        self._step_series.update((name, frame[name]) for name in frame.columns if name in scalars)
        arrays = table_columns(table, listed)
        steps = table.column("step").to_numpy() if "step" in table.column_names else np.empty(0)
        for stat in stats:
            self._loop_tables[stat] = _loop_frame(steps, arrays.get(stat, np.empty((0, 0))))


def _loop_frame(steps: np.ndarray, grid: np.ndarray) -> pd.DataFrame:
    """A (step × loop) grid as `RunData.loop_table` gives it: loops from 1, steps where
    every loop is NaN left out."""
    frame = pd.DataFrame(grid, index=pd.Index(steps[:len(grid)], name="step"),
                         columns=pd.RangeIndex(1, grid.shape[1] + 1, name="loop"))
    return frame[~np.isnan(grid).all(axis=1)] if grid.size else frame.iloc[:0]


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def load_run(run_dir: str | Path) -> RunData:
    """Load a run folder; unreadable lines are skipped with a `RunStoreWarning`, and a
    missing, stale or corrupt columnar copy is rebuilt from `metrics.jsonl` with one. A
    corrupt config.json is a ValueError naming it."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        why = "it does not exist" if not run_dir.exists() else f"it has no {CONFIG_FILE}"
        raise FileNotFoundError(f"{run_dir} is not a run folder: {why}")
    config = read_json_object(run_dir / CONFIG_FILE)
    events = event_frame(read_rows(run_dir / EVENTS_FILE))
    return RunData(run_dir=run_dir, config=config, events=events,
                   summary=_read_summary(run_dir / SUMMARY_FILE), columns=open_columns(run_dir))


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's records as logged (for replaying detectors): from `metrics.jsonl`, torn
    lines skipped, or, where the folder holds only the columnar copy (an archived run) or
    an empty JSONL beside it, from that copy (float32 statistics as their float32 values)."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and (metrics.stat().st_size or not columnar_path(run_dir).is_file()):
        return read_rows(metrics)
    columns = open_columns(run_dir)
    return [] if columns is None else records_from_table(columns.read())


def _scalar_keys(columns: Columns) -> list[str]:
    import pyarrow as pa

    metadata, schema = columns.metadata, columns.schema
    return [key for key in metadata["keys"] if metadata["columns"][key]["encoding"] != "json"
            and not pa.types.is_list(schema.field(key).type)]


def _to_frame(table: Any) -> pd.DataFrame:
    """An Arrow table as pandas, floats as float64 (straight to numpy: `to_pandas` and a
    cast cost more than reading the columns)."""
    import pyarrow as pa

    return pd.DataFrame({
        field.name: (table.column(field.name).to_numpy().astype(np.float64)
                     if pa.types.is_floating(field.type) else table.column(field.name).to_pandas())
        for field in table.schema})


def steps_frame(columns: Columns) -> pd.DataFrame:
    metadata = columns.metadata
    if any(column["encoding"] == "json" for column in metadata["columns"].values()):
        return metric_frames(records_from_table(columns.read()))[0]  # mixed kinds: rare
    keys = _scalar_keys(columns)
    return _to_frame(columns.read(["step", *(key for key in keys if key != "step")]))


def loops_frame(columns: Columns) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.compute as pc

    metadata, schema = columns.metadata, columns.schema
    if any(column["encoding"] == "json" for column in metadata["columns"].values()):
        return metric_frames(records_from_table(columns.read()))[1]
    stats = [key for key in metadata["keys"] if pa.types.is_list(schema.field(key).type)]
    if not stats:
        return metric_frames([])[1]
    table = columns.read(["step", *stats])
    steps = table.column("step").to_numpy()
    parts = []
    for stat in stats:
        column = table.column(stat).combine_chunks()
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy().astype(np.int64)
        values = column.flatten().cast(pa.float64()).to_numpy(zero_copy_only=False)
        first_of_own_list = np.repeat(np.cumsum(lengths) - lengths, lengths)
        parts.append(pd.DataFrame({
            "step": np.repeat(steps, lengths),
            "loop": np.arange(len(values), dtype=np.int64) - first_of_own_list + 1,
            "stat": stat,
            "value": values.astype(np.float64),
        }))
    return pd.concat(parts, ignore_index=True)


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
    if not events:  # most runs: built once, copied
        return _no_events().copy()
    return _events_frame(events)


@functools.cache
def _no_events() -> pd.DataFrame:
    return _events_frame([])


def _events_frame(events: Sequence[dict[str, Any]]) -> pd.DataFrame:
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
