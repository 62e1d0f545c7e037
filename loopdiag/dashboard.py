"""A W&B workspace for a suite, as code: the per-loop views a user would otherwise build by
hand out of ~40 auto-generated panels.

    workspace = suite_workspace("default", max_loops=12, entity="me")
    workspace.save()                                    # online: a saved view, workspace.url
    write_workspace(workspace, "reports/default/wandb-workspace.json")   # offline
    read_workspace("reports/default/wandb-workspace.json")               # parsed back

Built with `wandb-workspaces` (`pip install 'loopdiag[dashboard]'`), imported here only.
The runs are those `loopdiag run` logs: one W&B run per training run in the group
`<suite>`, config `cell.arch` / `cell.n_loops`, per-loop series `resid_norm/loop_03`, events
as `events/<detector>`, and the `<suite>-report` run holding the `stability` table.
The workspace keeps the suite's group and groups it by architecture x K, so every line is a
mean over seeds with its min-max band.

Offline, the workspace is written as the library's own view model (`internal.View`, what
`Workspace.save` uploads), so reading it back validates it with the same classes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loopdiag.detect import DETECTORS

WORKSPACE_FILE = "wandb-workspace.json"
PROJECT = "loopdiag"  # WandbRun's default project
OFFLINE_ENTITY = "your-entity"  # offline there is no account to name; --entity sets it

# (section, per-loop statistic): one line per loop, loop_01 .. loop_K, as flatten_record keys them
PER_LOOP = (
    ("Residual norm per loop", "resid_norm"),
    ("Token correlation per loop", "token_corr"),
    ("Gradient at each loop's output", "act_grad_norm"),
)
# per-step statistics of the shared (looped) weights' gradient, see loopdiag.probes
OSCILLATION = ("grad_cos", "sign_flip", "gnorm_cv", "gnorm_autocorr", "shared_grad_norm", "update_ratio")
LOSS = ("loss", "val_loss")
VERDICT_COLUMNS = ("summary:verdict/status", "summary:verdict/step", "summary:verdict/signal",
                   "config:cell.arch", "config:cell.n_loops")


def loop_key(stat: str, loop: int) -> str:
    """The W&B key of a per-loop statistic at loop `loop` (1-based): `resid_norm/loop_03`."""
    return f"{stat}/loop_{loop:02d}"


def suite_workspace(suite: str, max_loops: int, *, entity: str, project: str = PROJECT) -> Any:
    """The workspace (`wandb_workspaces.workspaces.Workspace`) of suite `suite`'s runs, with
    per-loop panels for loops 1..`max_loops`."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def lines(title: str, keys: list[str], **options: Any) -> Any:
        return wr.LinePlot(title=title, x="step", y=keys, groupby_aggfunc="mean",
                           groupby_rangefunc="minmax", **options)

    loops = range(1, max_loops + 1)
    sections = [
        ws.Section(name="Loss by architecture x K", is_open=True, panels=[
            lines(f"{key} (mean over seeds, min-max)", [key]) for key in LOSS]),
        *[ws.Section(name=name, is_open=True, panels=[
            lines(f"{stat}: one line per loop, 1..{max_loops}", [loop_key(stat, k) for k in loops],
                  log_y=stat != "token_corr")]) for name, stat in PER_LOOP],
        ws.Section(name="Gradient oscillation", is_open=True, panels=[
            lines(stat, [stat]) for stat in OSCILLATION]),
        ws.Section(name="Stability table", is_open=True, panels=[
            wr.WeavePanelSummaryTable(table_name="stability", layout=wr.Layout(w=24, h=12))]),
        ws.Section(name="Alerts", is_open=True, panels=[
            wr.WeavePanelSummaryTable(table_name="events", layout=wr.Layout(w=24, h=10)),
            *[lines(f"{name} (1 info, 2 warn, 3 critical)", [f"events/{name}"]) for name in DETECTORS]]),
    ]
    return ws.Workspace(
        entity=entity, project=project, name=f"loopdiag: {suite}", sections=sections,
        settings=ws.WorkspaceSettings(x_axis="step"),
        runset_settings=ws.RunsetSettings(
            filters=f"Metric('Group') == '{suite}'",
            groupby=[ws.Config("cell.arch"), ws.Config("cell.n_loops")],
            pinned_columns=list(VERDICT_COLUMNS)),
    )


def write_workspace(workspace: Any, path: str | Path) -> Path:
    """Write the workspace's view definition (what `Workspace.save` would upload) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    view = workspace._to_model()  # the library's wire model: no public serialiser exists
    path.write_text(json.dumps(view.model_dump(by_alias=True, exclude_none=True, mode="json"), indent=1) + "\n")
    return path


def read_workspace(path: str | Path) -> Any:
    """A workspace written by `write_workspace`, validated by the library's own models; save
    it with `.save()` once logged in."""
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces.workspaces import internal

    view = internal.View.model_validate(json.loads(Path(path).read_text()))
    return ws.Workspace._from_model(view)
