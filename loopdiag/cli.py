"""Command line: a thin layer over library functions.

Exit codes: 0 done (a run that diverges or collapses is a result, not a failure),
2 bad input (one line, no traceback), 1 internal error.
"""

from __future__ import annotations

import netrc
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loopdiag.data import load_corpus
from loopdiag.models import ARCHITECTURES, preset
from loopdiag.monitor import ConsoleSink
from loopdiag.runner import DEFAULT_ARCHS, RunOutcome, RunSpec, loop_grid, run_grid
from loopdiag.train import TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Training-stability diagnostics for looped transformers.")
console = Console()


def bad_input(message: str) -> typer.Exit:
    """Report a user error as one line; the caller raises the returned exit (code 2)."""
    console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


@app.callback()
def _root() -> None:
    """Training-stability diagnostics for looped (weight-tied) transformers."""


@app.command()
def run(
    loops: Annotated[int, typer.Option(help="Largest loop count; compares 1, 4 and this many loops.")] = 12,
    arch: Annotated[list[str] | None, typer.Option(help="Architecture (repeatable). Default: standard, looped, flt.")] = None,
    steps: Annotated[int, typer.Option(help="Training steps per run.")] = 150,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 3e-3,
    optimizer: Annotated[str, typer.Option(help="adamw, or muon (Muon for block matrices, AdamW for the rest).")] = "adamw",
    schedule: Annotated[str, typer.Option(help="constant-decay (the paper's) or cosine.")] = "constant-decay",
    seeds: Annotated[int, typer.Option(help="Seeds per (architecture, loops) cell.")] = 1,
    data: Annotated[list[Path] | None, typer.Option(help="Text file(s) to train on. Default: embedded CPython docs.")] = None,
    size: Annotated[str, typer.Option(help="Model size preset: tiny, default or small.")] = "default",
    out: Annotated[Path | None, typer.Option(help="Suite folder (one run folder per cell). Default: runs/<timestamp>.")] = None,
    log_every: Annotated[int, typer.Option(help="Record probe statistics every n steps.")] = 1,
    wandb: Annotated[str, typer.Option(help="off, offline (no account; `wandb sync` uploads later) or online.")] = "offline",
    quick: Annotated[bool, typer.Option(help="A fast smoke run: tiny models, few steps, loops 1 and max.")] = False,
) -> None:
    """Train architectures across loop counts and print final losses and residual norms."""
    archs = list(arch or DEFAULT_ARCHS)
    unknown = [a for a in archs if a not in ARCHITECTURES]
    if unknown:
        raise bad_input(f"unknown architecture {unknown[0]!r}; choose from {', '.join(ARCHITECTURES)}")
    if seeds < 1:
        raise bad_input(f"--seeds must be >= 1, got {seeds}")
    if log_every < 1:
        raise bad_input(f"--log-every must be >= 1, got {log_every}")
    if wandb not in ("off", "offline", "online"):
        raise bad_input(f"--wandb must be off, offline or online, got {wandb!r}")
    if wandb == "online" and not _wandb_logged_in():
        raise bad_input("--wandb online needs a W&B login: run `wandb login` or set WANDB_API_KEY")
    if quick:
        size, steps = "tiny", min(steps, 40)
    try:
        loop_counts = [1, loops] if quick and loops > 1 else loop_grid(loops)
        model_config = preset(size)
        train_config = TrainConfig(
            steps=steps, lr=lr, optimizer=optimizer, schedule=schedule, eval_every=max(steps // 4, 1)
        )
        corpus = load_corpus(data)
    except ValueError as error:  # DataError included: bad files, bad sizes, bad loop counts
        raise bad_input(str(error)) from None

    specs = [RunSpec(a, k, seed) for a in archs for k in loop_counts for seed in range(seeds)]
    out = out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()):
        raise bad_input(f"{out} already holds files; choose a new --out folder")
    console.print(
        f"[bold]loopdiag run[/]: {len(specs)} runs ({', '.join(archs)} × loops {loop_counts}"
        f"{f' × {seeds} seeds' if seeds > 1 else ''}), {steps} steps each, d_model={model_config.d_model}, "
        f"L={model_config.n_layers}, corpus {corpus.source} ({corpus.n_bytes:,} bytes)"
    )
    suite_spec = {"name": out.name, "archs": archs, "loops": loop_counts, "seeds": seeds, "steps": steps, "lr": lr}
    wandb_mode = None if wandb == "off" else wandb
    # W&B's own banners and console capture would fight the progress bar; we print the sync hint.
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    outcomes = _run_with_progress(specs, model_config, train_config, corpus, out, suite_spec, log_every, wandb_mode)
    console.print(_outcome_table(outcomes))
    console.print(f"run store: {out}")
    report_path = _write_report(out, out / "report")
    if wandb_mode is not None:
        import pandas as pd

        from loopdiag.wandb_logging import log_suite

        figures = {path.stem: path for path in sorted((report_path.parent / "figures").glob("*.png"))}
        table = pd.read_csv(report_path.parent / "table.csv")
        log_suite(out.name, table, figures, mode=wandb_mode, dir=out)
        console.print(f"W&B ({wandb_mode}): {out / 'wandb'}" + ("  (upload with `wandb sync`)" if wandb_mode == "offline" else ""))


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


