"""Reading W&B's offline run files back, so tests check what W&B really received.

wandb 0.31 writes an offline run as `<dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb`:
the LevelDB log format (https://github.com/google/leveldb/blob/main/doc/log_format.md)
after a 7-byte `:W&B` header, each record a `wandb_internal_pb2.Record`. The Python
`DataStore` reader is gone from 0.31 (the backend is Go), so `read_records` below parses
the blocks itself and leaves the payloads to wandb's own protobuf classes.

`run.finish()` can return before the backend has flushed and closed the file, so
`wait_for_run_file` reads until the last record is the run's `exit`.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

FILE_HEADER_LEN = 7  # ident ":W&B", magic uint16, version uint8
BLOCK_LEN = 32768
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
FULL, LAST = 1, 4
FLUSH_TIMEOUT_S = 15.0


def read_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, payload, pos = [], b"", FILE_HEADER_LEN
    while pos + CHUNK_HEADER.size <= len(data):
        if BLOCK_LEN - pos % BLOCK_LEN < CHUNK_HEADER.size:  # block trailer: zero padding
            pos += BLOCK_LEN - pos % BLOCK_LEN
            continue
        _, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if pos + CHUNK_HEADER.size + length > len(data):  # still being written
            break
        payload += data[pos + CHUNK_HEADER.size: pos + CHUNK_HEADER.size + length]
        pos += CHUNK_HEADER.size + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def wait_for_run_file(run_dir: Path) -> list[Any]:
    deadline = time.monotonic() + FLUSH_TIMEOUT_S
    while True:
        records = [record for path in run_dir.glob("*.wandb") for record in read_records(path)]
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"no complete run file in {run_dir}"
        time.sleep(0.05)


def collect(items: Any, into: dict[str, Any] | None = None) -> dict[str, Any]:
    """Items keyed by `key` or by a `nested_key` path (media are written as one item per field)."""
    into = {} if into is None else into
    for item in items:
        *parents, last = item.nested_key or [item.key]
        target = into
        for parent in parents:
            target = target.setdefault(parent, {})
        target[last] = json.loads(item.value_json)
    return into


def read_run(run_dir: Path) -> dict[str, Any]:
    """The run record, config, history rows, final summary and alerts of one offline run."""
    run: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "alerts": []}
    for record in wait_for_run_file(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["run"] = record.run
            collect(record.run.config.update, run["config"])
        elif kind == "config":
            collect(record.config.update, run["config"])
        elif kind == "history":
            run["history"].append(collect(record.history.item))
        elif kind == "summary":
            collect(record.summary.update, run["summary"])
        elif kind == "alert":
            run["alerts"].append(record.alert)
    return run


def read_table(run_dir: Path, ref: dict[str, Any]) -> dict[str, Any]:
    assert ref["_type"] == "table-file"
    return json.loads((run_dir / "files" / ref["path"]).read_text())


