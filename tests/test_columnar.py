"""The columnar copy (metrics.parquet): derived from metrics.jsonl, rebuilt whenever it
disagrees, and read alone where it is the only form of a run's records."""

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from loopdiag.analysis import run_verdict, write_report
from loopdiag.detect import default_detectors, replay, verdict
from loopdiag.store import RunStoreWarning, RunWriter, load_run, load_suite, read_records
from loopdiag.store.columnar import build_columnar, columnar_state, read_columns
from run_files import write_run

pytestmark = pytest.mark.torchless  # also run on Python 3.12 / 3.13 without torch

TASK_RUNS = Path(__file__).resolve().parents[1] / "reports" / "flt-stability-task" / "runs"
CONFIG = {"model": {"arch": "flt", "n_loops": 3}, "train": {"steps": 4, "lr": 3e-3}}
RECORDS = [
    {"step": 1, "loss": 2.5, "lr": 1e-3, "phase": "warmup", "n_loops": 3,
     "resid_norm": [1.0, 2.0, 3.0], "rel_update": [math.nan, 0.25, None]},
    {"step": 2, "loss": math.nan, "lr": 1e-3, "phase": "main", "n_loops": 3, "flag": True,
     "resid_norm": [1.5, math.inf, -math.inf, 4.0], "grad_norm": 1e-45, "note": None},
    {"step": 3, "loss": 2.0, "lr": 1e-3, "n_loops": 3, "val_loss": 2.2, "grad_norm": 0.5,
     "mixed": "text"},
    {"step": 4, "loss": 1.9, "lr": 1e-3, "n_loops": 3, "resid_norm": [2.0], "mixed": 3,
     "note": 1.5},
]


def write_records(run_dir: Path, records=RECORDS, summary=None) -> Path:
    return write_run(run_dir, records, CONFIG, summary=summary or {"status": "stable"})


def same(a, b) -> bool:
    """Equality with NaN equal to NaN, in nested lists and dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a) is type(b)


def test_close_writes_a_copy_that_reads_back_as_the_records(tmp_path):
    run_dir = write_records(tmp_path / "run")
    assert columnar_state(run_dir) == "fresh"
    (run_dir / "metrics.jsonl").rename(tmp_path / "kept.jsonl")  # the archived form
    assert columnar_state(run_dir) == "archived"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = read_records(run_dir)
    # Exact where float32 is exact; a value outside float32's range keeps the column float64.
    assert same(records, RECORDS)
    data = load_run(run_dir)
    assert list(data.steps.columns[:4]) == ["step", "loss", "lr", "phase"]
    resid = data.loops[data.loops["stat"] == "resid_norm"]
    assert resid["loop"].tolist() == [1, 2, 3, 1, 2, 3, 4, 1]
    assert data.steps["grad_norm"].tolist()[1] == 1e-45


def test_frames_from_the_copy_match_the_frames_from_the_jsonl(tmp_path):
    from loopdiag.store.reader import metric_frames

    run_dir = write_records(tmp_path / "run")
    steps, loops = metric_frames(RECORDS)
    data = load_run(run_dir)
    assert list(data.steps.columns) == list(steps.columns)
    assert data.steps.drop(columns=["mixed", "note"]).equals(steps.drop(columns=["mixed", "note"]))
    assert data.loops.reset_index(drop=True).equals(loops)


def test_loop_tables_from_the_copy_match_the_long_frame(tmp_path):
    run_dir = write_records(tmp_path / "run")
    data = load_run(run_dir)
    table = data.loop_table("resid_norm")
    assert table.index.tolist() == [1, 2, 4] and list(table.columns) == [1, 2, 3, 4]
    assert table.loc[2].tolist()[1:] == [math.inf, -math.inf, 4.0]
    assert data.loop_table("token_corr").empty  # never logged: empty, not an error
    assert data.loop_table("loss").empty  # a scalar: no per-loop table
    data.read_ahead(["resid_norm", "loss", "token_corr"])  # what it reads, the two readers give
    assert data.loop_table("resid_norm").equals(table) and data.steps_of(["loss"])["loss"].notna().any()
    steps, loops = data.steps_of(["loss", "val_loss"]), data.loops  # a second read is the first
    assert data.steps_of(["val_loss", "loss"])["val_loss"].equals(steps["val_loss"])
    assert len(loops[loops["stat"] == "resid_norm"]) == table.notna().sum().sum()



def test_a_table_read_whole_leaves_the_other_readers_working(tmp_path):
    run_dir = write_records(tmp_path / "run")
    expected = load_run(run_dir).loop_table("resid_norm")
    after_steps = load_run(run_dir)
    assert not after_steps.steps.empty
    assert after_steps.loop_table("resid_norm").equals(expected)
    after_loops = load_run(run_dir)
    assert not after_loops.loops.empty
    assert after_loops.steps_of(["loss"])["loss"].tolist()[::2] == [2.5, 2.0]


NUMERIC_RECORDS = [  # what a recorder writes: numbers, NaN and ±Inf, keys missing or late
    {"step": 1, "loss": 2.5, "lr": 1e-3, "n_loops": 3, "resid_norm": [1.0, 2.0, 3.0],
     "rel_update": [math.nan, 0.25, 0.5], "grad_norm": 1e-45, "flag": True, "count": 3},
    {"step": 2, "loss": math.nan, "lr": 1e-3, "n_loops": 3, "resid_norm": [1.5, math.inf, -math.inf, 4.0],
     "rel_update": [], "grad_cos": -0.5, "count": 4.5, "small": 5e18},
    {"step": 3, "loss": 2.0, "lr": 1e-3, "n_loops": 3, "val_loss": 2.2, "grad_norm": 0.5,
     "resid_norm": [2], "rel_update": [0.1, 0.2], "small": 1e-300},
]


def python_table(run_dir: Path):
    """The copy's table as `json.loads`, line by line, makes it."""
    from loopdiag.store._files import read_rows
    from loopdiag.store.columnar import records_table, source_fingerprint

    records = read_rows(run_dir / "metrics.jsonl")
    return records_table(records, {**source_fingerprint(run_dir / "metrics.jsonl"), "records": len(records)})


