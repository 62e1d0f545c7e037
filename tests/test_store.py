"""Run store: real folders on disk, a real killed subprocess, no mocks."""

from __future__ import annotations

import gc
import json
import math
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import loopdiag.store
from loopdiag.store import (
    RunStoreWarning,
    RunWriter,
    load_run,
    load_suite,
    write_suite_manifest,
)
from run_files import write_run

CONFIG = {"model": {"arch": "flt", "n_loops": 3, "d_model": 16},
          "train": {"steps": 10, "lr": 3e-3, "betas": (0.9, 0.95)},
          "data": {"task": "addition"}, "seed": 0}

pytestmark = pytest.mark.torchless  # also run on Python 3.12 / 3.13 without torch


def record(step: int, n_loops: int = 3) -> dict:
    return {"step": step, "loss": 1.0 / step, "lr": 3e-3,
            "resid_norm": [float(step + loop) for loop in range(n_loops)]}


def write_steps(run_dir: Path, steps: range, summary: dict | None = None, **writer_options) -> None:
    write_run(run_dir, [record(step) for step in steps], CONFIG, summary=summary, **writer_options)


def test_public_api():
    assert set(loopdiag.store.__all__) == {
        "RESUMABLE_KEYS", "RunData", "RunStoreWarning", "RunWriter", "SuiteData", "build_columnar",
        "columnar_state", "event_frame", "is_run_dir", "load_run", "load_suite", "read_columns",
        "read_records", "write_suite_manifest"}


def test_round_trip_with_varying_loops_and_non_finite_values(tmp_path):
    torch = pytest.importorskip("torch")  # a tensor scalar in a record
    run_dir = tmp_path / "run"
    with RunWriter(run_dir, CONFIG) as run:
        run.log({"step": 1, "loss": 2.5, "grad_norm": torch.tensor(0.75), "phase": "warmup",
                 "resid_norm": [1.0, 2.0, 3.0], "act_grad_norm": np.array([0.5, None], dtype=float)})
        run.log({"step": 2, "loss": math.nan, "grad_norm": math.inf,
                 "resid_norm": [1.0, -math.inf, math.nan, None, 5.0]})
        run.log({"step": 5, "loss": 1.5, "val_loss": 1.25, "resid_norm": []})
        run.event({"step": 2, "detector": "non_finite", "severity": "error",
                   "message": "loss is NaN", "evidence": {"loss": math.nan, "loops": [1, 2]}})
        run.close({"status": "diverged", "step": 2, "signal": "loss"})

    # The choice documented in loopdiag.store: Python's json tokens for non-finite numbers.
    raw = (run_dir / "metrics.jsonl").read_text()
    assert "NaN" in raw and "-Infinity" in raw and raw.count("\n") == 3

    data = load_run(run_dir)
    assert data.run_id == "run" and data.run_dir == run_dir
    assert data.config["model"] == CONFIG["model"]
    assert data.config["train"]["betas"] == [0.9, 0.95]
    assert set(data.config["run_info"]["versions"]) == {"python", "torch", "loopdiag", "platform"}
    assert data.config["run_info"]["started_at"]

    steps = data.steps
    assert list(steps.columns) == ["step", "loss", "grad_norm", "phase", "val_loss"]
    assert steps["step"].tolist() == [1, 2, 5]
    assert steps["grad_norm"][0] == 0.75 and steps["grad_norm"][1] == math.inf
    assert math.isnan(steps["loss"][1]) and steps["val_loss"].isna().tolist() == [True, True, False]

    loops = data.loops
    assert list(loops.columns) == ["step", "loop", "stat", "value"]
    resid = loops[loops["stat"] == "resid_norm"]
    assert resid["step"].tolist() == [1, 1, 1, 2, 2, 2, 2, 2]
    assert resid["loop"].tolist() == [1, 2, 3, 1, 2, 3, 4, 5]
    values = resid["value"].tolist()
    assert values[:5] == [1.0, 2.0, 3.0, 1.0, -math.inf]
    assert math.isnan(values[5]) and math.isnan(values[6]) and values[7] == 5.0
    act = loops[loops["stat"] == "act_grad_norm"]
    assert act["loop"].tolist() == [1, 2] and act["value"].iloc[0] == 0.5
    assert math.isnan(act["value"].iloc[1])  # None in a per-loop list reads back as NaN

    (event,) = data.events.to_dict("records")
    assert event["detector"] == "non_finite" and event["step"] == 2
    assert math.isnan(event["evidence"]["loss"]) and event["evidence"]["loops"] == [1, 2]
    assert data.summary == {"status": "diverged", "step": 2, "signal": "loss", "last_step": 5}
    assert data.checkpoint_path is None


