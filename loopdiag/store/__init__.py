"""The run store: one folder per run, the contract between recording and analysis.

    <run_dir>/
      config.json     the caller's resolved config + `run_info` (start time, package
                      versions, resumes); written atomically before step 1; `wandb.id`
                      (a resumed run goes on in that W&B run) when `loopdiag run`
                      mirrors the run to W&B
      metrics.jsonl   one JSON object per logged step: scalars and per-loop lists (a
                      validation loss at a step not logged is an object of its own, a
                      step and `val_*` values, which no detector judges); the one source
                      of truth for the records
      metrics.parquet the columnar copy of metrics.jsonl (derived; see below)
      events.jsonl    one JSON object per detector firing (step, detector, severity,
                      message, evidence)
      summary.json    the end verdict (status, step, signal, ...); written atomically at
                      close, absent when the run died or closed without one
      checkpoint.pt   optional, written by the trainer at `RunWriter.checkpoint_path`
    <suite_dir>/suite.json + one run folder per cell

A config.json or suite.json that holds no JSON object is a ValueError naming the file;
`load_suite` skips a run whose config.json is such, with a `RunStoreWarning`.

The files are append-only while training, so the analyzer may read a live run. NaN and
±Infinity are written as the bare tokens `NaN`, `Infinity`, `-Infinity` (Python's json
default): they read back unchanged with Python's json and pandas here, and a non-finite
loss is exactly the value this tool must not lose or confuse with a string. Strict JSON
tools (jq, browsers) reject those lines.

`metrics.jsonl` is the crash-safe log written while training. `metrics.parquet` is derived
from it (`loopdiag.store.columnar`: one column per key, per-loop statistics as list
columns, float32 where a column's values fit, zstd) and is what the analyzer reads, a few
columns at a time. It is written by `RunWriter.close`, and built again from the JSONL,
with a `RunStoreWarning`, by anything that reads the run (`load_run`, `loopdiag report`,
`analyze`, `compare`) whenever the two disagree: the copy is missing, unreadable, or was
built from a different JSONL (other size or content at its head or tail: a live, crashed
or resumed run). The JSONL always wins, but for an empty one: a folder that holds the copy
and no JSONL, or an empty one, is an archived run (the form in which the studies' records
are committed) and is read from the copy, with a warning for the empty JSONL; its float32
statistics are the logged values rounded to float32. `read_records` returns the records as
logged (from the JSONL where it holds any); `read_columns` returns
chosen keys as numpy arrays (per-loop keys as steps × loops, NaN-padded) for replaying
detectors fast; `build_columnar(suite_dir, jobs=...)` builds a whole suite's copies.
"""

from loopdiag.store._files import RunStoreWarning
from loopdiag.store.columnar import build_columnar, columnar_state, read_columns
from loopdiag.store.reader import RunData, event_frame, is_run_dir, load_run, read_records
from loopdiag.store.suite_folder import SuiteData, load_suite, write_suite_manifest
from loopdiag.store.writer import RESUMABLE_KEYS, RunWriter

__all__ = ["RESUMABLE_KEYS", "RunData", "RunStoreWarning", "RunWriter", "SuiteData", "build_columnar",
           "columnar_state", "event_frame", "is_run_dir", "load_run", "load_suite", "read_columns",
           "read_records", "write_suite_manifest"]
