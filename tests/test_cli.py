"""The command line, end to end on tiny sizes, and every bad-input path."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from loopdiag.cli import app
from loopdiag.store import load_suite

runner = CliRunner()


def test_run_trains_every_cell_and_prints_the_table(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["run", "--quick", "--loops", "3", "--arch", "flt", "--arch", "looped", "--steps", "6", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    suite = load_suite(out)
    assert sorted(suite.runs) == ["flt-k01-s0", "flt-k03-s0", "looped-k01-s0", "looped-k03-s0"]
    for run_id, run in suite.runs.items():
        assert run.steps["step"].tolist() == list(range(1, 7))
        assert 0 < run.steps["val_loss"].dropna().iloc[-1] < 6.0
        loops = run.loops[(run.loops["stat"] == "resid_norm") & (run.loops["step"] == 6)]
        assert len(loops) == run.config["cell"]["n_loops"] and (loops["value"] > 0).all()
        assert run.summary["status"] == "stable"
    assert "resid norm" in result.output and "flt" in result.output
    assert (out / "report" / "report.md").exists() and (out / "report" / "report.html").exists()
    assert len(list((out / "wandb").glob("offline-run-*/run-*.wandb"))) == 5  # 4 runs + the suite

    regenerated = tmp_path / "again"
    result = runner.invoke(app, ["report", str(out), "--out", str(regenerated)])
    assert result.exit_code == 0, result.output
    assert (regenerated / "table.csv").read_text() == (out / "report" / "table.csv").read_text()
    assert "flt-k03-s0" in (regenerated / "report.md").read_text()

    result = runner.invoke(app, ["analyze", str(out)])
    assert result.exit_code == 0 and "looped-k03-s0" in result.output and "stable" in result.output
    result = runner.invoke(app, ["analyze", str(out / "flt-k03-s0")])
    assert result.exit_code == 0 and "flt-k03-s0: stable" in result.output


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_analysis_commands_reject_a_folder_that_is_no_run_store(tmp_path, command):
    result = runner.invoke(app, [command, str(tmp_path)])
    assert result.exit_code == 2 and "not a suite folder" in result.output
    assert "Traceback" not in result.output


def test_online_wandb_without_a_login_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    result = runner.invoke(app, ["run", "--wandb", "online", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "wandb login" in result.output


def test_run_on_a_user_text_file(tmp_path):
    text = tmp_path / "poem.txt"
    text.write_text("the loop returns, the weights are tied, the stream goes round.\n" * 200)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["run", "--quick", "--loops", "1", "--arch", "flt", "--steps", "3", "--data", str(text), "--out", str(out),
              "--wandb", "off"]
    )
    assert result.exit_code == 0, result.output
    assert str(text) in result.output.replace("\n", "")
    (run,) = load_suite(out).runs.values()
    assert run.config["data"]["source"] == str(text)


@pytest.fixture
def binary_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 64)
    return path


@pytest.mark.parametrize(
    "args,message",
    [
        (["--arch", "transformer-xl"], "unknown architecture"),
        (["--loops", "0"], "--loops must be >= 1"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--size", "huge"], "unknown model preset"),
        (["--steps", "0"], "steps"),
        (["--lr", "-1"], "lr"),
        (["--optimizer", "sgd"], "optimizer"),
        (["--log-every", "0"], "--log-every"),
        (["--wandb", "cloud"], "--wandb must be"),
        (["--data", "/no/such/file.txt"], "no such file"),
    ],
    ids=["arch", "loops", "seeds", "size", "steps", "lr", "optimizer", "log-every", "wandb", "missing-data"],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    result = runner.invoke(app, ["run", "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_binary_and_empty_data_rejected(tmp_path, binary_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for path, reason in ((binary_file, "binary"), (empty, "empty")):
        result = runner.invoke(app, ["run", "--out", str(tmp_path), "--data", str(path)])
        assert result.exit_code == 2, result.output
        assert reason in result.output.lower() and str(path) in result.output.replace("\n", "")


def test_existing_output_folder_is_not_overwritten(tmp_path):
    (tmp_path / "keep.txt").write_text("results")
    result = runner.invoke(app, ["run", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "already holds files" in result.output


def test_malformed_option_exits_2():
    assert runner.invoke(app, ["run", "--loops", "twelve"]).exit_code == 2


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "loopdiag", "run", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--loops" in result.stdout