def test_config_is_on_disk_before_the_first_step(tmp_path):
    run = RunWriter(tmp_path / "run", CONFIG)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["seed"] == 0 and "run_info" in stored
    data = load_run(tmp_path / "run")  # a run that has logged nothing yet
    assert data.steps.empty and list(data.steps.columns) == ["step"]
    assert data.loops.empty and list(data.loops.columns) == ["step", "loop", "stat", "value"]
    assert data.events.empty
    assert list(data.events.columns) == ["step", "detector", "severity", "message", "evidence"]
    assert data.summary is None
    assert run.checkpoint_path == tmp_path / "run" / "checkpoint.pt"
    run.close()


def test_records_reach_the_file_every_flush_every_records(tmp_path):
    run = RunWriter(tmp_path / "run", CONFIG, flush_every=3, flush_seconds=60)
    run.log(record(1))
    run.log(record(2))
    assert load_run(tmp_path / "run").steps.empty
    run.log(record(3))
    assert load_run(tmp_path / "run").steps["step"].tolist() == [1, 2, 3]
    run.log(record(4))
    run.close()
    assert load_run(tmp_path / "run").steps["step"].tolist() == [1, 2, 3, 4]


def test_records_reach_the_file_within_flush_seconds(tmp_path):
    run = RunWriter(tmp_path / "run", CONFIG, flush_every=1000, flush_seconds=0.05)
    run.log(record(1))
    deadline = time.monotonic() + 5
    while load_run(tmp_path / "run").steps.empty:
        assert time.monotonic() < deadline, "the periodic flush never came"
        time.sleep(0.02)
    run.close()


def test_a_writer_dropped_without_close_still_flushes(tmp_path):
    run = RunWriter(tmp_path / "run", CONFIG, flush_every=1000, flush_seconds=60)
    run.log(record(1))
    del run
    gc.collect()
    assert load_run(tmp_path / "run").steps["step"].tolist() == [1]


def test_events_are_flushed_at_once(tmp_path):
    run = RunWriter(tmp_path / "run", CONFIG, flush_every=1000, flush_seconds=60)
    run.event({"step": 1, "detector": "loss_spike", "severity": "warning", "message": "z=9",
               "evidence": {"z": 9.0}})
    assert load_run(tmp_path / "run").events["detector"].tolist() == ["loss_spike"]
    run.close()


def test_torn_last_line_is_skipped_with_a_warning(tmp_path):
    write_steps(tmp_path / "run", range(1, 4))
    with open(tmp_path / "run" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "loss": 0.2, "resid_norm": [1.0, 2.')
    with pytest.warns(RunStoreWarning, match=r"metrics\.jsonl: skipped line 4 \(the last line, torn"):
        data = load_run(tmp_path / "run")
    assert data.steps["step"].tolist() == [1, 2, 3]


def test_torn_middle_line_is_skipped_with_a_warning(tmp_path):
    write_steps(tmp_path / "run", range(1, 4))
    path = tmp_path / "run" / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:25] + "\n" + lines[2])
    with pytest.warns(RunStoreWarning, match=r"metrics\.jsonl: skipped line 2 \(not a JSON object"):
        data = load_run(tmp_path / "run")
    assert data.steps["step"].tolist() == [1, 3]
    assert sorted(set(data.loops["step"])) == [1, 3]


