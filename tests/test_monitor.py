"""Live alerts in a user's own training loop: the README's recipe, sinks and stopping."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

import loopdiag
from loopdiag.detect import Event, NonFinite


class TiedEncoder(nn.Module):
    """A user's weight-tied model: one block applied `loops` times."""

    def __init__(self, width: int = 16, loops: int = 3):
        super().__init__()
        self.embed = nn.Embedding(32, width)
        self.shared_block = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, 32)
        self.loops = loops

    def forward(self, x):
        h = self.embed(x)
        for _ in range(self.loops):
            h = h + self.shared_block(h)
        return self.head(h)


def test_readme_loop_stops_on_divergence():
    torch.manual_seed(0)
    model = TiedEncoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, 32, (4, 8))
    alerts: list[Event] = []
    rec = loopdiag.attach(model, loop_module="shared_block")
    monitor = loopdiag.Monitor(sinks=[loopdiag.CallbackSink(alerts.append)], stop_on="critical")
    stopped_at = None
    for step in range(1, 31):
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        if step == 12:
            loss = loss * math.nan  # a broken step, as a bad batch or overflow would give
        loss.backward()
        rec.after_backward()
        optimizer.step()
        optimizer.zero_grad()
        record = rec.end_step(step, loss=loss, lr=0.1)
        if record is not None:
            monitor.update(record)
            if monitor.should_stop:
                stopped_at = step
                break
    rec.detach()
    assert stopped_at == 12
    assert monitor.stop_event.detector == "non_finite" and alerts[-1] is monitor.stop_event
    assert len(rec.loop_frame().query("stat == 'resid_norm' and step == 1")) == 3


def test_readme_session_stops_on_divergence_and_writes_the_verdict(tmp_path):
    torch.manual_seed(0)
    model = TiedEncoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, 32, (4, 8))
    alerts: list[Event] = []
    monitor = loopdiag.Monitor(sinks=[loopdiag.CallbackSink(alerts.append)], stop_on="critical")
    with loopdiag.RunSession(model, loop_module="shared_block", monitor=monitor, run_dir=tmp_path / "run",
                             config={"model": "tied"}) as run:
        for step in range(1, 31):
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
            if step == 12:
                loss = loss * math.nan
            loss.backward()
            run.after_backward()
            optimizer.step()
            optimizer.zero_grad()
            run.step(step, loss=loss, lr=0.1)
            if run.should_stop:
                break
    assert step == 12 and not run.recorder.attached and len(monitor.sinks) == 1  # its own sinks again
    stored = loopdiag.load_run(tmp_path / "run")
    assert stored.summary["status"] == "diverged" and stored.summary["stopped_by"].startswith("non_finite")
    assert list(stored.steps["step"]) == list(range(1, 13)) and stored.config["model"] == "tied"
    assert list(stored.events["detector"]) == [e.detector for e in alerts]


def test_a_session_stopped_at_a_warning_is_interrupted_not_stable(tmp_path):
    model = TiedEncoder()
    x = torch.randint(0, 32, (4, 8))
    monitor = loopdiag.Monitor(sinks=[], stop_on="warn")
    with loopdiag.RunSession(model, loop_module="shared_block", monitor=monitor, run_dir=tmp_path / "run") as run:
        for step in range(1, 41):
            model(x).sum().backward()
            run.after_backward()
            run.step(step, loss=30.0 if step == 25 else 3.0)  # one loss 10x the others: a spike
            if run.should_stop:
                break
    assert step == 25 and monitor.stop_event.severity == "warn"
    summary = loopdiag.load_run(tmp_path / "run").summary
    assert summary["status"] == "interrupted" and summary["stopped_by"].startswith("loss_spike (warn) at step 25")


def test_a_session_left_by_an_exception_is_interrupted(tmp_path):
    model = TiedEncoder()
    x = torch.randint(0, 32, (4, 8))
    with pytest.raises(KeyboardInterrupt), loopdiag.RunSession(
            model, loop_module="shared_block", monitor=loopdiag.Monitor(), run_dir=tmp_path / "run") as run:
        for step in range(1, 4):
            model(x).sum().backward()
            run.after_backward()
            run.step(step, loss=1.0, lr=0.1)
        raise KeyboardInterrupt
    assert run.summary["status"] == "interrupted"
    assert loopdiag.load_run(tmp_path / "run").summary["status"] == "interrupted"