def test_arrow_reads_numeric_records_into_the_same_copy(tmp_path):
    from loopdiag.store.columnar import _arrow_table, source_fingerprint

    run_dir = write_records(tmp_path / "run", NUMERIC_RECORDS)
    jsonl = run_dir / "metrics.jsonl"
    fast = _arrow_table(jsonl.read_bytes(), source_fingerprint(jsonl))
    slow = python_table(run_dir)
    assert fast is not None and fast.schema.equals(slow.schema, check_metadata=True)
    for name in slow.column_names:
        assert same(fast.column(name).to_pylist(), slow.column(name).to_pylist()), name
    assert str(fast.schema.field("resid_norm").type) == "list<item: float>"  # narrowed alike
    assert str(fast.schema.field("small").type) == "double"  # 1e-300 is below float32's range


@pytest.mark.parametrize("text", [
    '{"step": 4, "loss": null}',          # null: Arrow cannot tell it from a missing key
    '{"step": 4, "phase": "main"}',       # text
    '{"step": 4, "count": 12345678901234567890}',  # beyond int64
    '{"step": 4, "loss": Inf}',           # Arrow takes it, json does not: the line is skipped
    '{"step": 4, "loss": -NaN}',
    '{"step": 4.0}',                      # not an int step: skipped
    '{"step": 4, "lo',                    # torn
])
def test_lines_arrow_could_read_otherwise_are_read_by_json(tmp_path, text):
    from loopdiag.store.columnar import _arrow_table, source_fingerprint, write_columnar

    run_dir = write_records(tmp_path / "run", NUMERIC_RECORDS)
    jsonl = run_dir / "metrics.jsonl"
    jsonl.write_text(jsonl.read_text() + text + "\n")
    assert _arrow_table(jsonl.read_bytes(), source_fingerprint(jsonl)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunStoreWarning)
        table, slow = write_columnar(run_dir), python_table(run_dir)
    assert table.schema.equals(slow.schema, check_metadata=True)


