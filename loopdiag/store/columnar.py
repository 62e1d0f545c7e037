"""The columnar copy of a run's records: `metrics.parquet`, derived from `metrics.jsonl`.

One row per record, one column per key, in the order keys first appear: `step` int64;
scalars as int64, bool, string or float; per-loop statistics as list columns (one list per
record, a record's loop count is its list's length). Floats are float32 where every
finite value of the column fits float32's normal range, else float64; `FLOAT64_KEYS`
(the loss a verdict is read from, the step, the learning rate) are always float64. A
column whose values are of mixed kinds (a number here, a string there) is stored as JSON
text. NaN and ±Inf are kept as such; a missing key and an explicit None are told apart.

Parquet's zstd with byte-stream-split floats; on the reference task's records the copy is
11% of the JSONL's size with float32 statistics and 17% with float64 ones (list columns;
the same records as a long (step, loop, stat, value) table: 1% larger).

The JSONL is parsed by Arrow's JSON reader (2.5x faster than `json.loads` per line) where
it reads the lines as `json` does; a file where the two could differ (a `null`, text, an
integer beyond int64, a torn line) is read line by line, to the same table.

The copy records what it was built from (size and a hash of the first and last 64 KiB of
the JSONL, and the record count) in its metadata: `columnar_state` tells a copy that still
matches its JSONL from a stale one without parsing the JSONL. File times are not used:
a git checkout gives every file the time of the checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loopdiag.store._files import (
    COLUMNAR_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    SUITE_FILE,
    RunStoreWarning,
    read_manifest,
    read_rows,
    replace_atomically,
)

if TYPE_CHECKING:
    import pyarrow as pa

FORMAT_VERSION = 1
METADATA_KEY = b"loopdiag"
FLOAT64_KEYS = frozenset({"step", "loss", "train_loss", "val_loss", "lr"})
FINGERPRINT_BYTES = 1 << 16
PRESENT_SUFFIX = "#present"  # companion column where both a missing key and None occur
_FLOAT32 = np.finfo(np.float32)


def columnar_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / COLUMNAR_FILE


def records_table(records: Sequence[dict[str, Any]], source: dict[str, Any] | None = None) -> pa.Table:
    """The records as one Arrow table (the copy's content); `source` goes in its metadata."""
    import pyarrow as pa

    keys = list(dict.fromkeys(key for record in records for key in record))
    arrays, columns = {}, {}
    for key in keys:
        values = [record.get(key) for record in records]
        array, encoding = _encode(key, values)
        arrays[key], columns[key] = array, {"encoding": encoding, "nulls": "none"}
        if array.null_count:
            present = [key in record for record in records]
            absent = len(present) - sum(present)
            if absent == array.null_count:
                columns[key]["nulls"] = "absent"
            elif absent:
                companion = key + PRESENT_SUFFIX
                while companion in keys or companion in arrays:
                    companion += "_"
                arrays[companion] = pa.array(present, pa.bool_())
                columns[key].update(nulls="mixed", present=companion)
    return _with_metadata(arrays, keys, columns, len(records), source)


def _with_metadata(arrays: dict[str, pa.Array], keys: list[str], columns: dict[str, Any],
                   records: int, source: dict[str, Any] | None) -> pa.Table:
    import pyarrow as pa

    metadata = {"version": FORMAT_VERSION, "keys": keys, "columns": columns,
                "records": records, "source": source}
    table = pa.table(arrays) if arrays else pa.table({"step": pa.array([], pa.int64())})
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata)})