KILLED_WRITER = textwrap.dedent("""
    import sys
    from loopdiag.store import RunWriter

    run = RunWriter(sys.argv[1], {"model": {"arch": "flt"}, "seed": 0},
                    flush_every=1, flush_seconds=60)
    for step in range(1, 10_000_000):
        run.log({"step": step, "loss": 1.0 / step, "resid_norm": [0.1 * step] * 64,
                 "act_grad_norm": [1e-3 * step] * 64})
        print(step, flush=True)  # after log returned: this record has been flushed
""")


@pytest.mark.processes
def test_sigkill_mid_run_loses_at_most_one_flush_interval(tmp_path):
    run_dir = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(run_dir)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        for line in child.stdout:
            if int(line) >= 300 or time.monotonic() > deadline:
                break
        child.send_signal(signal.SIGKILL)
        # Not communicate(): with a timeout it reads the pipe itself and misses the lines
        # the loop above has already buffered, so the last step would be undercounted.
        rest, stderr = child.stdout.read(), child.stderr.read()
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, stderr
    last_returned = int(([line] + rest.split())[-1])
    assert last_returned >= 300

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunStoreWarning)  # the kill may tear the last line
        data = load_run(run_dir)
    steps = data.steps["step"].tolist()
    # flush_every=1: every record whose log() returned is on disk; at most the one being
    # written when the kill landed is missing or extra.
    assert steps == list(range(1, len(steps) + 1))
    assert last_returned <= len(steps) <= last_returned + 1
    assert data.summary is None
    assert len(data.loops) == 128 * len(steps)