def test_read_columns_gives_arrays_per_loop_nan_padded(tmp_path):
    run_dir = write_records(tmp_path / "run")
    columns = read_columns(run_dir, ["step", "loss", "resid_norm", "val_loss", "absent"])
    assert set(columns) == {"step", "loss", "resid_norm", "val_loss"}
    assert columns["step"].tolist() == [1, 2, 3, 4] and columns["step"].dtype == np.int64
    assert columns["resid_norm"].shape == (4, 4)
    assert columns["resid_norm"][0].tolist()[:3] == [1.0, 2.0, 3.0]
    assert np.isnan(columns["resid_norm"][0, 3]) and np.isnan(columns["resid_norm"][2]).all()
    assert np.isnan(columns["val_loss"]).tolist() == [True, True, False, True]


def test_a_missing_copy_warns_and_is_rebuilt(tmp_path):
    run_dir = write_records(tmp_path / "run")
    (run_dir / "metrics.parquet").unlink()
    with pytest.warns(RunStoreWarning, match="has no columnar copy; rebuilt"):
        data = load_run(run_dir)
    assert data.steps["step"].tolist() == [1, 2, 3, 4]
    assert columnar_state(run_dir) == "fresh"


@pytest.mark.parametrize("change", ["appended", "fewer"])
def test_a_stale_copy_warns_and_is_rebuilt(tmp_path, change):
    run_dir = write_records(tmp_path / "run")
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    if change == "appended":  # a resumed or live run: the JSONL grew
        path.write_text("".join(lines) + json.dumps({"step": 5, "loss": 1.8}) + "\n")
    else:  # a different record count
        path.write_text("".join(lines[:2]))
    with pytest.warns(RunStoreWarning, match="older than its metrics.jsonl"):
        data = load_run(run_dir)
    assert data.steps["step"].tolist() == ([1, 2, 3, 4, 5] if change == "appended" else [1, 2])


def test_a_corrupt_copy_warns_and_is_rebuilt(tmp_path):
    run_dir = write_records(tmp_path / "run")
    (run_dir / "metrics.parquet").write_bytes(b"PAR1 not really")
    with pytest.warns(RunStoreWarning, match="unreadable columnar copy; rebuilt"):
        data = load_run(run_dir)
    assert data.steps["step"].tolist() == [1, 2, 3, 4] and columnar_state(run_dir) == "fresh"


def test_a_corrupt_copy_without_jsonl_reads_as_no_records(tmp_path):
    run_dir = write_records(tmp_path / "run")
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.parquet").write_bytes(b"garbage")
    with pytest.warns(RunStoreWarning, match="no metrics.jsonl to rebuild it from"):
        assert load_run(run_dir).steps.empty


def test_an_emptied_jsonl_leaves_the_copy_and_its_records(tmp_path):
    run_dir = write_records(tmp_path / "run")
    (run_dir / "metrics.jsonl").write_bytes(b"")
    with pytest.warns(RunStoreWarning, match="metrics.jsonl is empty: the records are read from metrics.parquet"):
        data = load_run(run_dir)
        assert data.steps["step"].tolist() == [1, 2, 3, 4]
    assert same(read_records(run_dir)[0], RECORDS[0])
    assert (run_dir / "metrics.parquet").is_file()


def test_a_torn_jsonl_tail_warns_and_the_copy_holds_the_whole_records(tmp_path):
    run_dir = write_records(tmp_path / "run")
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss": 0.2, "resid_norm": [1.0, 2.')
    with pytest.warns(RunStoreWarning, match="torn"):
        data = load_run(run_dir)
    assert data.steps["step"].tolist() == [1, 2, 3, 4] and columnar_state(run_dir) == "fresh"