def _encode(key: str, values: list[Any]) -> tuple[pa.Array, str]:
    import pyarrow as pa

    try:
        array = pa.array(values, from_pandas=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        array = None
    stored = None if array is None else _stored(key, array)
    if stored is not None:
        return stored, "value"
    text = [None if value is None else json.dumps(value) for value in values]
    return pa.array(text, pa.string()), "json"


def _stored(key: str, array: pa.Array) -> pa.Array | None:
    """The column as the copy stores it (floats narrowed where they fit, numbers, bools,
    text and nulls as they are), or None for a type stored as JSON text."""
    import pyarrow as pa

    kind = array.type
    if pa.types.is_list(kind) and (pa.types.is_floating(kind.value_type)
                                   or pa.types.is_integer(kind.value_type)
                                   or pa.types.is_null(kind.value_type)):
        if pa.types.is_integer(kind.value_type):
            return array
        return array.cast(pa.list_(_float_type(key, array.flatten())))
    if pa.types.is_floating(kind):
        return array.cast(_float_type(key, array))
    if (pa.types.is_integer(kind) or pa.types.is_boolean(kind) or pa.types.is_string(kind)
            or pa.types.is_null(kind)):
        return array
    return None


# Where Arrow's JSON reader and Python's `json` could read a line differently, the file is
# read line by line: `null` (Arrow cannot tell it from a missing key), "-NaN" and "Inf"
# (only Arrow takes them), and an integer beyond int64 (Arrow makes it a float).
_INT64_LIMIT = 2.0**63


def _arrow_table(data: bytes, fingerprint: dict[str, Any] | None) -> pa.Table | None:
    """`records_table` of the JSONL `data`, parsed by Arrow's JSON reader (several times
    faster than a `json.loads` per line): the same table whenever it returns one; None
    where Arrow could read the lines differently or a line is not a record (torn, not an
    object, no int step), which `read_rows` then reads and reports."""
    import pyarrow as pa
    import pyarrow.json as pa_json

    if b"null" in data or b"-NaN" in data or (
            b"Inf" in data and data.count(b"Inf") != data.count(b"Infinity")):
        return None
    try:
        parsed = pa_json.read_json(pa.BufferReader(data),
                                   read_options=pa_json.ReadOptions(use_threads=False))
    except pa.ArrowInvalid:
        return None
    step = parsed.schema.field("step").type if "step" in parsed.column_names else None
    if not parsed.num_rows or step != pa.int64() or parsed.column("step").null_count:
        return None
    arrays, columns = {}, {}
    for key in parsed.column_names:
        column = parsed.column(key).combine_chunks()
        kind = column.type
        value_kind = kind.value_type if pa.types.is_list(kind) else kind
        if ((pa.types.is_integer(value_kind) and value_kind != pa.int64())
                or pa.types.is_string(value_kind)):
            return None  # text, and integers Arrow did not read as int64, go line by line
        if pa.types.is_floating(value_kind):
            values = (column.flatten() if pa.types.is_list(kind) else column).to_numpy(
                zero_copy_only=False)
            if np.any(np.abs(values[np.isfinite(values)]) >= _INT64_LIMIT):
                return None  # may have been an integer too large for int64
        array = _stored(key, column)
        if array is None:
            return None
        # With no `null` in the file, a missing value is a key the record lacks.
        arrays[key] = array
        columns[key] = {"encoding": "value", "nulls": "absent" if array.null_count else "none"}
    return _with_metadata(arrays, parsed.column_names, columns, parsed.num_rows,
                          {**(fingerprint or {}), "records": parsed.num_rows})


def _float_type(key: str, values: pa.Array) -> pa.DataType:
    """float32 when every finite non-zero value lies in float32's normal range: a value
    beyond it would turn infinite or lose its digits, and change what a detector sees."""
    import pyarrow as pa

    if key in FLOAT64_KEYS:
        return pa.float64()
    numbers = np.abs(values.to_numpy(zero_copy_only=False).astype(np.float64))
    numbers = numbers[np.isfinite(numbers) & (numbers != 0)]
    fits = not len(numbers) or (numbers.min() >= _FLOAT32.tiny and numbers.max() <= _FLOAT32.max)
    return pa.float32() if fits else pa.float64()


def table_metadata(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError("not a loopdiag columnar copy (no metadata)")
    metadata = json.loads(raw)
    if metadata.get("version") != FORMAT_VERSION:
        raise ValueError(f"columnar format version {metadata.get('version')}, this reads "
                         f"{FORMAT_VERSION}")
    return metadata


def records_from_table(table: pa.Table) -> list[dict[str, Any]]:
    """The records a table holds, as `metrics.jsonl` held them (float32 columns come back
    as the float32 values, as Python floats)."""
    metadata = table_metadata(table.schema)
    keys, columns = metadata["keys"], metadata["columns"]
    values, present = {}, {}
    for key in keys:
        column = columns[key]
        values[key] = table.column(key).to_pylist()
        if column["encoding"] == "json":
            values[key] = [None if v is None else json.loads(v) for v in values[key]]
        if column["nulls"] == "absent":
            present[key] = [v is not None for v in values[key]]
        elif column["nulls"] == "mixed":
            present[key] = table.column(column["present"]).to_pylist()
    rows = []
    for index in range(table.num_rows):
        rows.append({key: values[key][index] for key in keys
                     if key not in present or present[key][index]})
    return rows


def source_fingerprint(path: Path) -> dict[str, Any] | None:
    """Size and a hash of the first and last 64 KiB of a JSONL file; None when absent."""
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(FINGERPRINT_BYTES)
            handle.seek(max(0, size - FINGERPRINT_BYTES))
            tail = handle.read(FINGERPRINT_BYTES)
    except FileNotFoundError:
        return None
    return {"bytes": size, "digest": hashlib.blake2b(head + tail, digest_size=16).hexdigest()}


def columnar_state(run_dir: str | Path) -> str:
    """'fresh' (the copy matches the JSONL), 'archived' (a readable copy, and no JSONL, the
    committed form of a study, or an empty one), 'missing', 'stale' (the JSONL changed
    since: a live, crashed or resumed run), 'corrupt' (unreadable), or 'none' (neither file)."""
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    source = source_fingerprint(run_dir / METRICS_FILE)
    path = columnar_path(run_dir)
    if not path.is_file():
        return "none" if source is None else "missing"
    try:
        metadata = table_metadata(pq.read_schema(path))
    except Exception:  # noqa: BLE001 - any unreadable file is treated alike: rebuilt
        return "corrupt"
    if source is None or source["bytes"] == 0:  # an emptied JSONL is no reason to drop the records
        return "archived"
    built_from = metadata.get("source") or {}
    same = {k: built_from.get(k) for k in source} == source
    return "fresh" if same else "stale"


STATE_NOTES = {
    "missing": "has no columnar copy",
    "stale": "has a columnar copy older than its metrics.jsonl (a live, crashed or resumed run)",
    "corrupt": "has an unreadable columnar copy",
}


def write_columnar(run_dir: str | Path) -> pa.Table | None:
    """Build `metrics.parquet` from `metrics.jsonl` and write it atomically; returns the
    table (None when the JSONL holds no record: no copy is written, a stale one removed).
    Where the folder is read-only the table is returned unsaved, with a warning."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    source = source_fingerprint(run_dir / METRICS_FILE)
    path = columnar_path(run_dir)
    try:
        data = (run_dir / METRICS_FILE).read_bytes()
    except FileNotFoundError:
        data = b""
    table = _arrow_table(data, source)
    if table is None:
        records = read_rows(run_dir / METRICS_FILE)
        if not records:
            path.unlink(missing_ok=True)
            return None
        table = records_table(records, {**(source or {}), "records": len(records)})
    floats = [field.name for field in table.schema if _is_float(field.type)]
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", use_byte_stream_split=floats or False,
                   use_dictionary=[n for n in table.column_names if n not in floats])
    try:
        replace_atomically(path, sink.getvalue().to_pybytes())
    except OSError as error:
        warnings.warn(UnsavedCopyWarning(f"{run_dir}: could not save {COLUMNAR_FILE} "
                                         f"({error.strerror or error}); read from {METRICS_FILE} "
                                         f"this time"), stacklevel=2)
    return table


class UnsavedCopyWarning(RunStoreWarning):
    """The columnar copy was built but could not be written (a read-only folder, a full disk)."""


def _is_float(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return pa.types.is_floating(kind) or (pa.types.is_list(kind) and
                                          pa.types.is_floating(kind.value_type))


class Columns:
    """A run's records in columnar form: the copy on disk, read a few columns at a time,
    or a table held in memory (a copy that could not be saved)."""

    def __init__(self, path: Path | None = None, table: pa.Table | None = None) -> None:
        self.path, self._table = path, table

    def read(self, names: Iterable[str] | None = None) -> pa.Table:
        import pyarrow.parquet as pq

        names = None if names is None else [n for n in names if n in self.names]
        if self._table is not None:
            return self._table if names is None else self._table.select(names)
        with pq.ParquetFile(self.path) as copy:  # a third of read_table's time: no dataset
            return copy.read(columns=names)

    @property
    def schema(self) -> pa.Schema:
        import pyarrow.parquet as pq

        if self._table is not None:
            return self._table.schema
        if not hasattr(self, "_schema"):
            self._schema = pq.read_schema(self.path)
        return self._schema

    @property
    def names(self) -> list[str]:
        return self.schema.names

    @property
    def metadata(self) -> dict[str, Any]:
        if not hasattr(self, "_metadata"):  # parsed once: every column read looks its keys up
            self._metadata = table_metadata(self.schema)
        return self._metadata


def open_columns(run_dir: str | Path, *, announce: bool = True) -> Columns | None:
    """The run's records in columnar form, building the copy first where it is missing,
    stale or corrupt (with a `RunStoreWarning` unless `announce` is False); None when
    the run has no records."""
    run_dir = Path(run_dir)
    state = columnar_state(run_dir)
    if state == "archived" and (run_dir / METRICS_FILE).is_file():
        warnings.warn(f"{run_dir / METRICS_FILE} is empty: the records are read from {COLUMNAR_FILE}",
                      RunStoreWarning, stacklevel=2)
    if state in ("fresh", "archived"):
        return Columns(path=columnar_path(run_dir))
    if state == "none":
        return None
    if state == "corrupt" and not (run_dir / METRICS_FILE).is_file():
        warnings.warn(f"{columnar_path(run_dir)} is unreadable and there is no {METRICS_FILE} "
                      f"to rebuild it from: the run reads as having no records",
                      RunStoreWarning, stacklevel=2)
        return None
    if announce:
        warnings.warn(f"{run_dir} {STATE_NOTES[state]}; rebuilt it from {METRICS_FILE}",
                      RunStoreWarning, stacklevel=2)
    table = write_columnar(run_dir)
    if table is None:
        return None
    path = columnar_path(run_dir)
    return Columns(path=path) if columnar_state(run_dir) == "fresh" else Columns(table=table)


def read_columns(run_dir: str | Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Selected record keys as numpy arrays, one entry per logged step, from the columnar
    copy (built first where needed). A scalar key gives a 1-D array (float64 with NaN for
    a step that lacks it; int64 and bool where always present; object for text); a
    per-loop key a 2-D float64 array (steps × the most loops logged), NaN-padded. Names
    the run never logged are left out. Float32 statistics are returned exactly, as
    float64. The fast path for replaying detectors over a stored run."""
    columns = open_columns(run_dir)
    if columns is None:
        return {}
    return table_columns(columns.read(names), names)


def table_columns(table: pa.Table, names: Sequence[str]) -> dict[str, np.ndarray]:
    import pyarrow as pa
    import pyarrow.compute as pc

    out = {}
    for name in names:
        if name not in table.column_names:
            continue
        column = table.column(name).combine_chunks()
        if pa.types.is_list(column.type):
            lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy().astype(np.int64)
            values = _as_float(column.flatten())
            width = int(lengths.max(initial=0))
            if (lengths == width).all():  # every step logged every loop: no padding to place
                out[name] = values.reshape(len(column), width)
                continue
            grid = np.full((len(column), width), np.nan)
            rows = np.repeat(np.arange(len(column)), lengths)
            grid[rows, np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)] = values
            out[name] = grid
        elif pa.types.is_floating(column.type) or (column.null_count and (
                pa.types.is_integer(column.type) or pa.types.is_null(column.type))):
            out[name] = _as_float(column)
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


def _as_float(array: pa.Array) -> np.ndarray:
    import pyarrow as pa

    return array.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def run_dirs(suite_dir: str | Path) -> list[Path]:
    """The run folders of a suite folder: those `suite.json` lists, else every subfolder
    with a config.json."""
    suite_dir = Path(suite_dir)
    if (suite_dir / SUITE_FILE).is_file():
        listed = [suite_dir / entry["run_id"] for entry in read_manifest(suite_dir)["runs"]]
    else:
        listed = sorted(suite_dir.iterdir()) if suite_dir.is_dir() else []
    return [path for path in listed if (path / CONFIG_FILE).is_file()]


REBUILT = ("missing", "stale", "corrupt")  # the states `build_columnar` builds a copy in


def _build(run_dir: Path) -> str | None:
    """Why the copy could not be saved, or None."""
    if not (run_dir / METRICS_FILE).is_file():
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RunStoreWarning)  # the caller reports the state
        write_columnar(run_dir)
    return next((str(w.message) for w in caught if issubclass(w.category, UnsavedCopyWarning)), None)


