"""`loopdiag dashboard`: the W&B workspace of a suite, checked through wandb-workspaces' own
models, and its panels' keys against what a run really logs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loopdiag.cli import app
from loopdiag.dashboard import LOSS, OSCILLATION, PER_LOOP, WORKSPACE_FILE, loop_key, read_workspace
from loopdiag.detect import DETECTORS
from loopdiag.store import read_records

ws = pytest.importorskip("wandb_workspaces.workspaces")
wr = pytest.importorskip("wandb_workspaces.reports.v2")

runner = CliRunner()
COMMITTED_REPORT = Path(__file__).resolve().parents[1] / "reports" / "flt-stability-task"  # K = 4


def keys(panel) -> list[str]:
    return [metric.name for metric in panel.y]


def test_the_workspace_file_is_the_libraries_view_of_the_suite(tmp_path):
    result = runner.invoke(app, ["dashboard", str(COMMITTED_REPORT), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    path = tmp_path / WORKSPACE_FILE
    assert str(path) in result.output.replace("\n", "")

    # parsed back by the library's own wire model and workspace class
    view = ws.internal.View.model_validate(json.loads(path.read_text()))
    workspace = ws.Workspace._from_model(view)
    assert workspace == read_workspace(path)
    assert (workspace.project, workspace.name) == ("loopdiag", "loopdiag: flt-stability-task")
    assert str(workspace.runset_settings.filters) == "Metric(\"Group\") == 'flt-stability-task'"
    assert [g.name for g in workspace.runset_settings.groupby] == ["cell.arch", "cell.n_loops"]
    assert "summary:verdict/status" in workspace.runset_settings.pinned_columns

    sections = {section.name: section.panels for section in workspace.sections}
    assert list(sections) == ["Loss by architecture x K", *(name for name, _ in PER_LOOP), "Gradient oscillation",
                              "Stability table", "Alerts"]
    assert [keys(panel) for panel in sections["Loss by architecture x K"]] == [[key] for key in LOSS]
    for name, stat in PER_LOOP:  # one line per loop of the suite's largest K
        (panel,) = sections[name]
        assert isinstance(panel, wr.LinePlot) and keys(panel) == [f"{stat}/loop_0{k}" for k in (1, 2, 3, 4)]
        assert (panel.groupby_aggfunc, panel.groupby_rangefunc) == ("mean", "minmax")
    assert [keys(panel) for panel in sections["Gradient oscillation"]] == [[stat] for stat in OSCILLATION]
    (table,) = sections["Stability table"]
    assert isinstance(table, wr.WeavePanelSummaryTable) and table.table_name == "stability"
    events, *marks = sections["Alerts"]
    assert events.table_name == "events" and [keys(p) for p in marks] == [[f"events/{d}"] for d in DETECTORS]


def test_the_panels_plot_keys_that_runs_log():
    """Every series the workspace plots is one a loopdiag run writes (checked on a committed
    run's records, flattened as W&B gets them)."""
    logged: set[str] = set()
    for record in read_records(COMMITTED_REPORT / "runs" / "flt-k04-s0"):
        logged |= {loop_key(k, i + 1) if isinstance(v, list) else k
                   for k, v in record.items() for i in range(len(v) if isinstance(v, list) else 1)}
    wanted = {*LOSS, *OSCILLATION, *(loop_key(stat, k) for _, stat in PER_LOOP for k in (1, 2, 3, 4))}
    assert wanted <= logged, wanted - logged


def test_loop_keys_are_those_the_recorder_flattens():
    from loopdiag.probes import flatten_record

    flat = flatten_record({"step": 3, "resid_norm": [1.0, 2.0, 3.0]})
    assert [key for key in flat if key.startswith("resid_norm")] == [loop_key("resid_norm", k) for k in (1, 2, 3)]


def test_a_suite_name_writes_into_its_report_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["dashboard", "default"])
    assert result.exit_code == 0, result.output
    workspace = read_workspace(tmp_path / "reports" / "default" / WORKSPACE_FILE)
    panel = next(s for s in workspace.sections if s.name == PER_LOOP[0][0]).panels[0]
    assert keys(panel)[-1] == "resid_norm/loop_12" and workspace.entity == "your-entity"


def test_a_name_finds_the_suite_trained_under_it_first(tmp_path, monkeypatch):
    # `loopdiag run --quick` names its suite default-quick, which no suite file is called
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports" / "default-quick" / "runs").mkdir(parents=True)
    (tmp_path / "reports" / "default-quick" / "runs" / "suite.json").write_text(
        (COMMITTED_REPORT / "runs" / "suite.json").read_text())
    result = runner.invoke(app, ["dashboard", "default-quick"])
    assert result.exit_code == 0, result.output
    workspace = read_workspace(tmp_path / "reports" / "default-quick" / WORKSPACE_FILE)
    panel = next(s for s in workspace.sections if s.name == PER_LOOP[0][0]).panels[0]
    assert keys(panel)[-1] == "resid_norm/loop_04"  # the trained suite's loops, not a file's


def test_online_saves_the_view_and_prints_its_url(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(ws.Workspace, "save", lambda self: saved.append(self) or self)
    monkeypatch.setattr(ws.Workspace, "url", property(lambda self: f"https://wandb.ai/{self.entity}/{self.project}?nw=v1"))
    result = runner.invoke(app, ["dashboard", str(COMMITTED_REPORT), "--online", "--entity", "lab",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "https://wandb.ai/lab/loopdiag?nw=v1" in result.output and len(saved) == 1
    assert not (tmp_path / WORKSPACE_FILE).exists()


@pytest.mark.parametrize("args, message", [
    (["nope"], "no suite named 'nope'"),
    (["."], "no suite.json"),
])
def test_bad_input(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["dashboard", *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_online_needs_a_login(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    result = runner.invoke(app, ["dashboard", str(COMMITTED_REPORT), "--online"])
    assert result.exit_code == 2 and "wandb login" in result.output


def test_without_the_library_it_says_what_to_install(tmp_path, monkeypatch):
    for name in [name for name in sys.modules if name.split(".")[0] == "wandb_workspaces"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # as if not installed
    result = runner.invoke(app, ["dashboard", str(COMMITTED_REPORT), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "pip install 'loopdiag[dashboard]'" in result.output, result.output