def test_a_resumed_run_drops_its_copy_until_close(tmp_path):
    run_dir = write_records(tmp_path / "run", summary={"status": "interrupted"})
    with RunWriter(run_dir, CONFIG, resume=True, resume_step=2) as run:
        assert not (run_dir / "metrics.parquet").exists()
        run.log({"step": 3, "loss": 1.0})
    assert columnar_state(run_dir) == "fresh"
    assert read_columns(run_dir, ["step"])["step"].tolist() == [1, 2, 3]


def test_build_columnar_builds_a_suites_copies_in_parallel(tmp_path):
    for name in ("a", "b", "c"):
        write_records(tmp_path / name)
    (tmp_path / "a" / "metrics.parquet").unlink()
    (tmp_path / "b" / "metrics.parquet").write_bytes(b"bad")
    with pytest.warns(RunStoreWarning, match="unreadable"):
        counts = build_columnar(tmp_path, jobs=2)
    assert counts == {"missing": 1, "corrupt": 1, "fresh": 1}
    assert all(columnar_state(tmp_path / name) == "fresh" for name in ("a", "b", "c"))


def test_a_copy_that_cannot_be_saved_is_not_reported_built(tmp_path):
    """A copy that cannot be written (here its path is a folder; a read-only or full disk
    alike) is counted as unsaved and said once per run; the report reads the JSONL."""
    from typer.testing import CliRunner

    from loopdiag.cli import app

    store = tmp_path / "suite" / "runs"
    for seed, name in enumerate(("a", "b")):
        cell = {"arch": "flt", "n_loops": 3, "seed": seed, "lr": 3e-3}
        write_run(store / name, RECORDS, {**CONFIG, "cell": cell}, summary={"status": "stable"})
    (store / "a" / "metrics.parquet").unlink()
    (store / "a" / "metrics.parquet" / "in-the-way").mkdir(parents=True)
    with pytest.warns(RunStoreWarning, match="a: could not save metrics.parquet"):
        assert build_columnar(store)["unsaved"] == 1
    result = CliRunner().invoke(app, ["report", str(tmp_path / "suite")])
    assert result.exit_code == 0, result.output
    assert "built the columnar copy" not in result.output
    assert result.output.count("could not save metrics.parquet") == 1
    assert "has no columnar copy" not in result.output and "unreadable columnar copy" not in result.output


def test_a_store_of_summaries_only_still_reports(tmp_path):
    """The reference study on a fresh clone before its copies were committed: summaries
    and events, no records. Figures that need records are skipped with a note."""
    suite_dir = tmp_path / "runs"
    shutil.copytree(TASK_RUNS, suite_dir)
    for path in [*suite_dir.glob("*/metrics.jsonl"), *suite_dir.glob("*/metrics.parquet")]:
        path.unlink()
    report = write_report(suite_dir, tmp_path / "report", "loopdiag report")
    text = report.read_text()
    assert "Train loss curves: skipped" in text and "Residual norm per loop: skipped" in text
    assert (tmp_path / "report" / "figures" / "stability_map.png").is_file()


def test_a_committed_study_run_replays_to_its_stored_verdict():
    """The task study's records are committed as columnar copies alone: a fresh clone
    replays every detector on them and gets the verdict stored at the end of training."""
    for run_dir in sorted(p for p in TASK_RUNS.iterdir() if p.is_dir()):
        assert columnar_state(run_dir) in ("archived", "fresh")
        data = load_run(run_dir)
        records = read_records(run_dir)
        overrides = data.config.get("detectors") or {}
        events = replay(records, default_detectors(**overrides))
        judged = verdict(records, events, finished=True)
        assert judged["status"] == data.summary["status"], run_dir.name
        assert judged.get("step") == data.summary.get("step"), run_dir.name
        assert run_verdict(data)["status"] == data.summary["status"]


def test_load_suite_stacks_lazily(tmp_path):
    for name in ("a", "b"):
        write_records(tmp_path / name)
    suite = load_suite(tmp_path)
    assert "steps" not in vars(suite) and "loops" not in vars(suite)
    assert suite.steps["run_id"].tolist() == ["a"] * 4 + ["b"] * 4
    assert set(suite.loops["stat"]) == {"resid_norm", "rel_update"}