SESSION_LEFT_OPEN = """
import sys, torch
import loopdiag
from test_monitor import TiedEncoder
model, x = TiedEncoder(), torch.randint(0, 32, (4, 8))
run = loopdiag.RunSession(model, loop_module="shared_block", monitor=loopdiag.Monitor(), run_dir=sys.argv[1])
run.start()  # as a trainer callback does, with no hook to close it when training raises
for step in range(1, 4):
    model(x).sum().backward()
    run.after_backward()
    run.step(step, loss=1.0)
raise KeyboardInterrupt
"""


def test_a_session_a_crash_leaves_open_is_closed_as_interrupted_when_the_process_exits(tmp_path):
    ended = subprocess.run([sys.executable, "-c", SESSION_LEFT_OPEN, str(tmp_path / "run")], capture_output=True,
                           text=True, cwd=Path(__file__).parent)
    assert "KeyboardInterrupt" in ended.stderr
    summary = loopdiag.load_run(tmp_path / "run").summary
    assert summary["status"] == "interrupted" and len(loopdiag.load_run(tmp_path / "run").steps) == 3


def test_the_readmes_example_of_probing_your_own_model_runs_as_written(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Probing your own looped model"):]
    code = section[section.index("```python\n") + 10:section.index("```\n", section.index("```python\n") + 10)]
    assert "model, steps = LoopedEncoder(), 100" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*loop_module")  # its loops= holds
        exec(code.replace("model, steps = LoopedEncoder(), 100", "model, steps = LoopedEncoder(), 3"), namespace)
    assert namespace["run"].summary["status"] == "stable"
    assert loopdiag.load_run(tmp_path / "runs" / "mine").steps["step"].tolist() == [1, 2, 3]


def test_a_session_summary_names_the_reference_it_was_judged_against(tmp_path):
    model = TiedEncoder()
    x = torch.randint(0, 32, (4, 8))

    def summary(monitor, config=None):
        with loopdiag.RunSession(model, loop_module="shared_block", monitor=monitor,
                                 config=config) as run:
            for step in range(1, 4):
                model(x).sum().backward()
                run.after_backward()
                run.step(step, loss=1.0, lr=0.1)
        return run.summary

    assert summary(loopdiag.Monitor())["reference"] is None
    assert summary(loopdiag.Monitor(expected_loss=2.5))["reference"] == {"expected_loss": 2.5}
    suite_reference = {"run": "flt-k01-s0", "expected_loss": 2.5}
    assert summary(loopdiag.Monitor(expected_loss=2.5),
                   {"reference": suite_reference})["reference"] == suite_reference


LOSS_DETECTORS = ["behind_reference", "collapse_plateau", "failed_to_train", "loss_rise", "loss_spike",
                  "slow_divergence"]


def readme_session(*, loss: bool = True, after_backward: bool = True, lr: bool = True):
    """The README's session loop for 30 steps, less what a new user may leave out: (the
    session, the monitor's own lines)."""
    torch.manual_seed(0)
    model = TiedEncoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, 32, (4, 8))
    lines: list[Event] = []
    monitor = loopdiag.Monitor(sinks=[loopdiag.CallbackSink(lines.append)])
    with loopdiag.RunSession(model, loop_module="shared_block", monitor=monitor) as run:
        for step in range(1, 31):
            value = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
            value.backward()
            if after_backward:
                run.after_backward()
            optimizer.step()
            optimizer.zero_grad()
            run.step(step, loss=value if loss else None, **({"lr": 0.1} if lr else {}))
    return run, [line for line in lines if line.detector == "monitor"]


def test_a_session_with_every_statistic_has_nothing_not_judged():
    run, notes = readme_session()
    assert notes == [] and run.summary["not_judged"] == []


def test_a_session_that_records_no_loss_names_every_detector_that_reads_it():
    run, (note,) = readme_session(loss=False)
    assert note.message.startswith("Not judged on this run, its records carrying no loss: ")
    assert all(name in note.message for name in LOSS_DETECTORS)
    # the loop statistics still judge it, and its stable verdict names what they could not
    assert run.summary["status"] == "stable" and run.summary["not_judged"] == LOSS_DETECTORS


def test_a_session_without_gradient_statistics_names_the_detectors_that_read_them():
    run, (note,) = readme_session(after_backward=False)
    assert "no grad_cos or gnorm_autocorr: gradient_oscillation" in note.message
    assert "no update_ratio: update_size" in note.message
    assert run.summary["not_judged"] == ["gradient_oscillation", "update_size"]  # the loss serves non_finite


