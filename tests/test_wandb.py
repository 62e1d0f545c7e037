"""W&B logging against real `wandb` in offline mode, checked by reading back the run file
(`wandb_files.py` parses it)."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from wandb_files import read_run, read_table

from loopdiag.detect import Event
from loopdiag.run.wandb_logging import WandbRun, forget_outage, log_suite, note_outage, outage


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "config"),
                        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                        "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(name, value)


def record(step: int, n_loops: int = 3) -> dict[str, Any]:
    return {"step": step, "n_loops": n_loops, "loss": 4.0 - step / 10,
            "resid_norm": [10.0 * step + k for k in range(1, n_loops + 1)],
            "act_grad_norm": [math.nan] + [0.5 * k for k in range(2, n_loops + 1)]}


def cell_config(arch: str = "looped", n_loops: int = 3) -> dict[str, Any]:
    return {"cell": {"arch": arch, "n_loops": n_loops, "seed": 0, "lr": 1e-3},
            "model": {"d_model": 32, "n_loops": n_loops}}


def event(step: int, detector: str, severity: str) -> Event:
    return Event(step=step, detector=detector, severity=severity, message=f"{detector} at {step}",
                 evidence={"value": 1.5})


def test_records_config_tags_and_verdict(tmp_path: Path) -> None:
    wandb_run = WandbRun("looped-k03-s0", cell_config(), group="tiny-suite", tags=("smoke",),
                         dir=tmp_path)
    for step in (0, 5, 10):
        wandb_run.log_record(record(step))
    verdict = {"status": "collapsed", "step": 10, "signal": "resid_explosion", "last_loss": 3.0,
               "evidence": {"ratio": 12.5}, "first_warning_step": 5, "stopped_by": None}
    wandb_run.finish(verdict)
    assert not wandb_run.active

    run = read_run(wandb_run.run_dir)
    assert wandb_run.run_dir.parent == tmp_path / "wandb"
    assert wandb_run.run_dir.name.startswith("offline-run-")
    assert run["run"].display_name == "looped-k03-s0"
    assert run["run"].run_group == "tiny-suite" and run["run"].job_type == "train"
    assert list(run["run"].tags) == ["smoke", "looped", "K=3"]
    assert run["config"]["cell"] == {"arch": "looped", "n_loops": 3, "seed": 0, "lr": 1e-3}
    assert run["config"]["model"] == {"d_model": 32, "n_loops": 3}

    rows = run["history"]
    assert [row["_step"] for row in rows] == [0, 5, 10]
    for row in rows:
        expected = record(row["_step"])
        assert row["step"] == row["_step"]
        assert {k for k in row if k.startswith("resid_norm/")} == {"resid_norm/loop_01", "resid_norm/loop_02",
                                                                    "resid_norm/loop_03"}
        assert [row[f"resid_norm/loop_{k:02d}"] for k in (1, 2, 3)] == expected["resid_norm"]
        assert math.isnan(row["act_grad_norm/loop_01"]) and row["act_grad_norm/loop_03"] == 1.5
        assert row["loss"] == pytest.approx(expected["loss"]) and row["n_loops"] == 3

    summary = run["summary"]
    assert {key: summary[f"verdict/{key}"] for key in verdict} == verdict
    assert summary["step"] == 10 and summary["resid_norm/loop_03"] == 103.0  # last values, untouched


def test_loop_keys_zero_padded_past_nine(tmp_path: Path) -> None:
    wandb_run = WandbRun("flt-k12-s0", cell_config("flt", 12), dir=tmp_path)
    wandb_run.log_record(record(1, n_loops=12))
    wandb_run.finish()
    (row,) = read_run(wandb_run.run_dir)["history"]
    loop_keys = sorted(k for k in row if k.startswith("resid_norm/"))
    assert loop_keys == [f"resid_norm/loop_{k:02d}" for k in range(1, 13)]
    assert row["resid_norm/loop_12"] == 22.0


def test_events_chart_table_and_rate_limited_alerts(tmp_path: Path) -> None:
    wandb_run = WandbRun("looped-k06-s1", cell_config(n_loops=6), dir=tmp_path)
    wandb_run.log_record(record(1))
    wandb_run.emit(event(1, "resid_explosion", "warn"))  # alerted
    wandb_run.log_record(record(2))
    wandb_run.emit(event(2, "resid_explosion", "warn"))  # same detector within 300 s: chart only
    wandb_run.emit(event(2, "grad_spike", "info"))  # below alert_on: chart only
    wandb_run.emit(event(3, "resid_explosion", "critical"))  # escalation: alerted
    wandb_run.emit(event(3, "loss_plateau", "warn"))  # another detector: alerted
    wandb_run.log_record(record(3))
    wandb_run.finish({"status": "collapsed"})

    run = read_run(wandb_run.run_dir)
    alerts = [(a.title, a.level, a.wait_duration) for a in run["alerts"]]
    assert alerts == [("WARN resid_explosion in looped-k06-s1", "WARN", 300_000),
                      ("CRITICAL resid_explosion in looped-k06-s1", "ERROR", 300_000),
                      ("WARN loss_plateau in looped-k06-s1", "WARN", 300_000)]
    assert run["alerts"][0].text == "looped-k06-s1, step 1: resid_explosion at 1"

    by_step = {row["_step"]: row for row in run["history"]}
    assert [by_step[s]["events/resid_explosion"] for s in (1, 2, 3)] == [2, 2, 3]
    assert by_step[2]["events/grad_spike"] == 1
    # an event and the record of its step share one row
    assert by_step[3]["events/loss_plateau"] == 2 and by_step[3]["resid_norm/loop_01"] == 31.0

    table = read_table(wandb_run.run_dir, by_step[3]["events"])
    assert table["columns"] == ["step", "detector", "severity", "message"]
    assert [row[:3] for row in table["data"]] == [
        [1, "resid_explosion", "warn"], [2, "resid_explosion", "warn"], [2, "grad_spike", "info"],
        [3, "resid_explosion", "critical"], [3, "loss_plateau", "warn"]]


def test_alert_sent_again_after_the_interval(tmp_path: Path) -> None:
    wandb_run = WandbRun("looped-k02-s0", cell_config(n_loops=2), dir=tmp_path, alert_interval_s=0.5,
                         alert_on="info")
    wandb_run.emit(event(1, "grad_spike", "info"))
    wandb_run.emit(event(2, "grad_spike", "info"))
    time.sleep(0.6)
    wandb_run.emit(event(3, "grad_spike", "info"))
    wandb_run.finish()
    alerts = read_run(wandb_run.run_dir)["alerts"]
    assert [(a.text, a.level) for a in alerts] == [("looped-k02-s0, step 1: grad_spike at 1", "INFO"),
                                                   ("looped-k02-s0, step 3: grad_spike at 3", "INFO")]


def test_event_before_a_later_record_is_not_dropped(tmp_path: Path) -> None:
    wandb_run = WandbRun("standard-k01-s0", {}, dir=tmp_path)
    wandb_run.log_record(record(5, n_loops=1))
    wandb_run.emit(event(4, "grad_spike", "warn"))  # W&B would drop step 4 after step 5
    wandb_run.finish()
    run = read_run(wandb_run.run_dir)
    assert list(run["run"].tags) == []
    (row,) = run["history"]
    assert row["_step"] == 5 and row["events/grad_spike"] == 2


def test_suite_report_run(tmp_path: Path) -> None:
    from PIL import Image

    figure = tmp_path / "loss.png"
    Image.new("RGB", (16, 12), "white").save(figure)
    table = pd.DataFrame({"run_id": ["looped-k03-s0", "flt-k03-s0"], "arch": ["looped", "flt"],
                          "n_loops": [3, 3], "status": ["collapsed", "stable"],
                          "failure_step": [40.0, math.nan], "signal": ["resid_explosion", None]})
    run_dir = log_suite("tiny-suite", table, {"loss": figure}, dir=tmp_path / "report")

    run = read_run(run_dir)
    assert run["run"].job_type == "suite-report" and run["run"].run_group == "tiny-suite"
    assert run["run"].display_name == "tiny-suite-report"
    (row,) = run["history"]
    stability = read_table(run_dir, row["stability"])
    assert stability["columns"] == list(table.columns)
    assert [r[0] for r in stability["data"]] == ["looped-k03-s0", "flt-k03-s0"]
    assert stability["data"][0][4:] == [40.0, "resid_explosion"]
    image = row["figures/loss"]
    assert image["_type"] == "image-file" and (image["width"], image["height"]) == (16, 12)
    assert (run_dir / "files" / image["path"]).is_file()


def test_init_failure_logs_one_line_and_turns_into_no_op(tmp_path: Path, caplog) -> None:
    not_a_dir = tmp_path / "wandb-dir"
    not_a_dir.write_text("a file where the W&B folder should be")
    wandb_run = WandbRun("looped-k03-s0", cell_config(), dir=not_a_dir)
    wandb_run.log_record(record(1))
    wandb_run.emit(event(1, "resid_explosion", "critical"))
    wandb_run.finish({"status": "collapsed"})
    (line,) = [r.getMessage() for r in caplog.records if r.name == "loopdiag.run.wandb_logging"]
    assert line.startswith("W&B logging for run looped-k03-s0 failed in init and is off for the rest "
                           "of the run: FileExistsError") and "\n" not in line
    assert not wandb_run.active and wandb_run.run_dir is None
    assert not (tmp_path / "wandb").exists()


def test_failure_mid_run_logs_one_line_and_turns_into_no_op(tmp_path: Path, caplog) -> None:
    wandb_run = WandbRun("looped-k03-s0", cell_config(), dir=tmp_path)
    wandb_run.log_record(record(1))
    wandb_run.wandb_run.finish()  # the run ends under the logger: W&B now raises on every call
    wandb_run.log_record(record(2))
    wandb_run.emit(event(2, "resid_explosion", "critical"))
    wandb_run.finish({"status": "collapsed"})
    (line,) = [r.getMessage() for r in caplog.records if r.name == "loopdiag.run.wandb_logging"]
    assert "looped-k03-s0 failed in log" in line and "UsageError" in line and "\n" not in line
    assert not wandb_run.active
    assert [row["_step"] for row in read_run(wandb_run.run_dir)["history"]] == [1]


def test_suite_report_failure_logs_and_returns_none(tmp_path: Path, caplog) -> None:
    not_a_dir = tmp_path / "report"
    not_a_dir.write_text("")
    assert log_suite("tiny-suite", pd.DataFrame({"a": [1]}), {}, dir=not_a_dir) is None
    assert "W&B report for suite tiny-suite failed" in caplog.text


@contextmanager
def unreachable_server(kind: str) -> Iterator[str]:
    """A W&B base URL that fails the way a server can: nothing listening, a socket that
    accepts and never answers, an HTTP 500 for every request."""
    if kind == "closed port":
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    elif kind == "silent socket":
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(64)
            yield f"http://127.0.0.1:{silent.getsockname()[1]}"
    else:
        class Failing(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(500)
                self.end_headers()

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()


INIT_LIMIT_S = 3.0  # WANDB_INIT_TIMEOUT for these tests: ONLINE_WAIT_S is what a user waits


@pytest.mark.parametrize("kind", ["closed port", "silent socket", "HTTP 500"])
def test_unreachable_server_is_learned_once_and_later_runs_log_offline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, kind: str) -> None:
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", str(INIT_LIMIT_S))
    suite_dir = tmp_path / "suite"
    with unreachable_server(kind) as url:
        monkeypatch.setenv("WANDB_BASE_URL", url)
        waits = []
        for index in range(3):
            started = time.monotonic()
            wandb_run = WandbRun(f"looped-k0{index + 1}-s0", cell_config(), group="suite", mode="online",
                                 dir=suite_dir)
            waits.append(time.monotonic() - started)
            wandb_run.log_record(record(1))
            wandb_run.finish({"status": "stable"})
            # kept offline in the suite's W&B folder, for `wandb sync`
            assert wandb_run.run_dir.parent == suite_dir / "wandb"
            assert wandb_run.run_dir.name.startswith("offline-run-")
            assert [row["_step"] for row in read_run(wandb_run.run_dir)["history"]] == [1]
    lines = [r.getMessage() for r in caplog.records if r.name == "loopdiag.run.wandb_logging"]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert lines[0].startswith("W&B unreachable (looped-k01-s0, init: ")
    assert f"wandb sync {suite_dir / 'wandb'}/offline-run-*" in lines[0]
    assert "init" in outage(suite_dir)
    # the first run waits the limit (plus starting W&B on a busy machine); the others do not
    # try online, which would leave a `run-*` folder each
    assert waits[0] < INIT_LIMIT_S + 60, waits
    assert len(list((suite_dir / "wandb").glob("run-*"))) == 1
    forget_outage(suite_dir)
    assert outage(suite_dir) is None


def test_outage_is_noted_by_the_first_process_only(tmp_path: Path, caplog) -> None:
    code = ("import sys; from loopdiag.run.wandb_logging import note_outage; "
            "note_outage(sys.argv[1], 'seen by ' + sys.argv[2])")
    for name in ("first", "second"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path), name], check=True)
    note_outage(tmp_path, "seen by this process")
    assert outage(tmp_path) == "seen by first"
    assert caplog.records == []  # this process was not the first


def test_rejects_unknown_mode_and_severity(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        WandbRun("r", {}, mode="disabled", dir=tmp_path)
    with pytest.raises(ValueError, match="alert_on"):
        WandbRun("r", {}, alert_on="error", dir=tmp_path)
    assert not (tmp_path / "wandb").exists()


def test_import_does_not_import_wandb() -> None:
    code = "import sys, loopdiag, loopdiag.run.wandb_logging; sys.exit('wandb' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
