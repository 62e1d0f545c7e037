"""Writing one run folder: the config before step 1, metrics and events appended while
training, the summary at the end. See `loopdiag.store` for the folder layout."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import platform
import shutil
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

from loopdiag.store._files import (
    CHECKPOINT_FILE,
    COLUMNAR_FILE,
    CONFIG_FILE,
    EVENTS_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    is_int,
    json_default,
    RunStoreWarning,
    read_json_object,
    read_rows,
    replace_atomically,
    write_json_atomic,
)

# Dotted config paths a resumed run may change: they decide how long and where the run
# goes on, or where it is mirrored, not what is trained. Everything else must match the
# stored config.
RESUMABLE_KEYS = frozenset({"train.steps", "train.eval_every", "train.checkpoint_every",
                            "train.device", "wandb"})
# config.json holds the caller's config plus this one key, which the writer owns.
RUN_INFO_KEY = "run_info"
# The errors of a disk that cannot take a write: full, over quota, read-only, gone, locked.
WRITE_FAILURES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES,
                            errno.EPERM})


class _JsonlAppender:
    """Appends JSON lines, handing them to the OS `flush_every` lines at a time.

    Lines wait here, not in a file buffer, so only whole lines reach the file: a killed
    process leaves at most one torn line, when the kill lands mid-write. A write that fails
    (a full disk) is cut back off the file, which keeps only whole lines, and its lines are
    dropped: the caller stops the run there.
    """

    def __init__(self, path: Path, flush_every: int) -> None:
        self.flush_every = flush_every
        self._handle = path.open("ab", buffering=0)
        self._pending: list[str] = []
        self._lock = threading.Lock()  # the periodic flusher runs on its own thread

    def append(self, line: str) -> None:
        with self._lock:
            self._pending.append(line)
            if len(self._pending) >= self.flush_every:
                self._write_pending()

    def flush(self) -> None:
        with self._lock:
            if not self._handle.closed:
                self._write_pending()

    def close(self) -> None:
        with self._lock:
            if self._handle.closed:
                return
            try:
                self._write_pending()
                os.fsync(self._handle.fileno())
            finally:
                self._handle.close()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        data = memoryview("".join(self._pending).encode("utf-8"))
        self._pending.clear()
        size = os.fstat(self._handle.fileno()).st_size
        try:
            while data:
                data = data[self._handle.write(data):]
        except OSError:
            os.ftruncate(self._handle.fileno(), size)  # frees what it took, never needs space
            raise


def _flush_periodically(appender: _JsonlAppender, stop: threading.Event, seconds: float) -> None:
    # Holds no reference to the writer, so a writer that is dropped unclosed is still
    # collected and its finaliser flushes what was pending.
    while not stop.wait(seconds):
        try:
            appender.flush()
        except OSError:  # the writer meets it at its next write or close and stops the run
            return


def _shut(stop: threading.Event, appenders: tuple[_JsonlAppender, ...], errors: list[OSError]) -> None:
    # Collects rather than raises: at garbage collection or exit a raise would only print a
    # traceback; `close` raises the first.
    stop.set()
    for appender in appenders:
        try:
            appender.close()
        except OSError as error:
            errors.append(error)


class RunWriter:
    """Writes one run folder; use it as a context manager so a crash still leaves a summary.

    `config.json` (the given config plus `run_info`: start time and package versions) is
    written atomically here, before any step. `log` appends one record per logged step to
    `metrics.jsonl`, flushed every `flush_every` records and at least every `flush_seconds`
    (by a background thread), fsynced on close. `event` appends to `events.jsonl` and
    flushes at once. `close(summary)` writes `summary.json` atomically.

    A write that fails (`OSError`: a full disk, a lost mount) raises, leaves the logs on
    disk whole up to the last line written, and makes every later `log`, `event` and
    `flush` raise it again, so the logs never skip a record; `close` still tries the summary.

    A record is a flat dict with an int `step` (strictly increasing) whose values are
    scalars (number, str, bool, None) or per-loop lists of numbers; numpy and torch
    scalars/vectors are converted. NaN and ±Inf are stored as Python's json writes them.

    A non-empty folder is never overwritten. With `resume=True` an existing run is reopened:
    the config must match the stored one except `RESUMABLE_KEYS`; records and events
    after `resume_step` (all kept when None) are dropped, torn lines too, by an atomic
    rewrite, and a stale `summary.json` is removed. A folder without `config.json` starts
    fresh, as `train(resume=True)` does without a checkpoint. With the trainer, open the
    writer in `TrainCallback.on_train_start`, where `state.step` is the restored
    checkpoint's step (0 when starting over): `resume=True, resume_step=state.step`.
    """

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any], *, flush_every: int = 10,
                 flush_seconds: float = 5.0, resume: bool = False,
                 resume_step: int | None = None) -> None:
        if not (is_int(flush_every) and flush_every >= 1):
            raise ValueError(f"flush_every must be an int >= 1, got {flush_every!r}")
        if not flush_seconds > 0:
            raise ValueError(f"flush_seconds must be > 0, got {flush_seconds!r}")
        if resume_step is not None and not (resume and is_int(resume_step)):
            raise ValueError(f"resume_step={resume_step!r} needs resume=True and an int step")
        self.run_dir = Path(run_dir)
        self.write_error: OSError | None = None
        config = _plain_config(config)
        if resume and (self.run_dir / CONFIG_FILE).is_file():
            self.last_step = self._reopen(config, resume_step)
        else:
            self._start(config, resume)
            self.last_step = resume_step
        self._metrics = _JsonlAppender(self.run_dir / METRICS_FILE, flush_every)
        self._events = _JsonlAppender(self.run_dir / EVENTS_FILE, flush_every=1)
        stop = threading.Event()
        threading.Thread(target=_flush_periodically, args=(self._metrics, stop, flush_seconds),
                         name=f"RunWriter flusher {self.run_dir.name}", daemon=True).start()
        # Runs on close, on garbage collection, or at interpreter exit, whichever is first.
        self._close_errors: list[OSError] = []
        self._shutdown = weakref.finalize(self, _shut, stop, (self._metrics, self._events),
                                          self._close_errors)

    @property
    def checkpoint_path(self) -> Path:
        """Where the trainer should save its checkpoint (`train(checkpoint_path=...)`)."""
        return self.run_dir / CHECKPOINT_FILE

    @property
    def closed(self) -> bool:
        return not self._shutdown.alive

    def log(self, record: Mapping[str, Any]) -> None:
        self._check_open()
        row = _plain_record(record)
        step = row.get("step")
        if not is_int(step):
            raise ValueError(f"a record needs an int 'step', got {step!r}")
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"steps must strictly increase: step {step} after step "
                             f"{self.last_step} in {self.run_dir}")
        self._write(self._metrics.append, json.dumps(row) + "\n")
        self.last_step = step

    def event(self, event: Mapping[str, Any] | Any) -> None:
        """One detector firing: a dict or dataclass with an int `step` and a `detector`,
        usually also `severity`, `message` and `evidence` (any JSON-able value)."""
        self._check_open()
        row = dataclasses.asdict(event) if dataclasses.is_dataclass(event) else dict(event)
        if not is_int(row.get("step")) or "detector" not in row:
            raise ValueError(f"an event needs an int 'step' and a 'detector', got {row!r}")
        self._write(self._events.append, json.dumps(row, default=json_default) + "\n")

    def flush(self) -> None:
        """Hand every logged line to the OS now: call before a checkpoint is saved, so the
        logs on disk always reach at least the step a resume restarts from."""
        self._check_open()
        for appender in (self._metrics, self._events):
            self._write(appender.flush)

    def close(self, summary: Mapping[str, Any] | None = None) -> None:
        """Flush and fsync the logs; write `summary.json` when a summary is given
        (`last_step` is added unless the summary sets it). Closing twice is a no-op."""
        if self.closed:
            if summary is not None:
                raise RuntimeError(f"run {self.run_dir} is already closed; summary not written")
            return
        self._shutdown()
        logs_failed = self._close_errors[0] if self._close_errors else None
        self.write_error = self.write_error or logs_failed
        if summary is not None:  # tried even so: a stopped run's summary is what says why
            summary = {**summary}
            summary.setdefault("last_step", self.last_step)
            write_json_atomic(self.run_dir / SUMMARY_FILE, summary)
        if logs_failed is not None:
            raise logs_failed
        if self.write_error is not None:
            return  # no space for a copy the reader rebuilds anyway
        # After the summary, which a stopping run must not lose: the copy is derived (rebuilt
        # on demand) and its first build imports pyarrow.
        _write_columnar_copy(self.run_dir)

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if exc is None or self.closed:
            self.close()
        else:
            self.close({"status": "interrupted", "error": f"{type(exc).__name__}: {exc}"})

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"run {self.run_dir} is closed")
        if self.write_error is not None:
            raise self.write_error

    def _write(self, write: Callable[..., None], *line: str) -> None:
        try:
            write(*line)
        except OSError as error:
            self.write_error = error
            raise

    def _start(self, config: dict[str, Any], resume: bool) -> None:
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            if resume:
                raise FileExistsError(f"cannot resume {self.run_dir}: it has no {CONFIG_FILE} "
                                      f"but is not empty, so it is not a run folder")
            raise FileExistsError(f"run folder {self.run_dir} exists and is not empty; pass "
                                  f"resume=True to continue that run, or choose a new folder")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        run_info = {"started_at": _now(), "versions": _versions()}
        write_json_atomic(self.run_dir / CONFIG_FILE, {**config, RUN_INFO_KEY: run_info})

    def _reopen(self, config: dict[str, Any], resume_step: int | None) -> int | None:
        stored = read_json_object(self.run_dir / CONFIG_FILE)
        run_info = stored.pop(RUN_INFO_KEY, {})
        differences = _config_differences(stored, config)
        if differences:
            raise ValueError(f"cannot resume {self.run_dir}: the config differs from the stored "
                             f"one (stored vs given): " + "; ".join(differences))
        records = read_rows(self.run_dir / METRICS_FILE)
        events = read_rows(self.run_dir / EVENTS_FILE)
        if resume_step is not None:
            records = [row for row in records if row["step"] <= resume_step]
            events = [row for row in events if row["step"] <= resume_step]
        # Rewritten even when nothing is dropped: appending after a torn line would glue
        # the first new record onto it.
        for name, rows in ((METRICS_FILE, records), (EVENTS_FILE, events)):
            replace_atomically(self.run_dir / name, "".join(json.dumps(row) + "\n" for row in rows))
        (self.run_dir / SUMMARY_FILE).unlink(missing_ok=True)  # the verdict is no longer final
        (self.run_dir / COLUMNAR_FILE).unlink(missing_ok=True)  # rebuilt from the JSONL at close
        last_logged = max((row["step"] for row in records), default=None)
        run_info.setdefault("resumes", []).append(
            {"at": _now(), "resume_step": resume_step, "last_logged_step": last_logged,
             "versions": _versions()})
        write_json_atomic(self.run_dir / CONFIG_FILE, {**config, RUN_INFO_KEY: run_info})
        # Training goes on from the checkpoint at resume_step; a record at or before it
        # would repeat the checkpoint's past even where that past was never flushed.
        return last_logged if resume_step is None else resume_step


def write_failure(path: str | Path, error: BaseException) -> str | None:
    """One line for an error that is a failed write under `path` (a full, read-only or lost
    disk), naming the path and the space left there; None for any other error."""
    if not (isinstance(error, OSError) and error.errno in WRITE_FAILURES):
        return None
    return f"cannot write to {path}: {error.strerror or error} ({free_space(Path(path))} free there)"


def free_space(path: Path) -> str:
    """The free space on the disk holding `path` (or its nearest existing parent), e.g. 12 KB."""
    existing = next((folder for folder in (path, *path.parents) if folder.exists()), Path("."))
    return byte_size(shutil.disk_usage(existing).free)


def byte_size(count: float) -> str:
    """`count` bytes for a reader: 512 bytes, 12.0 KB, 1.9 TB (units of 1024)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("the loop returns at TB")


