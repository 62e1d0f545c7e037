"""The run store: one folder per run, the contract between recording and analysis.

    <run_dir>/
      config.json     the caller's resolved config + `run_info` (start time, package
                      versions, resumes); written atomically before step 1
      metrics.jsonl   one JSON object per logged step: scalars and per-loop lists
      events.jsonl    one JSON object per detector firing (step, detector, severity,
                      message, evidence)
      summary.json    the end verdict (status, step, signal, ...); written atomically at
                      close, absent when the run died or closed without one
      checkpoint.pt   optional, written by the trainer at `RunWriter.checkpoint_path`
    <suite_dir>/suite.json + one run folder per cell

The files are append-only while training, so the analyzer may read a live run. NaN and
±Infinity are written as the bare tokens `NaN`, `Infinity`, `-Infinity` (Python's json
default): they read back unchanged with Python's json and pandas here, and a non-finite
loss is exactly the value this tool must not lose or confuse with a string. Strict JSON
tools (jq, browsers) reject those lines.
"""

from loopdiag.store._files import RunStoreWarning
from loopdiag.store.reader import RunData, event_frame, is_run_dir, load_run, read_records
from loopdiag.store.suite import SuiteData, load_suite, write_suite_manifest
from loopdiag.store.writer import RESUMABLE_KEYS, RunWriter

__all__ = ["RESUMABLE_KEYS", "RunData", "RunStoreWarning", "RunWriter", "SuiteData", "event_frame", "is_run_dir",
           "load_run", "load_suite", "read_records", "write_suite_manifest"]