def test_records_with_nothing_any_detector_reads_say_that_nothing_is_judged():
    lines = []
    monitor = loopdiag.Monitor(sinks=[loopdiag.CallbackSink(lines.append)])
    for step in range(1, 20):
        monitor.update({"step": step, "lr": 0.1})
    (note,) = lines
    assert note.message.startswith("Nothing on this run is judged")
    assert set(monitor.not_judged()) == {detector.name for detector in monitor.detectors}


def judged_losses(losses, **monitor_options) -> tuple[loopdiag.Monitor, list[Event]]:
    lines = []
    monitor = loopdiag.Monitor(sinks=[loopdiag.CallbackSink(lines.append)], **monitor_options)
    for step, loss in enumerate(losses, start=1):
        monitor.update({"step": 10 * step, "loss": loss})
    monitor.finish()
    return monitor, [line for line in lines if line.detector == "monitor" and "records" in line.evidence]


def test_a_run_of_fewer_losses_than_the_smoothing_span_is_told_its_stable_verdict_is_weak():
    _, (note,) = judged_losses([5.5, 4.0, 3.2, 3.0])
    assert note.severity == "info" and note.step == 40 and note.evidence == {"records": 4}
    # the first loss's weight in the EMA of span 20 after 4 losses: (19/21)**3
    assert note.message.startswith("Judged from only 4 records, fewer than the 20") and "74%" in note.message


def test_a_run_of_as_many_losses_as_the_smoothing_span_is_not_told_so():
    _, notes = judged_losses([5.5 - 0.1 * step for step in range(20)])
    assert notes == []


def test_a_short_run_that_failed_or_is_judged_by_the_users_detectors_is_not_told_so():
    monitor, notes = judged_losses([5.5, 4.0, math.nan])
    assert notes == [] and any(event.severity == "critical" for event in monitor.events)
    _, notes = judged_losses([5.5, 4.0, 3.2], detectors=[NonFinite()])
    assert notes == []


def test_a_session_step_may_leave_out_the_learning_rate():
    run, notes = readme_session(lr=False)
    assert run.records and not any("lr" in record for record in run.records)
    assert notes == [] and run.summary["not_judged"] == []  # no detector reads it


def test_an_unknown_attach_option_is_refused_before_training():
    with pytest.raises(TypeError, match="unknown option.*log_evry"):
        loopdiag.RunSession(TiedEncoder(), log_evry=2)


def test_a_failing_sink_is_disabled_and_the_others_still_get_events():
    class Broken:
        def emit(self, event):
            raise ConnectionError("alert service unreachable")

    received = []
    monitor = loopdiag.Monitor(sinks=[Broken(), loopdiag.CallbackSink(received.append)])
    with pytest.warns(UserWarning, match="Broken failed and is disabled"):
        monitor.update({"step": 1, "loss": math.inf})
    for step in range(2, 20):  # finite records clear the latch (the detector's cooldown)
        monitor.update({"step": step, "loss": 2.0})
    monitor.update({"step": 20, "loss": math.nan})
    assert [event.step for event in received if event.detector != "monitor"] == [1, 20]


def test_console_sink_writes_one_line_per_event():
    buffer = io.StringIO()
    monitor = loopdiag.Monitor(sinks=[loopdiag.ConsoleSink(Console(file=buffer, width=200))])
    monitor.update({"step": 7, "loss": math.nan})
    assert "CRITICAL step 7 non_finite" in buffer.getvalue()


def test_without_stop_on_nothing_stops():
    monitor = loopdiag.Monitor()
    monitor.update({"step": 1, "loss": math.nan})
    assert monitor.events and not monitor.should_stop


@pytest.mark.parametrize("kwargs,message", [
    ({"stop_on": "fatal"}, "stop_on"),
    ({"thresholds": {"loss_spike": {"z": -1}}}, "loss_spike"),
    ({"thresholds": {"no_such_detector": {}}}, "unknown detector"),
])
def test_bad_monitor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        loopdiag.Monitor(**kwargs)


def test_the_monitor_names_the_loss_it_judges_against():
    from loopdiag.detect import FailedToTrain, FailedToTrainConfig, LossSpike

    assert loopdiag.Monitor().expected_loss is None
    assert loopdiag.Monitor(expected_loss=2.5).expected_loss == 2.5
    assert loopdiag.Monitor([FailedToTrain(FailedToTrainConfig(expected_loss=1.5))]).expected_loss == 1.5
    assert loopdiag.Monitor([LossSpike()]).expected_loss is None  # no detector judges it