def check_writable(folder: str | Path) -> None:
    """Raise the `OSError` a write into `folder` meets (created if missing), before any run
    depends on it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-check.{os.getpid()}"
    try:
        with probe.open("wb") as handle:
            handle.write(b"\0" * 65536)  # a config and the first records' worth
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        probe.unlink(missing_ok=True)


def _write_columnar_copy(run_dir: Path) -> None:
    """The columnar copy of the finished logs; a failure costs the copy, never the run
    (the analyzer builds it from the JSONL when it is missing)."""
    from loopdiag.store.columnar import write_columnar

    try:
        write_columnar(run_dir)
    except Exception as error:  # noqa: BLE001 - the JSONL is the record; the copy is derived
        warnings.warn(f"{run_dir}: could not write {COLUMNAR_FILE} ({type(error).__name__}: "
                      f"{error}); it is built again when the run is read", RunStoreWarning,
                      stacklevel=3)


def _config_differences(stored: Mapping[str, Any], given: Mapping[str, Any],
                       resumable: frozenset[str] = RESUMABLE_KEYS, prefix: str = "") -> list[str]:
    """'path: stored != given' for every leaf that differs, skipping `resumable` paths."""
    differences = []
    for key in sorted(set(stored) | set(given), key=str):
        path = f"{prefix}{key}"
        if path in resumable:
            continue
        old, new = stored.get(key, "<missing>"), given.get(key, "<missing>")
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            differences += _config_differences(old, new, resumable, f"{path}.")
        elif old != new and not (old != old and new != new):  # NaN == NaN here
            differences.append(f"{path}: {old!r} != {new!r}")
    return differences


def _plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as config.json will hold it (tuples as lists, paths as str), so a resumed
    run compares like with like."""
    if RUN_INFO_KEY in config:
        raise ValueError(f"config key {RUN_INFO_KEY!r} is reserved for the run store")
    return json.loads(json.dumps(dict(config), default=json_default))


def _plain_record(record: Mapping[str, Any]) -> dict[str, Any]:
    row = {}
    for key, value in record.items():
        if not isinstance(key, str):
            raise TypeError(f"record keys must be str, got {key!r}")
        value = value.tolist() if hasattr(value, "tolist") else value  # numpy / torch
        if isinstance(value, (list, tuple)):
            value = [v.tolist() if hasattr(v, "tolist") else v for v in value]
            if not all(v is None or isinstance(v, (int, float)) for v in value):
                raise TypeError(f"record[{key!r}]: a per-loop list holds numbers only, got {value!r}")
        elif not (value is None or isinstance(value, (int, float, str))):
            raise TypeError(f"record[{key!r}] must be a scalar or a per-loop list of numbers, "
                            f"got {type(value).__name__}")
        row[key] = value
    return row


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str | None]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": version("torch"),
            "loopdiag": version("loopdiag"), "platform": platform.platform()}
