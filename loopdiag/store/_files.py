"""File names of a run folder and the few primitives every part of the store shares:
atomic replacement, the JSON fallback for non-builtin values, tolerant JSON-lines reading."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from loopdiag.detect.base import is_int

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
COLUMNAR_FILE = "metrics.parquet"  # derived from METRICS_FILE; see loopdiag.store.columnar
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"
SUITE_FILE = "suite.json"
LOOP_SCALING_FILE = "loop_scaling.csv"  # written by loopdiag.evaluation


class RunStoreWarning(UserWarning):
    """Part of a run store was unreadable and skipped (a torn line, a missing run)."""


def json_default(value: Any) -> Any:
    """Numpy/torch scalars and arrays, paths and dataclasses, as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable: {value!r}")


def replace_atomically(path: Path, text: str | bytes) -> None:
    """Replace `path` by `text` atomically (see `write_atomically`)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    write_atomically(path, lambda handle: handle.write(data))


def write_atomically(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write` on a temp file in the same folder, fsync, rename over `path`: readers
    see the old file or the new one, never a half-written one."""
    # open(..., "x") rather than mkstemp: the file gets the umask's permissions, not 0600,
    # so others on a shared cluster can read the run.
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp_path.open("xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    replace_atomically(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object a file holds (config.json, suite.json); a ValueError naming the file
    and what is wrong with it when it holds none. A missing file raises FileNotFoundError."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # UnicodeDecodeError included
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value


def read_manifest(suite_dir: Path) -> dict[str, Any]:
    """A suite folder's `suite.json`, checked as far as readers rely on it: a list of runs,
    each with a `run_id`."""
    path = suite_dir / SUITE_FILE
    manifest = read_json_object(path)
    runs = manifest.get("runs")
    if not (isinstance(runs, list) and all(isinstance(entry, dict) and isinstance(entry.get("run_id"), str)
                                           for entry in runs)):
        raise ValueError(f"{path}: 'runs' is not a list of runs, each with a 'run_id'")
    return manifest


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSON-lines file that is an object with an int `step`.

    Any other line is skipped with a `RunStoreWarning` naming the file and line: a torn
    last line is what a process killed mid-write leaves, and a bad line elsewhere must
    not cost the rest of the run. A missing file reads as no rows.
    """
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    last_number = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and is_int(row.get("step")):
            rows.append(row)
            continue
        where = ("the last line, torn by an interrupted write" if number == last_number
                 else "not a JSON object with an int 'step'")
        warnings.warn(f"{path}: skipped line {number} ({where})", RunStoreWarning, stacklevel=3)
    return rows
