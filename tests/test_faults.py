"""What a long run meets: a W&B server that does not answer, a disk that fills up, kills.
Nothing recorded is lost, nothing waits on the fault, and the command says so in one line."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from loopdiag.store import RunStoreWarning, RunWriter, load_run, read_records

FULL_DISK_LINE = "No space left on device"


def command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loopdiag", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def assert_one_clean_line(output: str, *parts: str) -> None:
    """The fault is named once, in one line holding every part, with no traceback."""
    for noise in ("Traceback", "Logging error", "Exception ignored", "UserWarning"):
        assert noise not in output, output
    lines = [line for line in output.splitlines() if all(part in line for part in parts)]
    assert len(lines) == 1, output


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1.2 MB tmpfs: two tiny runs fit, the third fills it. Mounting needs root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path, leave: int = 0) -> None:
    """Take the disk's free space but `leave` bytes."""
    stats = os.statvfs(disk)
    with (disk / "filler").open("wb", buffering=0) as handle:
        try:
            handle.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave))
        except OSError:  # the last block's worth did not fit: full is what was asked
            pass


def test_writer_on_a_full_disk_keeps_whole_lines_and_refuses_to_skip(small_disk: Path) -> None:
    fill(small_disk, leave=20_000)
    writer = RunWriter(small_disk / "run", {"cell": "c"}, flush_every=1)
    step = 0
    with pytest.raises(OSError, match=FULL_DISK_LINE):
        while True:
            step += 1
            writer.log({"step": step, "loss": 1.0, "resid_norm": [float(step)] * 40})
    assert writer.write_error is not None
    with pytest.raises(OSError, match=FULL_DISK_LINE):  # no later record may leave a gap
        writer.log({"step": step + 1, "loss": 1.0})
    with pytest.raises(OSError, match=FULL_DISK_LINE):
        writer.close({"status": "interrupted"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunStoreWarning)  # no torn line
        records = read_records(small_disk / "run")
    assert [r["step"] for r in records] == list(range(1, step))


def test_run_refuses_an_out_folder_it_cannot_write(small_disk: Path) -> None:
    fill(small_disk)
    result = command("run", "--quick", "--wandb", "off", "--out", str(small_disk / "out"))
    assert result.returncode == 1
    assert_one_clean_line(result.stdout + result.stderr, f"cannot write to {small_disk / 'out' / 'runs'}",
                          FULL_DISK_LINE, "free there")


SMALL_SUITE = ["--quick", "--steps", "6", "--loops", "3", "--arch", "flt", "--arch", "looped", "--jobs", "1",
               "--wandb", "off"]


@pytest.mark.slow
def test_full_disk_stops_the_suite_cleanly_and_resume_finishes_it(small_disk: Path, tmp_path: Path) -> None:
    out = small_disk / "out"
    result = command("run", *SMALL_SUITE, "--out", str(out))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert_one_clean_line(output, "error: cannot write to", str(out / "runs"), "free there", "--resume")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunStoreWarning)  # every record kept is whole
        runs = {run.name: read_records(run) for run in (out / "runs").iterdir() if run.is_dir()}
    statuses = {name: json.loads(summary.read_text())["status"]
                for name in runs if (summary := out / "runs" / name / "summary.json").is_file()}
    assert "interrupted" in statuses.values() or len(statuses) < len(runs), statuses

    fill(small_disk)  # no room for the report, whatever the stopped run left free
    report = command("report", str(out))
    assert report.returncode == 1
    assert_one_clean_line(report.stdout + report.stderr, f"cannot write to {out}", "free there")

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = command("run", *SMALL_SUITE, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    straight = command("run", *SMALL_SUITE, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stdout + straight.stderr
    pd.testing.assert_frame_equal(pd.read_csv(out / "table.csv"), pd.read_csv(tmp_path / "straight" / "table.csv"))


@pytest.mark.slow
def test_unreachable_wandb_costs_one_wait_and_one_line_for_the_suite(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    out = tmp_path / "out"
    env = {"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{port}", "WANDB_INIT_TIMEOUT": "3"}
    result = command("run", "--quick", "--steps", "3", "--loops", "2", "--arch", "flt", "--arch", "looped",
                     "--jobs", "2", "--wandb", "online", "--out", str(out), env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert_one_clean_line(output, "W&B unreachable", "wandb sync")
    assert "failed in" not in output, output
    # every run and the suite's report run kept offline, for `wandb sync`
    assert len(list((out / "runs" / "wandb").glob("offline-run-*/*.wandb"))) == 5, output


SOAK_STEPS = 2000
WINDOWED_KEYS = ("grad_cos", "sign_flip", "gnorm_cv", "gnorm_autocorr")  # need the last steps' gradients
WORKER = """
import sys, torch
from pathlib import Path
from loopdiag.run.runner import run_one
from test_faults import soak_run
torch.set_num_threads(1)
run_one(*soak_run(Path(sys.argv[1])), resume=sys.argv[2] == "resume")
"""


def soak_run(run_dir: Path):
    from loopdiag.data import load_corpus
    from loopdiag.models import preset
    from loopdiag.run.runner import RunSpec
    from loopdiag.train import TrainConfig

    config = TrainConfig(steps=SOAK_STEPS, batch_size=4, eval_every=50, checkpoint_every=25)
    return RunSpec("looped", 2), preset("tiny", seq_len=16), config, load_corpus(), run_dir


def resumes(run_dir: Path) -> int:
    try:
        return len(json.loads((run_dir / "config.json").read_text())["run_info"].get("resumes", []))
    except FileNotFoundError:
        return 0


def last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_bytes().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except ValueError:
            continue
    return 0


@pytest.mark.slow
def test_ten_kills_and_resumes_end_where_an_uninterrupted_run_does(tmp_path: Path) -> None:
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    kill_at = sorted(random.Random(17).sample(range(30, SOAK_STEPS - 30), 10))
    for index, step in enumerate(kill_at):
        worker = subprocess.Popen([sys.executable, "-c", WORKER, str(killed), "resume" if index else "fresh"],
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parent)
        deadline = time.monotonic() + 600
        # the file still holds the steps past the checkpoint until the resumed run reopens it
        while ((resumes(killed) < index or last_step(killed) < step) and worker.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.01)
        assert worker.poll() is None, f"the run ended before step {step}"
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    finisher = subprocess.Popen([sys.executable, "-c", WORKER, str(killed), "resume"],
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parent)
    assert finisher.wait() == 0
    reference = subprocess.Popen([sys.executable, "-c", WORKER, str(straight), "fresh"],
                                 env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parent)
    assert reference.wait() == 0

    resumed, uninterrupted = load_run(killed), load_run(straight)
    assert len(resumed.config["run_info"]["resumes"]) == 10
    ours_records, their_records = read_records(killed), read_records(straight)
    # step for step, every value (as JSON: NaN equals NaN there), the statistics over a
    # window of steps included: the checkpoint carries the recorder's window
    assert json.dumps(ours_records) == json.dumps(their_records)
    assert all(key in ours_records[-1] for key in WINDOWED_KEYS)
    assert resumed.events.equals(uninterrupted.events)
    assert resumed.summary == uninterrupted.summary
    ours = torch.load(killed / "checkpoint.pt", weights_only=True)
    theirs = torch.load(straight / "checkpoint.pt", weights_only=True)
    assert ours["step"] == theirs["step"] == SOAK_STEPS
    for name, tensor in theirs["model"].items():
        assert torch.equal(ours["model"][name], tensor), name
    assert ours["extra"]["history"] == theirs["extra"]["history"]