@app.command()
def analyze(
    path: Annotated[Path, typer.Argument(help="A run folder or a suite folder.")],
) -> None:
    """Verdicts from a run store: one run explained, or a suite's table."""
    from loopdiag.analysis import explain, run_verdict, suite_table
    from loopdiag.store import is_run_dir, load_run, load_suite

    try:
        if is_run_dir(path):
            run = load_run(path)
            judged = run_verdict(run)
            console.print(f"[bold]{run.run_id}[/]: {judged['status']}"
                          f"{' (recomputed from the store)' if judged.get('recomputed') else ''}")
            if judged["status"] in ("collapsed", "diverged"):
                console.print(explain(run, judged), soft_wrap=True)
            return
        table = suite_table(load_suite(path))
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise bad_input(str(error)) from None
    columns = ["run_id", "status", "failure_step", "signal", "final_loss", "best_loss", "oscillation"]
    console.print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"), soft_wrap=True)


@app.command()
def report(
    suite: Annotated[Path, typer.Argument(help="A suite folder written by `loopdiag run`.")],
    out: Annotated[Path | None, typer.Option(help="Report folder. Default: reports/<suite name>.")] = None,
) -> None:
    """Regenerate a suite's report (markdown, HTML, figures, table) from its run store alone."""
    _write_report(suite, out or Path("reports") / suite.name)


def _write_report(suite: Path, out: Path) -> Path:
    from loopdiag.analysis import write_report

    command = f"loopdiag report {suite} --out {out}"
    try:
        path = write_report(suite, out, command)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise bad_input(str(error)) from None
    console.print(f"report: {path} (and {path.with_suffix('.html').name})")
    return path


def _run_with_progress(specs, model_config, train_config, corpus, out, suite_spec, log_every, wandb_mode):
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[loss]}"),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        overall = progress.add_task("all runs", total=len(specs) * train_config.steps, loss="")
        done_before = {"steps": 0}

        def on_run_start(index: int, spec: RunSpec) -> None:
            done_before["steps"] = index * train_config.steps
            progress.update(overall, description=f"run {index + 1}/{len(specs)} {spec.arch} K={spec.n_loops}")

        def on_progress(step: int, total: int, metrics: dict) -> None:
            loss = metrics.get("train_loss")
            progress.update(
                overall,
                completed=done_before["steps"] + step,
                loss="" if loss is None else f"loss {loss:.3f}",
            )

        sinks = [ConsoleSink(console=progress.console)]
        return list(run_grid(
            specs, model_config, train_config, corpus, out, suite_spec, on_run_start,
            log_every=log_every, sinks=sinks, on_progress=on_progress,
            wandb_mode=wandb_mode, wandb_group=suite_spec["name"],
        ))


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _outcome_table(outcomes: list[RunOutcome]) -> Table:
    table = Table(title="final losses, last-loop residual norm (mean token ||x_L^(K)||) and verdict")
    for column in ("arch", "loops", "seed", "train loss", "val loss", "resid norm", "verdict"):
        table.add_column(column, justify="left" if column in ("arch", "status") else "right", no_wrap=column == "arch")
    for o in outcomes:
        status = o.status if o.failure_step is None else f"[red]{o.status} at step {o.failure_step} ({o.signal})[/]"
        table.add_row(
            o.arch, str(o.n_loops), str(o.seed),
            _fmt(o.final_train_loss), _fmt(o.final_val_loss), _fmt(o.last_loop_resid_norm), status,
        )
    return table


def main() -> None:
    app()
