"""What `loopdiag run` shows in the terminal: live progress and alerts, then the table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from loopdiag.detect.base import SEVERITIES
from loopdiag.detect.monitor import SEVERITY_STYLE
from loopdiag.detect.verdict import FAILED_STATUSES

if TYPE_CHECKING:  # the runner imports torch; `analyze` and `report` print tables without it
    from loopdiag.run.runner import RunSpec


class LiveProgress:
    """One bar over all steps of all runs and one per run in progress, fed the messages
    of `loopdiag.run.launch.run_suite`; detector events of severity `alerts` or above print
    above the bars as they fire (the others are in each run's events.jsonl and the report)."""

    def __init__(self, console: Console, cells: list[RunSpec], steps: int, alerts: str = "warn"):
        if alerts not in SEVERITIES:
            raise ValueError(f"alerts must be one of {', '.join(SEVERITIES)}, got {alerts!r}")
        self.steps = steps
        self.shown_severities = SEVERITIES[SEVERITIES.index(alerts):]
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[note]}"), console=console, transient=True)
        self.total = len(cells)
        self.finished = 0
        self.overall = self.progress.add_task(self._overall_text(), total=self.total * steps, note="")
        self.active: dict[str, TaskID] = {}
        self.done_steps: dict[str, int] = {}

    def __enter__(self) -> LiveProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def handle(self, message: tuple[str, str, dict[str, Any]]) -> None:
        kind, run_id, payload = message
        if kind == "start":
            self.active[run_id] = self.progress.add_task(f"  {run_id}", total=self.steps, note="")
        elif kind == "progress" and run_id in self.active:
            loss = payload.get("loss")
            note = "" if loss is None else f"loss {loss:.3f}"
            self.progress.update(self.active[run_id], completed=payload["step"], total=payload["total"], note=note)
            self.done_steps[run_id] = payload["step"]
            self.progress.update(self.overall, completed=sum(self.done_steps.values()))
        elif kind == "eval" and run_id in self.active:
            self.progress.update(self.active[run_id], note="evaluating at other loop counts")
        elif kind == "event" and payload["severity"] in self.shown_severities:
            style = SEVERITY_STYLE[payload["severity"]]
            self.progress.console.print(
                f"[{style}]{payload['severity'].upper()}[/] {run_id} step {payload['step']} "
                f"[bold]{payload['detector']}[/]: {payload['message']}", highlight=False)
        elif kind == "done":
            self.finished += 1
            self.done_steps[run_id] = self.steps  # a run stopped early counts as done
            if run_id in self.active:
                self.progress.remove_task(self.active.pop(run_id))
            # Without a terminal there are no bars: every run's end is the progress a log shows.
            if payload["status"] not in ("stable", "kept") or not self.progress.console.is_terminal:
                self.progress.console.print(
                    f"{run_id}: {payload['status']} ({self.finished}/{self.total} runs done)",
                    highlight=False)
            self.progress.update(self.overall, description=self._overall_text(),
                                 completed=sum(self.done_steps.values()))

    def _overall_text(self) -> str:
        return f"runs done {self.finished}/{self.total}"


def _fmt(value: Any) -> str:
    return "—" if value is None or pd.isna(value) else f"{value:.3g}" if abs(value) >= 100 else f"{value:.3f}"


def stability_table(table: pd.DataFrame) -> Table:
    """The suite table (`loopdiag.analysis.suite_table`) as a rich table, one row per run."""
    swept = table["lr"].nunique() > 1
    verdicts = [_verdict(row) for row in table.itertuples()]
    # the verdict column wraps between words, never inside one ("(representation)"); no outer
    # edge, so that fits beside the other columns in 80 characters
    longest_word = max((len(word) for text in verdicts for word in Text.from_markup(text).plain.split()),
                       default=0)
    out = Table(title="final train / val loss, residual growth (last loop, end / start), "
                      "gradient oscillation, verdict", title_justify="left", show_edge=False)
    # runs recorded outside a suite (the Python API) have no cell: their ids tell them apart
    named = table["arch"].isna().any()
    columns = [*(["run"] if named else []), "arch", "K", *(["lr"] if swept else []), "seed", "loss", "val",
               "growth", "osc", "verdict"]
    for column in columns:
        out.add_column(column, justify="left" if column in ("run", "arch", "verdict") else "right",
                       no_wrap=column != "verdict",
                       min_width=max(len(column), longest_word if column == "verdict" else 0))
    for row, verdict in zip(table.itertuples(), verdicts):
        out.add_row(*([row.run_id] if named else []), _cell(row.arch), _cell(row.n_loops),
                    *([_cell(row.lr, "{:g}")] if swept else []), _cell(row.seed),
                    _fmt(row.final_loss), _fmt(row.final_val_loss), _fmt(row.resid_growth_steps),
                    _fmt(row.oscillation), verdict)
    return out


def _cell(value: Any, form: str = "{}") -> str:
    """A cell key as shown: "—" where the run has none."""
    return "—" if value is None or pd.isna(value) else form.format(value)


def _verdict(row: Any) -> str:
    failed = row.status in FAILED_STATUSES
    mechanism = getattr(row, "mechanism", None)
    what = row.status.replace("_", " ") + (f" ({mechanism})" if isinstance(mechanism, str) else "")
    # a collapse's mechanism names what broke; other failures name their signal, where it
    # says more than the status (a failed_to_train status has only that signal)
    signal = "" if isinstance(mechanism, str) or row.signal == row.status else f" {row.signal}"
    if row.status == "stable" and not pd.isna(row.first_warning_step):
        return f"[yellow]stable, warned @{int(row.first_warning_step)}[/]"
    if row.status == "recovered" and isinstance(mechanism, str):
        return f"[yellow]{what} from @{int(row.failure_step)}[/]" if not pd.isna(row.failure_step) else what
    if row.status == "interrupted" and isinstance(mechanism, str) and not pd.isna(row.failure_step):
        return f"[yellow]interrupted, collapsed ({mechanism}) @{int(row.failure_step)}[/]"
    return (f"[red]{what} @{int(row.failure_step)}{signal}[/]"
            if failed and not pd.isna(row.failure_step) else what)
