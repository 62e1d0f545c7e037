"""Command line: a thin layer over library functions.

Exit codes: 0 done (a run that diverges or collapses is a result, not a failure),
2 bad input (one line, no traceback), 1 internal error, or a disk that takes no more
writes (one line, no traceback).
"""

from __future__ import annotations

import json
import netrc
import os
import shlex
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import pandas as pd
import typer
from rich.console import Console
from rich.markup import escape

import loopdiag
from loopdiag.console import stability_table
from loopdiag.detect.base import SEVERITIES
from loopdiag.store import RunStoreWarning
from loopdiag.store.writer import byte_size, write_failure

if TYPE_CHECKING:
    from loopdiag.run.probe_suite import ProbeSuite, RunSpec

# Training needs torch; `analyze`, `report` and `compare` do not, so the modules that import
# it (distributed, launch, suite) are imported inside the commands that train.

RUNS_FOLDER = "runs"  # the run store inside a report folder

# markdown: a paragraph of help reflows to the terminal (rich mode keeps the source's line breaks)
app = typer.Typer(no_args_is_help=True, rich_markup_mode="markdown",
                  help="Training-stability diagnostics for looped transformers.")
console = Console()


def bad_input(message: str) -> typer.Exit:
    """Report a user error as one line; the caller raises the returned exit (code 2)."""
    console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def disk_failure(message: str, resume_with: str | None = None) -> typer.Exit:
    """Report a write that failed (a full disk) as one line; the caller raises the returned
    exit (code 1)."""
    then = f"; free some space, then `{resume_with}` finishes it" if resume_with else ""
    console.print(f"[red]error:[/] {escape(message + then)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


@contextmanager
def _failed_writes_end_command(path: Path, rerun: str) -> Iterator[None]:
    """A write under `path` that fails for want of disk ends the command in one line."""
    try:
        yield
    except OSError as error:
        failed_write = write_failure(path, error)
        if failed_write is None:
            raise
        raise disk_failure(failed_write, rerun) from None


def _print_version(value: bool) -> None:
    if value:
        console.print(f"loopdiag {loopdiag.__version__}", highlight=False)
        raise typer.Exit()


@contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Each warning as one line on stderr (`warning: ...`), once: the file, line and source
    line Python adds (a `RunStoreWarning`'s `load_suite(...)`) tell a user nothing, nor does
    a repeat. Python's own display comes back when the command ends."""
    errors = Console(stderr=True)
    shown: set[str] = set()

    def show(message: Warning | str, *_: object, **__: object) -> None:
        if str(message) not in shown:
            shown.add(str(message))
            errors.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


@app.callback()
def _root(
    context: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Training-stability diagnostics for looped (weight-tied) transformers."""
    context.with_resource(_warnings_as_lines())  # left when the command ends


# Extra arguments reach `run` so that an unquoted glob after --data gets a hint, not click's
# bare "unexpected extra argument".
@app.command(context_settings={"allow_extra_args": True})
def run(
    context: typer.Context,
    suite: Annotated[str | None, typer.Argument(
        help="A probe suite: a .toml file, or the name of one in ./probes/ or shipped with loopdiag "
             "(`--list` shows them). Default: default.", show_default=False)] = None,
    list_suites: Annotated[bool, typer.Option("--list", help="List the suites names resolve to, and exit.")] = False,
    loops: Annotated[int | None, typer.Option(help="Largest loop count: the suite's loop counts up to it, and it.")] = None,
    arch: Annotated[list[str] | None, typer.Option(help="Architecture (repeatable); replaces the suite's.")] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps per run.")] = None,
    lr: Annotated[list[float] | None, typer.Option(help="Peak learning rate (repeatable: a sweep).")] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per cell (0..n-1).")] = None,
    data: Annotated[list[Path] | None, typer.Option(
        help="Text file to train on instead of the suite's data; repeat it for several, or quote a "
             "glob ('texts/*.md': the files it matches, in name order).", show_default=False)] = None,
    size: Annotated[str | None, typer.Option(help="Model size preset: tiny, default or small.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adamw, or muon (Muon for block matrices).")] = None,
    schedule: Annotated[str | None, typer.Option(help="constant-decay (the paper's) or cosine.")] = None,
    log_every: Annotated[int | None, typer.Option(help="Record probe statistics every n steps.")] = None,
    grad_accum_steps: Annotated[int | None, typer.Option(
        help="Micro-batches per update (each batch_size / n rows).", show_default=False)] = None,
    precision: Annotated[str | None, typer.Option(
        help="fp32, or bf16 (forwards under autocast; weights and statistics fp32).", show_default=False)] = None,
    parallel: Annotated[str | None, typer.Option(
        help="Under torchrun: ddp (replicated weights) or fsdp (sharded, FSDP2).", show_default=False)] = None,
    name: Annotated[str | None, typer.Option(
        help="Name these runs' suite (the report's title, the W&B group, the default --out) in "
             "place of the file's: the same suite on other data or settings keeps its own.",
        show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(
        help="Report folder; the run store goes in its runs/. Default: reports/SUITE, SUITE the "
             "suite's name.")] = None,
    wandb: Annotated[str, typer.Option(help="off, offline (no account; `wandb sync` uploads later) or online.")] = "offline",
    jobs: Annotated[int, typer.Option(help="Runs trained at once, in worker processes; 0: one per CPU core (at most 8).")] = 0,
    alerts: Annotated[str, typer.Option(
        help="Least severity a detector event needs to print while training: info, warn or "
             "critical. Every event is in the run's events.jsonl and the report.")] = "warn",
    stop_on_collapse: Annotated[bool | None, typer.Option(
        "--stop-on-collapse/--no-stop-on-collapse", help="Stop a run when a detector goes critical (default: the suite's).",
        show_default=False)] = None,
    only: Annotated[list[str] | None, typer.Option(
        help="KEY=V1,V2 (repeatable; KEY: arch, loops, lr, seed): train only the suite's runs that "
             "match, e.g. to finish part of a suite with --resume; the report covers every run "
             "finished.", show_default=False)] = None,
    shard: Annotated[str | None, typer.Option(
        help="i/n: train only shard i of n (0-based) of the suite's runs, for several machines "
             "sharing --out; `loopdiag report` merges them.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue a suite in --out: finished runs are kept, interrupted ones resume.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the runs already in --out.")] = False,
    quick: Annotated[bool, typer.Option(
        help="A fast smoke run: tiny models, at most 40 steps, loops 1 and the largest "
             "(--size and --steps, when given, win).")] = False,
    svg: Annotated[bool, typer.Option(help="Also write every figure of the report as SVG.")] = False,
) -> None:
    """Train a probe suite with live collapse alerts, then report and print the verdicts.

    Every run of the suite (architectures x loop counts x learning rates x seeds) trains with
    the probes attached; the report and the stability table follow. Under `torchrun
    --nproc_per_node N` all N ranks train each run together (DDP, or FSDP2 with --parallel
    fsdp)."""
    from loopdiag import distributed
    from loopdiag.console import LiveProgress
    from loopdiag.data import SyntheticTask
    from loopdiag.run.launch import cell_filter, cpu_count, run_suite, shard_cells
    from loopdiag.run.probe_suite import apply_overrides, find_suite, load_probe_suite

    if list_suites:
        _list_suites()
        return
    _refuse_stray_data_files(suite, context.args, data)
    if wandb not in ("off", "offline", "online"):
        raise bad_input(f"--wandb must be off, offline or online, got {wandb!r}")
    if wandb == "online" and not _wandb_logged_in():
        raise bad_input("--wandb online needs a W&B login: run `wandb login` or set WANDB_API_KEY")
    if jobs < 0:
        raise bad_input(f"--jobs must be >= 0, got {jobs}")
    if alerts not in SEVERITIES:
        raise bad_input(f"--alerts must be info, warn or critical, got {alerts!r}")
    if resume and overwrite:
        raise bad_input("--resume and --overwrite contradict each other; pick one")
    _refuse_store_as_out(out)
    shard_of = _parse_shard(shard)
    try:
        spec = load_probe_suite(find_suite(suite))
        spec = apply_overrides(spec, loops=loops, archs=arch, steps=steps, lrs=lr, seeds=seeds, data=data,
                               size=size, optimizer=optimizer, schedule=schedule, log_every=log_every,
                               grad_accum_steps=grad_accum_steps, precision=precision, parallel=parallel,
                               stop_on_collapse=stop_on_collapse, name=name, quick=quick)
        data = spec.data.load()  # a missing or unreadable corpus fails here, before any run
        distributed.check_device(spec.train.device)  # as does a device this machine lacks
    except ValueError as error:  # SuiteError and DataError included
        raise bad_input(str(error)) from None

    context.with_resource(distributed.torchrun_group(spec.train.device))  # left when the command ends
    if not distributed.is_main():
        console.quiet = True  # rank 0 speaks (and writes files) for all ranks
    try:
        distributed.local_rows(spec.train.batch_size, spec.train.grad_accum_steps)
    except ValueError as error:
        raise bad_input(str(error)) from None

    out = out or Path("reports") / spec.name
    suite_dir = out / RUNS_FOLDER
    try:
        accepts = cell_filter(only or [], spec.train.lr)
    except ValueError as error:
        raise bad_input(str(error)) from None
    _refuse_only_outside_suite(only or [], spec)
    planned = shard_cells(spec.cells(), shard_of)
    cells = [cell for cell in planned if accepts(cell)]
    if not planned:  # more shards than runs: a job array's spare task has nothing to do, and is no failure
        console.print(f"shard {shard} has no runs ({spec.name} has {len(spec.cells())}): nothing to train",
                      highlight=False)
        return
    if not cells:  # only --only can empty a shard that has runs
        of = f"shard {shard} of " if shard else ""
        raise bad_input(f"--only {' '.join(only or [])} matches none of {of}the suite's runs")
    ranks = distributed.world_size()
    row_length = data.seq_len if isinstance(data, SyntheticTask) else spec.model.seq_len
    jobs = 1 if ranks > 1 else _jobs_that_fit(spec, cells, row_length, jobs or min(8, cpu_count(), len(cells)),
                                              chosen=jobs > 0)
    if distributed.is_main():
        _prepare_suite_dir(suite_dir, spec, cells, resume=resume, overwrite=overwrite)
        _check_writable(suite_dir)
    distributed.barrier()  # the other ranks read the suite folder only once rank 0 is done with it
    spec = spec.with_(command=_command_line(context))
    console.print(
        f"[bold]loopdiag run[/] {spec.name}{f' shard {shard}' if shard else ''}: {len(cells)} "
        f"{'' if len(cells) == len(planned) else f'of {len(planned)} '}runs "
        f"({', '.join(spec.archs)} x loops "
        f"{list(spec.loops)}{_plural(len(spec.lrs), 'lr')}{_plural(len(spec.seeds), 'seed')}), "
        f"{spec.train.steps} steps each, d_model={spec.model.d_model}, L={spec.model.n_layers}, "
        f"data {spec.data.describe()}, {min(jobs, len(cells))} at a time{f' on {ranks} ranks' if ranks > 1 else ''}",
        highlight=False, soft_wrap=True)
    _say_if_too_few_records(spec.train.steps, spec.log_every)
    if resume and distributed.is_main():
        _say_which_runs_start_over(suite_dir, cells)
    wandb_mode = None if wandb == "off" else wandb
    # W&B's own banners and console capture would fight the progress bar; we print the sync hint.
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    try:
        with LiveProgress(console, cells, spec.train.steps, alerts) as progress:
            results = run_suite(spec, suite_dir, jobs=jobs, resume=resume, wandb_mode=wandb_mode,
                                shard=shard_of, only=accepts, on_message=progress.handle)
    except KeyboardInterrupt:
        resume_with = spec.command if resume else f"{spec.command} --resume"
        if ranks > 1:  # torchrun's ranks stop at once (`train`), from their last checkpoint
            said = (f"the run under way stopped at once; to continue it from its last checkpoint: "
                    f"torchrun --nproc_per_node {ranks} -m {resume_with}")
        else:
            said = f"the runs under way keep their records and checkpoints; to continue each: {resume_with}"
        console.print(f"interrupted: {said}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=130) from None
    if not distributed.is_main():
        return
    stopped = [r for r in results if r.write_failure]
    if stopped:
        resume_with = spec.command if resume else f"{spec.command} --resume"
        raise disk_failure(f"{stopped[0].write_failure}: runs stopped: {len(stopped)} (their records kept), "
                           f"not started: {len(cells) - len(results)}", resume_with)
    errors = [r for r in results if r.error]
    if len(errors) == len(results):
        for result in errors:
            console.print(f"[red]{result.run_id} failed:[/]\n{result.error}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)
    if shard is not None:  # the other shards may still be training into the same folder
        console.print(f"shard {shard} done: {suite_dir}; once every shard is, `loopdiag report {out}` "
                      f"writes the report of them all")
        _report_errors(errors)
        return
    with _failed_writes_end_command(out, f"loopdiag report {shlex.quote(str(out))}"):
        report_path = _write_report(suite_dir, out, svg)
    table = pd.read_csv(report_path.parent / "table.csv")
    console.print(stability_table(table))
    console.print(f"report: {report_path} (and {report_path.with_suffix('.html').name}); run store: {suite_dir}")
    if wandb_mode is not None:
        from loopdiag.run.wandb_logging import log_suite, outage

        figures = {path.stem: path for path in sorted((report_path.parent / "figures").glob("*.png"))}
        log_suite(spec.name, table, figures, mode=wandb_mode, dir=suite_dir)
        unreachable = wandb_mode == "online" and outage(suite_dir) is not None
        sync_hint = "  (upload with `wandb sync`)" if wandb_mode == "offline" or unreachable else ""
        mode_shown = "online, unreachable: runs since then logged offline" if unreachable else wandb_mode
        console.print(f"W&B ({mode_shown}): {suite_dir / 'wandb'}{sync_hint}")
        if wandb_mode == "online" and not unreachable:
            console.print(f"a W&B workspace laid out for these runs: "
                          f"loopdiag dashboard {shlex.quote(str(out))} --online", highlight=False, soft_wrap=True)
    _report_errors(errors)


def _report_errors(errors: list) -> None:
    for result in errors:
        console.print(f"[red]{result.run_id} failed:[/]\n{result.error}", highlight=False, soft_wrap=True)
    if errors:
        raise typer.Exit(code=1)


def _refuse_store_as_out(out: Path | None) -> None:
    """--out is a report folder: given its runs/ (or a run in it), a suite would be built
    nested inside that store."""
    from loopdiag.store import is_run_dir
    from loopdiag.store._files import SUITE_FILE

    if out is None:
        return
    if (out / SUITE_FILE).is_file():
        store, what = out, f"a run store (it holds {SUITE_FILE})"
    elif is_run_dir(out):
        store, what = out.parent, "a run folder"
    else:
        return
    instead = (f"its report folder: --out {store.parent}"
               if store.name == RUNS_FOLDER and (store / SUITE_FILE).is_file() else "another folder")
    raise bad_input(f"--out {out} is {what}, not a report folder (`loopdiag run` writes its run "
                    f"store in <out>/{RUNS_FOLDER}); pass {instead}")


def _parse_shard(shard: str | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    index, _, count = shard.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise bad_input(f"--shard must be i/n with 0 <= i < n (e.g. 0/4), got {shard!r}")
    return int(index), int(count)


def _jobs_that_fit(spec: ProbeSuite, cells: list[RunSpec], row_length: int, jobs: int, *, chosen: bool) -> int:
    """`jobs`, or fewer where the largest runs would not fit in memory together (refused if
    `chosen` on the command line, or if even one would not fit). Checked on CPU, where
    `MemAvailable` says what is free; a GPU's memory is not known without a context on it."""
    import torch

    from loopdiag.run.memory import available_memory, jobs_that_fit, largest_together, suite_memory, too_large

    available = available_memory()
    if torch.device(spec.train.device).type != "cpu" or available is None:
        return jobs
    estimates = suite_memory(spec, cells, row_length)
    fit = jobs_that_fit(estimates, jobs, available)
    rows = spec.train.batch_size // spec.train.grad_accum_steps
    if fit == 0:
        largest = max(estimates, key=lambda estimate: estimate.total)
        raise bad_input(too_large(largest, available, rows, row_length))
    at_once = min(jobs, len(cells))
    if fit < at_once:
        said = (f"its {at_once} largest runs at once would need at least "
                f"{byte_size(largest_together(estimates, at_once))} and this machine "
                f"has {byte_size(available)} available")
        if chosen:
            raise bad_input(f"--jobs {jobs}: {said}; --jobs {fit} fits")
        console.print(f"{fit} {'run' if fit == 1 else 'runs'} at a time, not {jobs}: {said}",
                      highlight=False, soft_wrap=True)
    return fit


def _refuse_only_outside_suite(only: list[str], spec: ProbeSuite) -> None:
    """Every --only value must name runs of the suite: `loops=1,3` in a suite of K = 1, 4
    would train loops 1 alone without a word. Called once `cell_filter` has accepted them."""
    from loopdiag.run.launch import cell_filter

    planned = {"arch": spec.archs, "loops": spec.loops, "lr": spec.lrs, "seed": spec.seeds}
    cells = spec.cells()
    for condition in only:
        key, _, values = condition.partition("=")
        for value in values.split(","):
            if not any(map(cell_filter([f"{key}={value}"], spec.train.lr), cells)):
                raise bad_input(f"--only {key}={value} matches none of the suite's runs (its {key} values: "
                                f"{', '.join(map(str, planned[key]))})")


def _refuse_stray_data_files(suite: str | None, extra: list[str], data: list[Path] | None) -> None:
    """`--data a.txt b.txt` (often a glob the shell expanded) gives --data one file and the
    next to the suite argument: say how to pass several."""
    suite_is_data = bool(data) and suite is not None and not suite.endswith(".toml") and Path(suite).is_file()
    stray = [suite] * suite_is_data + extra
    if not stray:
        return
    if data:
        raise bad_input(f"unexpected argument(s) {', '.join(stray)}: --data takes one file; repeat it "
                        f"for each file, or quote a glob for loopdiag to expand (--data 'texts/*.txt')")
    raise bad_input(f"unexpected argument(s) {', '.join(stray)}: `loopdiag run` takes one suite")


def _command_line(context: typer.Context) -> str:
    """The `loopdiag` command as given: its arguments and the options set on the command line."""
    words = ["loopdiag", context.info_name]
    for parameter in context.command.params:
        if context.get_parameter_source(parameter.name).name != "COMMANDLINE":
            continue
        values = context.params[parameter.name]
        values = values if isinstance(values, (list, tuple)) else [values]
        if parameter.param_type_name == "argument":
            words += [str(v) for v in values]
        elif parameter.is_flag:
            words.append(parameter.opts[0] if values[0] else parameter.secondary_opts[0])
        else:
            words += [w for v in values for w in (parameter.opts[0], str(v))]
    return shlex.join(words)


def _list_suites() -> None:
    from loopdiag.run.probe_suite import available_suites

    for name, (path, description) in available_suites().items():
        console.print(f"[bold]{name}[/]  {path}\n  {description}", highlight=False, soft_wrap=True)


def _prepare_suite_dir(suite_dir: Path, spec: ProbeSuite, cells: list, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix suites in one folder or to retrain runs by accident. Only this
    invocation's runs are judged (and removed by --overwrite): other shards' stay."""
    from loopdiag.store._files import SUITE_FILE, read_manifest

    if (suite_dir / SUITE_FILE).is_file():
        try:
            stored = read_manifest(suite_dir).get("spec", {})
        except ValueError as error:  # which suite the folder holds is unknown: nothing is removed
            raise bad_input(f"{error}; delete it (this command writes it again), or choose "
                            f"another --out") from None
        changed = [key for key, value in spec.to_dict().items()
                   if key not in ("source", "command") and stored.get(key) != json.loads(json.dumps(value))]
        if changed and overwrite:
            shutil.rmtree(suite_dir)  # another suite altogether: none of its runs stay
            return
        if changed:
            raise bad_input(f"{suite_dir} holds a different suite ({', '.join(changed)} changed); "
                            f"--overwrite replaces it, or choose another --out")
    held = [suite_dir / cell.run_id for cell in cells if (suite_dir / cell.run_id).exists()]
    if held and overwrite:
        for run_dir in held:
            shutil.rmtree(run_dir)
    elif held and not resume:
        raise bad_input(f"{suite_dir} already holds runs of this suite ({held[0].name}, ...): --resume "
                        f"continues them, --overwrite replaces them, or choose another --out")


def _say_which_runs_start_over(suite_dir: Path, cells: list) -> None:
    """Interrupted runs without a checkpoint (killed before their first one) train again from
    step 1: say so, since their records so far are dropped."""
    from loopdiag.run.launch import finished
    from loopdiag.store._files import CHECKPOINT_FILE, CONFIG_FILE

    again = [cell.run_id for cell in cells if (suite_dir / cell.run_id / CONFIG_FILE).is_file()
             and not finished(suite_dir / cell.run_id) and not (suite_dir / cell.run_id / CHECKPOINT_FILE).is_file()]
    if again:
        console.print(f"no checkpoint to resume from, so trained again from step 1: {', '.join(again)}",
                      highlight=False, soft_wrap=True)


def _check_writable(suite_dir: Path) -> None:
    from loopdiag.store.writer import check_writable

    try:
        check_writable(suite_dir)
    except OSError as error:
        raise disk_failure(write_failure(suite_dir, error) or f"cannot write to {suite_dir}: {error}") from None


def _plural(count: int, noun: str) -> str:
    return f" x {count} {noun}s" if count > 1 else ""


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _store(path: Path) -> Path:
    """A run or suite folder as given, or the run store inside a report folder."""
    from loopdiag.store._files import SUITE_FILE

    inner = path / RUNS_FOLDER
    return inner if inner.is_dir() and not (path / SUITE_FILE).is_file() else path


def _report_folder(given: Path, store: Path) -> Path:
    """Where `report` writes by default: the report folder given, or the one around the
    runs/ given (as `loopdiag run` lays them out), else reports/<suite folder's name>."""
    if store != given:
        return given
    return store.parent if store.name == RUNS_FOLDER else Path("reports") / given.name


@app.command()
def analyze(
    path: Annotated[Path, typer.Argument(help="A run folder, a suite folder or a report folder.")],
    expected_loss: Annotated[float | None, typer.Option(
        help="Judge one run again against this loss, what its model should reach (a run judged "
             "without one reads as stable when it trained but ended behind). The stored verdict "
             "is not changed.")] = None,
    reference: Annotated[Path | None, typer.Option(
        help="Judge one run again against another run's final smoothed loss and loss curve (a "
             "finished run folder: the same model with one loop, a baseline). The stored "
             "verdict is not changed.")] = None,
) -> None:
    """Verdicts from a run store: one run explained, or a suite's table."""
    from loopdiag.analysis import explain, run_verdict, suite_table
    from loopdiag.analysis.analyzer import (
        EXPLAINED,
        few_records_text,
        not_judged_text,
        reference_text,
        replayed_verdict,
    )
    from loopdiag.store import is_run_dir, load_run, load_suite

    given = _given_reference(expected_loss, reference, path)
    path = _store(path)
    try:
        if is_run_dir(path):
            run = load_run(path)
            judged = run_verdict(run) if given is None else replayed_verdict(run, given, reference)
            note = (" (judged again from the store; the stored verdict is unchanged)" if given
                    else " (recomputed from the store)" if judged.get("recomputed") else "")
            console.print(f"[bold]{run.run_id}[/]: {judged['status']}{note}")
            for caveat in (not_judged_text(judged), few_records_text(run, judged)):
                if caveat:  # a verdict read from fewer statistics, or records, than the detectors use
                    console.print(caveat, soft_wrap=True, highlight=False)
            if judged["status"] in (*EXPLAINED, "interrupted"):
                console.print(explain(run, judged), soft_wrap=True)
            # what the verdict was judged against, where a reference could change it
            if given or judged["status"] in ("stable", "recovered"):
                console.print(reference_text(run, judged), soft_wrap=True)
            return
        if given is not None:
            raise bad_input(f"--expected-loss and --reference judge one run, and {path} is no run "
                            "folder (a suite judges its runs against its one-loop runs: "
                            "`loopdiag report --rejudge`)")
        table = suite_table(load_suite(path))
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise bad_input(str(error)) from None
    console.print(stability_table(table))


def _say_if_too_few_records(steps: int, log_every: int) -> None:
    """A line before training when each run would record fewer losses than the loss is
    smoothed over: said after the runs, it would come once the compute was spent."""
    from loopdiag.detect.symptoms import EMA_SPAN

    # the first step, every log_every-th, and the last (`LoopRecorder.logs_step`)
    records = len({1, steps, *range(log_every, steps + 1, log_every)})
    if records < EMA_SPAN:
        console.print(f"[yellow]each run records {records} of its {steps} steps (log_every {log_every}), "
                      f"fewer than the {EMA_SPAN} the loss is smoothed over: a stable verdict will be weak "
                      "evidence, and each such run will say so. Lower --log-every or raise --steps to judge "
                      "the runs.[/]", highlight=False, soft_wrap=True)


def _given_reference(expected_loss: float | None, reference: Path | None,
                     judged: Path) -> dict[str, object] | None:
    """The reference `analyze` was given to judge the run at `judged` by (`{"expected_loss":
    ..., "run": ...}`), checked; None when neither option was."""
    from loopdiag.detect.symptoms import validate_loss
    from loopdiag.store import is_run_dir
    from loopdiag.store.reference import finished_final_loss

    if expected_loss is not None and reference is not None:
        raise bad_input("give --expected-loss or --reference, not both")
    if expected_loss is not None:
        try:
            validate_loss(expected_loss, "--expected-loss")
        except ValueError as error:
            raise bad_input(str(error)) from None
        return {"expected_loss": expected_loss}
    if reference is None:
        return None
    if not is_run_dir(reference):
        raise bad_input(f"--reference {reference} is not a run folder")
    if reference.resolve() == judged.resolve():  # judged against itself, any run would end level
        raise bad_input(f"--reference {reference} is the run being judged; give another run (the "
                        "same model with one loop, a baseline)")
    loss = finished_final_loss(reference)
    if loss is None:
        raise bad_input(f"--reference {reference} has no final loss to judge against: it did not "
                        "finish, or its loss is not finite")
    return {"expected_loss": loss, "run": reference.name}


@app.command()
def report(
    suite: Annotated[Path, typer.Argument(help="A report folder (with runs/) or a suite folder.")],
    out: Annotated[Path | None, typer.Option(help="Report folder. Default: the report folder given, "
                                                   "or the one holding the runs/ given; else "
                                                   "reports/ and the suite folder's name.")] = None,
    jobs: Annotated[int, typer.Option(help="Processes building missing columnar copies of the runs' "
                                           "records, and drawing the figures (two at most); 0: one "
                                           "per CPU core (at most 8).")] = 0,
    rejudge: Annotated[bool, typer.Option(
        help="First replay today's detectors over every run's records and rewrite the stored "
             "verdicts and events (after the detectors changed; training is not repeated).")] = False,
    svg: Annotated[bool, typer.Option(help="Also write every figure as SVG (PNG alone by default: "
                                          "an SVG costs as much to write again). Without it, SVGs an "
                                          "earlier report wrote are removed, as they would be stale.")] = False,
) -> None:
    """Regenerate a suite's report from its run store alone.

    Markdown, HTML, figures and table. Runs whose columnar copy (metrics.parquet) is missing
    or stale get one first."""
    if jobs < 0:
        raise bad_input(f"--jobs must be >= 0, got {jobs}")
    store = _store(suite)
    out = out or _report_folder(suite, store)
    jobs = jobs or min(8, len(os.sched_getaffinity(0)))
    with _failed_writes_end_command(out, f"loopdiag report {shlex.quote(str(suite))}"):
        if store.is_dir():
            try:
                unsaved = build_copies(store, jobs).get("unsaved", 0)
            except ValueError as error:  # a corrupt suite.json
                raise bad_input(str(error)) from None
            if unsaved:  # said once per run already: the report's reads would say it again
                warnings.filterwarnings("ignore", message=".* has no columnar copy", category=RunStoreWarning)
        if rejudge:
            _rejudge(store)
        _write_report(store, out, svg, jobs)


def build_copies(store: Path, jobs: int) -> dict[str, int]:
    """Build the columnar copies a suite lacks, with a progress bar on a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from loopdiag.store.columnar import build_columnar, run_dirs

    todo = len(run_dirs(store))
    errors = Console(stderr=True)
    with Progress(TextColumn("columnar copies"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=errors, transient=True,
                  disable=not errors.is_terminal or todo < 2) as progress:
        task = progress.add_task("copies", total=todo)
        counts = build_columnar(store, jobs=jobs, on_run=lambda *_: progress.advance(task))
    built = sum(counts.get(state, 0) for state in ("missing", "stale", "corrupt")) - counts.get("unsaved", 0)
    if built:
        errors.print(f"built the columnar copy (metrics.parquet) of {built} of {todo} runs",
                     highlight=False)
    return counts


def _rejudge(store: Path) -> None:
    from loopdiag.analysis.rejudge import rejudge_suite

    changed = []

    def note(run_id: str, old: str | None, new: str) -> None:
        if old != new:
            changed.append(f"{run_id}: {old} -> {new}")

    try:
        statuses = rejudge_suite(store, on_run=note)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise bad_input(str(error)) from None
    console.print(f"rejudged {len(statuses)} runs; {len(changed)} verdicts changed"
                  + "".join(f"\n  {line}" for line in changed))


def _write_report(store: Path, out: Path, svg: bool, jobs: int = 1) -> Path:
    from loopdiag.analysis import write_report

    command = (f"loopdiag report {shlex.quote(str(store))} --out {shlex.quote(str(out))}"
               + (" --svg" if svg else ""))
    try:
        path = write_report(store, out, command, svg=svg, jobs=jobs)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise bad_input(str(error)) from None
    console.print(f"report: {path} (and {path.with_suffix('.html').name})")
    return path


@app.command()
def compare(
    a: Annotated[str, typer.Argument(help="A run, suite or report folder; or an architecture with --suite.")],
    b: Annotated[str, typer.Argument(help="The same kind as A.")],
    suite: Annotated[Path | None, typer.Option(help="Compare architectures A and B inside this suite.")] = None,
    loops: Annotated[int | None, typer.Option(help="Only runs with this many loops.")] = None,
) -> None:
    """Two runs side by side, two suites cell by cell, or two architectures of one suite.

    Architectures are compared by a paired t-test of final losses over matching runs."""
    from loopdiag.analysis import compare as compare_archs
    from loopdiag.analysis import compare_tables, run_table, suite_table
    from loopdiag.store import is_run_dir, load_suite

    try:
        if suite is not None:
            table = suite_table(load_suite(_store(suite)))
            for arch in (a, b):
                if arch not in set(table["arch"]):
                    raise ValueError(f"{_store(suite)} has no runs of architecture {arch!r}; it has "
                                     f"{', '.join(dict.fromkeys(table['arch']))}")
            counts = sorted(table["n_loops"].unique()) if loops is None else [loops]
            for k in counts:
                try:
                    console.print(f"K={k}: " + compare_archs(table, a, b, n_loops=k).summary(), soft_wrap=True)
                except ValueError as error:
                    console.print(f"K={k}: {error}", soft_wrap=True)
            return
        first, second = _store(Path(a)), _store(Path(b))
        for given in (a, b):
            if not Path(given).exists():
                raise FileNotFoundError(f"{given}: no such run or suite folder")
        if is_run_dir(first) != is_run_dir(second):
            raise ValueError(f"compare two runs or two suites, not one of each ({a}, {b})")
        tables = [run_table(p) if is_run_dir(p) else suite_table(load_suite(p)) for p in (first, second)]
        if loops is not None:
            tables = [t[t["n_loops"] == loops] for t in tables]
        side_by_side = compare_tables(*tables, names=(a, b))
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise bad_input(str(error)) from None
    console.print(side_by_side.to_string(index=False, float_format=lambda v: f"{v:.4g}"), soft_wrap=True)


@app.command("eval")
def eval_(
    path: Annotated[Path, typer.Argument(help="A trained run, or a suite / report folder (every run in it).")],
    loops: Annotated[str, typer.Option(help="Inference loop counts: 1..12, or 1,2,4,8.")] = "1..12",
    data: Annotated[list[Path] | None, typer.Option(
        help="The run's corpus file, if it moved; repeat it for several, or quote a glob.", show_default=False)] = None,
    examples: Annotated[int, typer.Option(help="Held-out task examples for accuracy.")] = 256,
    svg: Annotated[bool, typer.Option(help="Also write the figure as SVG.")] = False,
) -> None:
    """Test-time loop scaling: evaluate trained runs at each inference loop count K'.

    The loss, and exact-match accuracy for a task, at each K'; written to
    loop_scaling.csv in each run's folder and plotted."""
    from loopdiag.analysis import plot_loop_scaling, save_figure
    from loopdiag.data import expand_globs
    from loopdiag.evaluation import loop_scaling, parse_loops
    from loopdiag.store import is_run_dir, load_suite

    store = _store(path)
    try:
        eval_loops = parse_loops(loops)
        if examples < 1:
            raise ValueError(f"--examples must be >= 1, got {examples}")
        corpus_files = expand_globs(data) if data else None
        run_dirs = [store] if is_run_dir(store) else [store / r for r in load_suite(store).runs]
        frames = []
        for run_dir in run_dirs:
            try:
                frames.append(loop_scaling(run_dir, eval_loops, examples=examples, corpus_files=corpus_files))
            except (FileNotFoundError, ValueError) as error:
                if len(run_dirs) == 1:
                    raise
                console.print(f"skipped: {error}", soft_wrap=True)
        if not frames:
            raise ValueError(f"no run in {store} has a checkpoint to evaluate")
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise bad_input(str(error)) from None
    frame = pd.concat(frames, ignore_index=True)
    for metric, rows in frame.groupby("metric", sort=False):
        wide = rows.pivot_table(index="run_id", columns="eval_loops", values="value", sort=False)
        console.print(f"[bold]{metric}[/] by inference loops K' (rows: runs)")
        console.print(wide.to_string(float_format=lambda v: f"{v:.3f}"), soft_wrap=True)
    figure_dir = store if is_run_dir(store) else store.parent if store.name == RUNS_FOLDER else store
    png, *_ = save_figure(plot_loop_scaling(frame), figure_dir / "loop_scaling", svg=svg)
    console.print(f"loop scaling: {png} and loop_scaling.csv in each run folder"
                  + ("" if is_run_dir(store) else "; `loopdiag report` adds it to the report"))


@app.command()
def dashboard(
    suite: Annotated[str, typer.Argument(
        help="A report folder (reports/SUITE, after `loopdiag run`), or a suite name or .toml file.")],
    online: Annotated[bool, typer.Option(
        help="Save the workspace to W&B and print its URL (after `wandb login`).")] = False,
    out: Annotated[Path | None, typer.Option(
        help="Offline: the report folder to write wandb-workspace.json in. Default: the report "
             "folder given, or the one holding the suite folder given; for a suite name or "
             "file, reports/ and the suite's name.")] = None,
    entity: Annotated[str | None, typer.Option(
        help="W&B entity. Default: your default entity online, a placeholder offline.")] = None,
    project: Annotated[str, typer.Option(help="W&B project the runs were logged to.")] = "loopdiag",
) -> None:
    """A W&B workspace for a suite's runs.

    Loss by architecture x K, per-loop residual norm, token correlation and gradient (one line
    per loop), gradient oscillation, the stability table and the alerts. Offline (the default)
    it writes the workspace definition to wandb-workspace.json in the report folder; --online
    saves it to W&B and prints its URL."""
    from loopdiag.store._files import SUITE_FILE, read_manifest

    # a suite's name finds what `loopdiag run` trained under it first (`--quick` renames it)
    trained = Path("reports") / suite
    given = Path(suite) if Path(suite).is_dir() else trained if (trained / RUNS_FOLDER / SUITE_FILE).is_file() else None
    try:
        if given is not None:
            store = _store(given)
            if not (store / SUITE_FILE).is_file():
                raise ValueError(f"{suite} is not a report or suite folder: no {SUITE_FILE}")
            spec = read_manifest(store)["spec"]
            name, max_loops = spec["name"], max(spec["loops"])
            folder = given if store != given else store.parent
        else:
            from loopdiag.run.probe_suite import find_suite, load_probe_suite

            spec = load_probe_suite(find_suite(suite))
            name, max_loops, folder = spec.name, max(spec.loops), Path("reports") / spec.name
    except (OSError, KeyError, ValueError) as error:
        raise bad_input(str(error)) from None
    if online and not _wandb_logged_in():
        raise bad_input("--online needs a W&B login: run `wandb login` or set WANDB_API_KEY")
    try:
        from loopdiag import dashboard as workspaces

        if online and entity is None:
            import wandb

            entity = wandb.Api().default_entity
        workspace = workspaces.suite_workspace(name, max_loops, entity=entity or workspaces.OFFLINE_ENTITY,
                                               project=project)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "wandb_workspaces":
            raise
        raise bad_input("loopdiag dashboard needs wandb-workspaces: pip install 'loopdiag[dashboard]'") from None
    if online:
        workspace.save()
        console.print(f"W&B workspace for {name}: {workspace.url}", highlight=False, soft_wrap=True)
        return
    path = workspaces.write_workspace(workspace, (out or folder) / workspaces.WORKSPACE_FILE)
    console.print(f"W&B workspace for {name} (offline): {path}; once the runs are synced, "
                  f"`loopdiag dashboard {shlex.quote(suite)} --online` saves it to W&B", highlight=False,
                  soft_wrap=True)


def main() -> None:
    app()