def test_exception_inside_the_block_marks_the_run_interrupted(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with RunWriter(tmp_path / "run", CONFIG, flush_every=100) as run:
            run.log(record(1))
            run.log(record(2))
            raise RuntimeError("boom")
    data = load_run(tmp_path / "run")
    assert data.summary == {"status": "interrupted", "error": "RuntimeError: boom", "last_step": 2}
    assert data.steps["step"].tolist() == [1, 2]  # pending records were flushed on close
    assert run.closed
    with pytest.raises(RuntimeError, match="closed"):
        run.log(record(3))


def test_resume_truncates_to_the_checkpoint_and_continues(tmp_path):
    run_dir = tmp_path / "run"
    with RunWriter(run_dir, CONFIG) as run:
        for step in range(1, 11):
            run.log(record(step))
        run.event({"step": 3, "detector": "a", "severity": "info", "message": "", "evidence": {}})
        run.event({"step": 8, "detector": "b", "severity": "info", "message": "", "evidence": {}})
        run.close({"status": "interrupted"})

    longer = {**CONFIG, "train": {**CONFIG["train"], "steps": 20}}  # a resumable change
    with RunWriter(run_dir, longer, resume=True, resume_step=6) as run:
        assert load_run(run_dir).steps["step"].tolist() == list(range(1, 7))
        assert load_run(run_dir).summary is None  # the old verdict no longer holds
        with pytest.raises(ValueError, match="strictly increase"):
            run.log(record(6))
        for step in range(7, 13):
            run.log(record(step))
        run.close({"status": "stable"})

    data = load_run(run_dir)
    assert data.steps["step"].tolist() == list(range(1, 13))
    assert not data.loops.duplicated(["step", "loop", "stat"]).any()
    assert data.events["detector"].tolist() == ["a"]
    assert data.summary["status"] == "stable"
    assert data.config["train"]["steps"] == 20
    (resume,) = data.config["run_info"]["resumes"]
    assert resume["resume_step"] == 6 and resume["last_logged_step"] == 6


def test_resume_after_a_torn_line_appends_cleanly(tmp_path):
    write_steps(tmp_path / "run", range(1, 4))
    with open(tmp_path / "run" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "lo')
    with pytest.warns(RunStoreWarning, match="torn"):
        run = RunWriter(tmp_path / "run", CONFIG, resume=True)
    run.log(record(4))
    run.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunStoreWarning)
        assert load_run(tmp_path / "run").steps["step"].tolist() == [1, 2, 3, 4]


def test_resume_refuses_a_different_config(tmp_path):
    write_steps(tmp_path / "run", range(1, 3))
    other = {**CONFIG, "model": {**CONFIG["model"], "n_loops": 4}}
    with pytest.raises(ValueError, match=r"model\.n_loops: 3 != 4"):
        RunWriter(tmp_path / "run", other, resume=True, resume_step=2)


def test_bad_records_are_rejected(tmp_path):
    with RunWriter(tmp_path / "run", CONFIG) as run:
        run.log(record(5))
        for step in (5, 4):
            with pytest.raises(ValueError, match=f"step {step} after step 5"):
                run.log(record(step))
        for bad_step in ({"loss": 1.0}, {"step": 6.0}, {"step": True}):
            with pytest.raises(ValueError, match="int 'step'"):
                run.log(bad_step)
        with pytest.raises(TypeError, match="per-loop list"):
            run.log({"step": 6, "resid_norm": [[1.0, 2.0]]})
        with pytest.raises(TypeError, match="scalar or a per-loop list"):
            run.log({"step": 6, "stats": {"a": 1.0}})
        with pytest.raises(ValueError, match="'detector'"):
            run.event({"step": 6, "message": "no detector"})
        run.log(record(6))
    assert load_run(tmp_path / "run").steps["step"].tolist() == [5, 6]


def test_an_existing_run_is_never_overwritten(tmp_path):
    write_steps(tmp_path / "run", range(1, 3))
    with pytest.raises(FileExistsError, match=r"run folder .*run exists and is not empty"):
        RunWriter(tmp_path / "run", CONFIG)
    assert load_run(tmp_path / "run").steps["step"].tolist() == [1, 2]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a run folder"):
        RunWriter(tmp_path / "notes", CONFIG, resume=True)
    RunWriter(tmp_path / "fresh", CONFIG, resume=True).close()  # nothing to resume: starts


def test_not_a_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a run folder: it has no config\.json"):
        load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a run folder: it does not exist"):
        load_run(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not a suite folder"):
        load_suite(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        load_suite(tmp_path / "nowhere")
    run_dir = write_run(tmp_path / "run", [{"step": 1, "loss": 2.0}], {})
    with pytest.raises(FileNotFoundError, match="is a run folder, not a suite folder"):
        load_suite(run_dir)


CELLS = {"flt-k3-s0": {"arch": "flt", "n_loops": 3, "seed": 0, "lr": 3e-3},
         "looped-k3-s1": {"arch": "looped", "n_loops": 3, "seed": 1, "lr": 1e-3}}


def test_suite_stacks_runs_with_their_cell_columns(tmp_path):
    write_suite_manifest(tmp_path, {"name": "ladder", "archs": ["flt", "looped"]},
                         {**CELLS, "flt-k3-s9": {"arch": "flt", "n_loops": 3, "seed": 9}})
    write_steps(tmp_path / "flt-k3-s0", range(1, 4), {"status": "stable"})
    with RunWriter(tmp_path / "looped-k3-s1", CONFIG) as run:
        run.log(record(1, n_loops=2))
        run.event({"step": 1, "detector": "resid", "severity": "warning", "message": "",
                   "evidence": {"growth": 3.0}})
        run.close({"status": "collapsed", "step": 1})

    with pytest.warns(RunStoreWarning, match="lists run 'flt-k3-s9'"):
        suite = load_suite(tmp_path)
    assert suite.name == "ladder" and suite.spec["archs"] == ["flt", "looped"]
    assert list(suite.runs) == ["flt-k3-s0", "looped-k3-s1"]
    # The swept lr clashes with the per-step lr the records log.
    assert suite.cell_columns == ["arch", "n_loops", "seed", "cell_lr"]
    key_columns = ["run_id", "arch", "n_loops", "seed", "cell_lr"]
    assert list(suite.steps.columns[:6]) == [*key_columns, "step"]
    assert suite.steps["run_id"].tolist() == ["flt-k3-s0"] * 3 + ["looped-k3-s1"]
    assert suite.steps["arch"].tolist() == ["flt"] * 3 + ["looped"]
    assert suite.steps["cell_lr"].tolist() == [3e-3] * 3 + [1e-3]
    assert suite.steps["lr"].tolist() == [3e-3] * 4
    assert list(suite.loops.columns) == [*key_columns, "step", "loop", "stat", "value"]
    assert suite.loops.groupby("run_id")["loop"].max().to_dict() == {"flt-k3-s0": 3,
                                                                     "looped-k3-s1": 2}
    assert suite.events[["run_id", "arch", "detector"]].values.tolist() == [
        ["looped-k3-s1", "looped", "resid"]]
    assert suite.run_table.to_dict("records") == [
        {"run_id": "flt-k3-s0", "arch": "flt", "n_loops": 3, "seed": 0, "cell_lr": 3e-3,
         "status": "stable"},
        {"run_id": "looped-k3-s1", "arch": "looped", "n_loops": 3, "seed": 1, "cell_lr": 1e-3,
         "status": "collapsed"}]


def test_suite_without_manifest_scans_run_folders(tmp_path):
    for run_id, cell in CELLS.items():
        with RunWriter(tmp_path / run_id, {**CONFIG, "cell": cell}) as run:
            run.log({"step": 1, "loss": 1.0, "resid_norm": [1.0]})
    (tmp_path / "plots").mkdir()  # not a run: ignored
    suite = load_suite(tmp_path)
    assert suite.manifest is None and suite.spec is None
    assert list(suite.runs) == sorted(CELLS)
    assert suite.cell_columns == ["arch", "n_loops", "seed", "lr"]
    assert suite.steps[["run_id", "lr", "loss"]].values.tolist() == [
        ["flt-k3-s0", 3e-3, 1.0], ["looped-k3-s1", 1e-3, 1.0]]
    assert suite.run_table["status"].isna().all()  # closed without a summary


def test_suite_manifest_rejects_run_ids_that_are_not_folder_names(tmp_path):
    with pytest.raises(ValueError, match="plain folder name"):
        write_suite_manifest(tmp_path, {}, {"../escape": {}})


def test_a_run_with_a_corrupt_config_is_skipped_and_named(tmp_path):
    write_suite_manifest(tmp_path, {"name": "ladder"}, CELLS)
    for run_id in CELLS:
        write_steps(tmp_path / run_id, range(1, 3), {"status": "stable"})
    (tmp_path / "looped-k3-s1" / "config.json").write_text('{"x":')  # a disk's damage, a bad edit
    with pytest.raises(ValueError, match=r"looped-k3-s1/config\.json: not valid JSON \(Expecting value"):
        load_run(tmp_path / "looped-k3-s1")
    with pytest.warns(RunStoreWarning, match=r"config\.json: not valid JSON .*; run 'looped-k3-s1' skipped"):
        suite = load_suite(tmp_path)
    assert list(suite.runs) == ["flt-k3-s0"] and suite.run_table["run_id"].tolist() == ["flt-k3-s0"]
    (tmp_path / "suite.json").unlink()  # found by scanning the folder: skipped alike
    with pytest.warns(RunStoreWarning, match="run 'looped-k3-s1' skipped"):
        assert list(load_suite(tmp_path).runs) == ["flt-k3-s0"]


@pytest.mark.parametrize(("manifest", "message"), [
    ('{"x":', r"suite\.json: not valid JSON \(Expecting value: line 1 column 6"),
    ("[1, 2]", r"suite\.json: not a JSON object"),
    ('{"runs": [{"cell": {}}]}', r"suite\.json: 'runs' is not a list of runs, each with a 'run_id'"),
], ids=["torn", "list", "no-run-ids"])
def test_a_corrupt_suite_manifest_is_named(tmp_path, manifest, message):
    write_steps(tmp_path / "flt-k3-s0", range(1, 3))
    (tmp_path / "suite.json").write_text(manifest)
    with pytest.raises(ValueError, match=message):
        load_suite(tmp_path)
    with pytest.raises(ValueError, match=message):
        loopdiag.store.build_columnar(tmp_path)