def train_steps(run, model, steps) -> None:
    x = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(0))
    for step in steps:
        model(x).sum().backward()
        run.after_backward()
        model.zero_grad()
        run.step(step, loss=1.0)


def test_a_session_used_before_it_starts_or_after_it_closes_says_so():
    model = TiedEncoder()
    run = loopdiag.RunSession(model, loop_module="shared_block", monitor=loopdiag.Monitor())
    with pytest.raises(RuntimeError, match=r"RunSession.after_backward\(\) before the session started"):
        train_steps(run, model, [1])
    with run:
        train_steps(run, model, [1])
    with pytest.raises(RuntimeError, match=r"RunSession.step\(\) after the session closed"):
        run.step(2, loss=1.0)


@pytest.mark.parametrize("stored", [False, True], ids=["no-run-dir", "run-dir"])
def test_a_session_refuses_a_step_that_does_not_increase_before_judging_it(tmp_path, stored):
    model = TiedEncoder()
    monitor = loopdiag.Monitor()
    with loopdiag.RunSession(model, loop_module="shared_block", monitor=monitor,
                             run_dir=tmp_path / "run" if stored else None) as run:
        train_steps(run, model, [0, 1])  # a batch index per epoch: 0, 1, then 0 again
        with pytest.raises(ValueError, match="step must increase from call to call: got step 0 after step 1"):
            run.step(0, loss=1.0)
        with pytest.raises(TypeError, match="step must be an integer, got float 2.0"):
            run.step(2.0, loss=1.0)
        train_steps(run, model, [2])
    assert [record["step"] for record in run.records] == [0, 1, 2]  # judged once each
    if stored:
        assert list(loopdiag.load_run(tmp_path / "run").steps["step"]) == [0, 1, 2]


def test_a_session_that_cannot_open_its_run_store_leaves_no_hooks_on_the_model(tmp_path):
    model = TiedEncoder()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="resume=True"):
        with loopdiag.RunSession(model, loop_module="shared_block", run_dir=tmp_path / "run"):
            pass
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def test_a_session_warning_points_at_the_callers_line():
    model = TiedEncoder()
    x = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(0))
    with loopdiag.RunSession(model, loop_module="shared_block", monitor=loopdiag.Monitor()) as run:
        model.shared_block(model.embed(x)).sum().backward()  # the block alone: no forward of the model
        run.after_backward()
        with pytest.warns(UserWarning, match="ran no loop") as caught:
            run.step(1, loss=1.0)
    assert caught[0].filename == __file__


@pytest.mark.parametrize("sinks,message", [
    (loopdiag.ConsoleSink(), "sinks must be a list of sinks, got one ConsoleSink"),
    ([print], r"each sink needs an emit\(event\) method.*CallbackSink\(print\)"),
    (3, "sinks must be a list of sinks, got int"),
])
def test_bad_sinks_are_refused_before_the_first_alert(sinks, message):
    with pytest.raises(TypeError, match=message):
        loopdiag.Monitor(sinks=sinks)


def test_losses_given_as_numpy_scalars_or_tensors_judge_as_floats():
    import numpy as np

    curve = [(step, 4.0 - step / 100) for step in range(1, 200)]
    given = loopdiag.Monitor(expected_loss=np.float32(2.5), context_free_loss=torch.tensor(3.5),
                             best_known_loss=np.float32(2.0),
                             reference_losses=[(step, torch.tensor(loss, dtype=torch.float64))
                                               for step, loss in curve])
    floats = loopdiag.Monitor(expected_loss=float(np.float32(2.5)), context_free_loss=3.5,
                              best_known_loss=float(np.float32(2.0)), reference_losses=curve)
    assert given.expected_loss == floats.expected_loss and isinstance(given.context_free_loss, float)
    for step in range(1, 200):
        record = {"step": step, "loss": 3.6 + 0.1 * math.sin(step)}
        assert [e.to_dict() for e in given.update(record)] == [e.to_dict() for e in floats.update(record)]
    assert [e.to_dict() for e in given.finish()] == [e.to_dict() for e in floats.finish()]
    assert given.events  # judged, not silently ignored


def test_a_reference_curve_with_a_negative_loss_is_refused():
    with pytest.raises(ValueError, match=r"reference_losses .* losses >= 0, got \(2, -1.0\)"):
        loopdiag.Monitor(reference_losses=[(1, 3.0), (2, -1.0)])
