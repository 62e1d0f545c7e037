"""A suite folder: run folders plus `suite.json`, loaded as one set of long tables."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loopdiag.store._files import SUITE_FILE, RunStoreWarning, read_manifest, write_json_atomic
from loopdiag.store.reader import RunData, event_frame, is_run_dir, load_run, metric_frames

# In a manifest's `spec.source`: the suite's file, this, then the command-line options given
# where they changed what the file asked for.
WITH_OPTIONS = ", with options "


@dataclass
class SuiteData:
    """Every run of a suite.

    `steps`, `loops` and `events` stack the runs' tables, each row led by `run_id` and the
    cell columns; `run_table` has one row per run: `run_id`, cell columns, summary `status`.
    `cell_columns` names the cell columns: each cell key's own name, or `cell_<key>` where
    the key clashes with a table column (a swept `lr` beside the logged per-step `lr`).
    `steps` and `loops` are stacked when first used: over a long sweep they are large,
    and the report reads only the columns it draws (`RunData.steps_of`, `loop_table`).
    """

    suite_dir: Path
    name: str
    manifest: dict[str, Any] | None  # None when loaded by scanning a folder without suite.json
    runs: dict[str, RunData]
    run_table: pd.DataFrame
    cell_columns: list[str]
    events: pd.DataFrame

    @property
    def spec(self) -> dict[str, Any] | None:
        return None if self.manifest is None else self.manifest.get("spec")

    @property
    def command_line_options(self) -> str | None:
        """The command-line options these runs were started with ("--seeds, --data") where
        they changed the suite's file, whose description then tells the file's grid, not
        the runs'; else None."""
        source = (self.spec or {}).get("source") or ""
        return source.rsplit(WITH_OPTIONS, 1)[1] if WITH_OPTIONS in source else None

    @cached_property
    def steps(self) -> pd.DataFrame:
        return self.stack([run.steps for run in self.runs.values()], metric_frames([])[0])

    @cached_property
    def loops(self) -> pd.DataFrame:
        return self.stack([run.loops for run in self.runs.values()], metric_frames([])[1])

    def stack(self, frames: list[pd.DataFrame], empty: pd.DataFrame) -> pd.DataFrame:
        """One frame per run (in `runs`' order) stacked, each row led by its run's keys."""
        return _stack(frames, self.run_table.drop(columns="status"), empty)


def write_suite_manifest(suite_dir: str | Path, spec: Mapping[str, Any],
                         runs: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write `suite.json` atomically: name (`spec["name"]`, else the folder's), the spec,
    and every run id (a folder in `suite_dir`) with its cell keys, e.g.
    `{"flt-k4-s0": {"arch": "flt", "n_loops": 4, "seed": 0, "lr": 3e-3}}`.

    Writing it before the runs exist is fine: `load_suite` skips unfinished ones with a
    warning. Returns the manifest's path.
    """
    suite_dir = Path(suite_dir)
    for run_id in runs:
        if run_id in ("", ".", "..") or Path(run_id).name != run_id:
            raise ValueError(f"run id {run_id!r} must be a plain folder name")
    suite_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"name": spec.get("name", suite_dir.resolve().name), "spec": dict(spec),
                "runs": [{"run_id": run_id, "cell": dict(cell)} for run_id, cell in runs.items()]}
    path = suite_dir / SUITE_FILE
    write_json_atomic(path, manifest)
    return path


def load_suite(suite_dir: str | Path) -> SuiteData:
    """Load every run of a suite in one call.

    With `suite.json`, its runs in its order (listed runs missing on disk are skipped with a
    `RunStoreWarning`; unlisted folders are ignored). Without it, every subfolder holding a
    `config.json`, by name, with cell keys from each config's top-level `cell` dict. A run
    whose config.json is corrupt is skipped with a `RunStoreWarning`; a corrupt suite.json
    is a ValueError naming it.
    """
    suite_dir = Path(suite_dir)
    manifest_path = suite_dir / SUITE_FILE
    runs: dict[str, RunData] = {}
    if manifest_path.is_file():
        manifest = read_manifest(suite_dir)
        name = manifest.get("name", suite_dir.resolve().name)
        cells = {}
        for entry in manifest["runs"]:
            run_dir = suite_dir / entry["run_id"]
            if not is_run_dir(run_dir):
                warnings.warn(f"{manifest_path} lists run {entry['run_id']!r}, but {run_dir} is "
                              f"not a run folder (missing or unfinished); skipped",
                              RunStoreWarning, stacklevel=2)
            elif (run := _load_or_skip(run_dir)) is not None:
                runs[run_dir.name] = run
                cells[run_dir.name] = entry.get("cell", {})
    else:
        if not suite_dir.exists():
            raise FileNotFoundError(f"{suite_dir}: no such folder")
        if is_run_dir(suite_dir):
            raise FileNotFoundError(f"{suite_dir} is a run folder, not a suite folder: its suite is "
                                    f"the folder above it")
        manifest, name = None, suite_dir.resolve().name
        if suite_dir.is_dir():
            for path in sorted(suite_dir.iterdir()):
                if is_run_dir(path) and (run := _load_or_skip(path)) is not None:
                    runs[path.name] = run
        if not runs:
            raise FileNotFoundError(f"{suite_dir} is not a suite folder: no {SUITE_FILE} and "
                                    f"no run folders (subfolders with a config.json)")
        cells = {run_id: run.config.get("cell") if isinstance(run.config.get("cell"), dict)
                 else {} for run_id, run in runs.items()}

    empty_steps, empty_loops = metric_frames([])
    events = [run.events for run in runs.values()]
    taken = ({"run_id", "status"} | set(empty_loops.columns) | set(empty_steps.columns)
             | {column for run in runs.values() for column in run.step_columns}
             | {column for frame in [*events, event_frame([])] for column in frame.columns})
    cell_keys = dict.fromkeys(key for cell in cells.values() for key in cell)
    column_of = {key: f"cell_{key}" if key in taken else key for key in cell_keys}
    run_table = pd.DataFrame({
        "run_id": pd.Series(list(runs), dtype=str),
        **{column: [cells[run_id].get(key) for run_id in runs] for key, column in column_of.items()},
        "status": [(run.summary or {}).get("status") for run in runs.values()],
    })
    keys = run_table.drop(columns="status")
    return SuiteData(suite_dir=suite_dir, name=name, manifest=manifest, runs=runs,
                     run_table=run_table, cell_columns=list(column_of.values()),
                     events=_stack(events, keys, event_frame([])))


def _load_or_skip(run_dir: Path) -> RunData | None:
    """The run; None, with a `RunStoreWarning`, when it cannot be read (a corrupt
    config.json): one damaged run must not cost the rest of the suite."""
    try:
        return load_run(run_dir)
    except ValueError as error:
        warnings.warn(f"{error}; run {run_dir.name!r} skipped", RunStoreWarning, stacklevel=3)
        return None


def _stack(frames: list[pd.DataFrame], keys: pd.DataFrame, empty: pd.DataFrame) -> pd.DataFrame:
    """Stack the runs' frames (in `keys`' row order), each row led by its run's keys: one
    concat and one gather, never a per-run column insert."""
    if not frames:
        return pd.concat([keys, empty], axis=1)
    owner = np.repeat(np.arange(len(frames)), [len(frame) for frame in frames])
    front = keys.iloc[owner].reset_index(drop=True)
    return pd.concat([front, pd.concat(frames, ignore_index=True)], axis=1)
