"""One run end to end: recorder, run store, live detectors and alerts, crash and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loopdiag.data import load_corpus
from loopdiag.detect.monitor import CallbackSink, Monitor
from loopdiag.models import build_model, preset
from loopdiag.run.runner import RunSpec, SessionCallback, run_one
from loopdiag.run.session import RunSession
from loopdiag.store import load_run, read_records
from loopdiag.train import TrainCallback, TrainConfig, corpus_batches, train
from run_files import tiny_model_config
from wandb_files import read_run

TINY = tiny_model_config()


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_run_folder_holds_every_logged_step(tmp_path, corpus):
    config = TrainConfig(steps=12, batch_size=4, eval_every=5)
    outcome = run_one(RunSpec("flt", 3), TINY, config, corpus, tmp_path / "run", log_every=2)
    run = load_run(tmp_path / "run")
    assert run.config["cell"] == {"arch": "flt", "n_loops": 3, "seed": 0, "lr": config.lr}
    assert run.config["data"]["sha256"] == corpus.sha256
    assert run.config["data"]["context_free_loss"] == corpus.context_free_loss
    # logged at the first step and every 2nd, plus the evaluated steps 5 (val loss only), 10, 12
    assert run.steps["step"].tolist() == [1, 2, 4, 5, 6, 8, 10, 12]
    assert run.steps["val_loss"].notna().tolist() == [False, False, False, True, False, False, True, True]
    resid = run.loops[run.loops["stat"] == "resid_norm"]
    assert resid.groupby("step")["loop"].max().eq(3).all()
    assert run.summary["status"] == outcome.status == "stable"
    assert run.checkpoint_path is not None


def test_a_model_that_cannot_learn_is_judged_failed_to_train_without_a_reference(tmp_path, corpus):
    """A learning rate too small to move the weights: the loss stays where it started, above
    what the text's byte frequencies alone give, and the run, with no reference to compare
    it with, ends failed to train."""
    config = TrainConfig(steps=30, batch_size=4, lr=1e-9, eval_every=0)
    outcome = run_one(RunSpec("looped", 2), TINY, config, corpus, tmp_path / "run", log_every=1)
    run = load_run(tmp_path / "run")
    assert outcome.status == run.summary["status"] == "failed_to_train"
    assert "token frequencies alone" in run.summary["message"]
    assert run.summary["final_smoothed_loss"] > corpus.context_free_loss


def test_run_made_to_collapse_raises_an_alert_and_stops(tmp_path, corpus):
    """A looped model at a learning rate it cannot take (no clipping) stalls on a plateau
    while its residual norm explodes; the live detectors must say so and stop it."""
    alerts = []
    config = TrainConfig(steps=400, lr=0.05, grad_clip=None, eval_every=100)
    outcome = run_one(
        RunSpec("looped", 4), preset("tiny"), config, corpus, tmp_path / "run",
        sinks=[CallbackSink(alerts.append)], stop_on="critical",
    )
    run = load_run(tmp_path / "run")
    assert outcome.status == run.summary["status"] == "collapsed"
    assert alerts and alerts[-1].severity == "critical"
    assert run.summary["stopped_by"] and outcome.steps_done < 400
    assert run.steps["step"].iloc[-1] == outcome.steps_done
    assert list(run.events["detector"]) == [alert.detector for alert in alerts]


@pytest.mark.slow
def test_flt_takes_the_learning_rate_that_collapses_looped(tmp_path, corpus):
    """The control for the test above: same setting, FLT trains and no alert fires."""
    alerts = []
    config = TrainConfig(steps=400, lr=0.05, grad_clip=None, eval_every=100)
    outcome = run_one(RunSpec("flt", 4), preset("tiny"), config, corpus, tmp_path / "run",
                      sinks=[CallbackSink(alerts.append)], stop_on="critical")
    assert outcome.status == "stable" and outcome.steps_done == 400
    assert [a for a in alerts if a.severity == "critical"] == []


WORKER = textwrap.dedent(
    """
    import sys
    import torch
    from pathlib import Path
    from loopdiag.run.runner import run_one
    from test_runner import resumable_run
    torch.set_num_threads(1)
    run_one(*resumable_run(Path(sys.argv[1]), int(sys.argv[2])), resume=sys.argv[3] == "resume")
    """
)


def resumable_run(run_dir: Path, steps: int):
    # A constant learning rate: the killed run's schedule must not depend on its length.
    config = TrainConfig(steps=steps, batch_size=4, eval_every=7, checkpoint_every=5, decay_fraction=0.0)
    return RunSpec("looped", 2), TINY, config, load_corpus(), run_dir


def run_worker(run_dir: Path, steps: int, resume: bool = False) -> subprocess.Popen:
    args = [sys.executable, "-c", WORKER, str(run_dir), str(steps), "resume" if resume else "fresh"]
    return subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parent)


@pytest.mark.processes
def test_killed_run_loads_and_resumes_without_duplicate_steps(tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    worker = run_worker(killed, 10_000)
    deadline = time.monotonic() + 240  # generous: a loaded machine starts torch slowly
    while time.monotonic() < deadline and not (killed / "checkpoint.pt").exists():
        time.sleep(0.05)
    time.sleep(0.5)  # let it run past the checkpoint
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    crashed = load_run(killed)
    assert crashed.summary is None and len(crashed.steps) >= 5

    total = int(crashed.steps["step"].max()) + 10  # however far the killed run got
    assert run_worker(killed, total, resume=True).wait() == 0
    run_one(*resumable_run(straight, total))
    resumed, reference = load_run(killed), load_run(straight)
    assert resumed.steps["step"].tolist() == list(range(1, total + 1))
    assert resumed.steps["loss"].tolist() == reference.steps["loss"].tolist()
    # Judged as the same run trained without a break. Which verdict depends on how far the
    # killed run got: at 60 or 90 steps this tiny model ends stalled at the token-frequency
    # loss (failed to train); at 40 or fewer it is too short to be judged stalled (stable).
    assert resumed.summary["status"] == reference.summary["status"] != "interrupted"
    assert resumed.summary["final_smoothed_loss"] == reference.summary["final_smoothed_loss"]
    assert len(resumed.config["run_info"]["resumes"]) == 1


def test_a_resumed_run_records_what_an_uninterrupted_one_records(tmp_path):
    """Stopped at its checkpoint and resumed: every statistic of every step, also those over
    a window of steps (gradient cosine and sign flips need the step before, the gradient
    norm's spread the last 32), because the checkpoint carries the recorder's window."""
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    run_one(*resumable_run(stopped, 28))  # a multiple of eval_every: its final evaluation is due anyway
    run_one(*resumable_run(stopped, 40), resume=True)
    run_one(*resumable_run(straight, 40))
    ours, theirs = read_records(stopped), read_records(straight)
    assert [record["step"] for record in ours] == list(range(1, 41))
    assert json.dumps(ours) == json.dumps(theirs)  # NaN equals NaN as JSON
    assert {"grad_cos", "sign_flip", "gnorm_cv", "gnorm_autocorr"} <= ours[-1].keys()


def test_a_resumed_run_goes_on_in_the_same_wandb_run(tmp_path):
    run_dir = tmp_path / "runs" / "looped-k02-s0"
    run_one(*resumable_run(run_dir, 10), wandb_mode="offline")
    run_one(*resumable_run(run_dir, 15), resume=True, wandb_mode="offline")
    wandb_id = load_run(run_dir).config["wandb"]["id"]
    runs = [read_run(folder) for folder in sorted((tmp_path / "runs" / "wandb").glob("offline-run-*"))]
    assert [run["run"].run_id for run in runs] == [wandb_id, wandb_id]
    logged = [sorted({row["step"] for row in run["history"]}) for run in runs]
    assert logged == [list(range(1, 11)), list(range(11, 16))]
    # resumed with W&B off, the id is kept for a later resume with it on
    run_one(*resumable_run(run_dir, 20), resume=True)
    assert load_run(run_dir).config["wandb"]["id"] == wandb_id


def test_a_run_interrupted_while_it_starts_is_closed_as_interrupted(tmp_path, corpus):
    """A killed `loopdiag run` interrupts its workers whenever the signal lands, also just
    after a run opened its store and before its first step."""
    class InterruptedAtStart(TrainCallback):
        def on_train_start(self, state):
            raise KeyboardInterrupt

    model = build_model("looped", TINY.with_(n_loops=2))
    session = RunSession(model, monitor=Monitor(), run_dir=tmp_path / "run", config={})
    source, val = corpus_batches(corpus, TrainConfig(steps=3, batch_size=4), TINY.seq_len)
    with pytest.raises(KeyboardInterrupt):
        train(model, source, val, TrainConfig(steps=3, batch_size=4),
              callbacks=[SessionCallback(session), InterruptedAtStart()])
    assert load_run(tmp_path / "run").summary["status"] == "interrupted"
    assert not session.recorder.attached