def build_columnar(suite_dir: str | Path, *, jobs: int = 1,
                   on_run: Callable[[Path, str], None] | None = None) -> dict[str, int]:
    """Build the columnar copy of every run of a suite folder that lacks a current one
    (`jobs` processes at once); returns how many runs were in each `columnar_state`
    before, and as "unsaved" how many copies could not be written (each with an
    `UnsavedCopyWarning`; the readers fall back to the JSONL). Stale and corrupt copies are
    rebuilt with a `RunStoreWarning`; `on_run(run_dir, state)` is called as each run is
    done (a progress bar)."""
    paths = run_dirs(suite_dir)
    counts: dict[str, int] = {}

    def done(path: Path, state: str, unsaved: str | None = None) -> None:
        counts[state] = counts.get(state, 0) + 1
        if unsaved is not None:
            counts["unsaved"] = counts.get("unsaved", 0) + 1
            warnings.warn(UnsavedCopyWarning(unsaved), stacklevel=3)
        elif state in ("stale", "corrupt"):
            warnings.warn(f"{path} {STATE_NOTES[state]}; rebuilt it from {METRICS_FILE}",
                          RunStoreWarning, stacklevel=3)
        if on_run is not None:
            on_run(path, state)

    states = {path: columnar_state(path) for path in paths}  # cheap: a current store
    todo = [path for path in paths if states[path] in REBUILT]  # starts no process
    for path in paths:
        if path not in todo:
            done(path, states[path])
    if jobs <= 1 or len(todo) <= 1:
        for path in todo:
            done(path, states[path], _build(path))
        return counts
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo))) as pool:
        for path, unsaved in zip(todo, pool.map(_build, todo, chunksize=1)):
            done(path, states[path], unsaved)
    return counts
