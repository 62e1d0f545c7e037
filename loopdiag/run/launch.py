"""Run a probe suite's cells into a suite folder, one after another or in worker processes.

Every cell trains into `<suite_dir>/<run_id>/` through `run_one`; with `[eval]` loops the
trained checkpoint is then evaluated at each K'. Workers send what the terminal shows
(progress, detector events) as messages; the run store is written by the worker that
trains the run, so nothing depends on the parent staying alive. A cell starts only once the
cells of this invocation it may take its reference from (`reference_candidate`: one-loop
runs of its architecture and seed at its learning rate or a lower one) have finished, and,
for a looped cell, every one-loop run of its architecture and seed (`best_known_candidate`),
so its verdict does not depend on how many train at once; cells of another shard or left out
by `--only` are not waited for.

Under torchrun all ranks train each cell together, one cell after another (no workers);
rank 0 writes the suite manifest and runs the loop-scaling evaluation, and a cell that
fails ends the suite (the other ranks cannot go on alone; `--resume` continues it).
"""

from __future__ import annotations

import _thread
import contextlib
import json
import math
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from loopdiag import distributed
from loopdiag.evaluation import loop_scaling
from loopdiag.models import ARCHITECTURES
from loopdiag.run.runner import RunOutcome, RunSpec, run_one
from loopdiag.store import write_suite_manifest
from loopdiag.store._files import CHECKPOINT_FILE, LOOP_SCALING_FILE, SUMMARY_FILE
from loopdiag.store.reference import best_known_candidate, reference_candidate, reference_record
from loopdiag.run.probe_suite import ProbeSuite
from loopdiag.run.wandb_logging import forget_outage
from loopdiag.store.writer import write_failure

# (kind, run_id, payload): "start" {}, "progress" {step, total, loss}, "event" {event dict},
# "eval" {}, "done" {status}.
Message = tuple[str, str, dict[str, Any]]
Send = Callable[[Message], None]


@dataclass(frozen=True)
class CellJob:
    spec: RunSpec
    suite: ProbeSuite
    run_dir: Path
    train: bool  # False: the run finished before (resume); only a missing evaluation runs
    resume: bool
    wandb_mode: str | None
    threads: int | None  # torch threads in a worker process; None leaves them as they are


@dataclass
class CellResult:
    run_id: str
    trained: bool
    outcome: RunOutcome | None = None
    error: str | None = None  # the worker's traceback
    write_failure: str | None = None  # a disk that took no more writes stopped the run (one line)


def shard_cells(cells: list[RunSpec], shard: tuple[int, int]) -> list[RunSpec]:
    """Shard `index` of `count`: every count-th cell from the index-th, so each shard gets
    a like mix of cheap and costly cells and the split depends only on the suite."""
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {index}/{count}")
    return cells[index::count]


CELL_KEYS = {"arch": str, "loops": int, "lr": float, "seed": int}


def cell_filter(conditions: list[str], default_lr: float) -> Callable[[RunSpec], bool]:
    """`KEY=V1,V2` conditions (`loopdiag run --only`) as a predicate on run specs: every
    condition must hold; a run without its own lr has `default_lr`."""
    wanted: dict[str, set] = {}
    for condition in conditions:
        key, _, values = condition.partition("=")
        if key not in CELL_KEYS or not values:
            raise ValueError(f"--only takes KEY=V1,V2 with KEY one of {', '.join(CELL_KEYS)}; got {condition!r}")
        if key in wanted:  # a second one would replace the first's values
            raise ValueError(f"--only {key} is given twice; list its values in one: --only {key}=V1,V2")
        try:
            wanted[key] = {CELL_KEYS[key](value) for value in values.split(",")}
        except ValueError:
            raise ValueError(f"--only {key}: {values!r} are not {CELL_KEYS[key].__name__}s") from None

    def accepts(cell: RunSpec) -> bool:
        lr = default_lr if cell.lr is None else cell.lr
        return (cell.arch in wanted.get("arch", {cell.arch}) and cell.n_loops in wanted.get("loops", {cell.n_loops})
                and cell.seed in wanted.get("seed", {cell.seed})
                and any(math.isclose(lr, x) for x in wanted.get("lr", {lr})))
    return accepts


def run_suite(suite: ProbeSuite, suite_dir: Path, *, jobs: int = 1, resume: bool = False,
              wandb_mode: str | None = None, shard: tuple[int, int] = (0, 1),
              only: Callable[[RunSpec], bool] | None = None,
              on_message: Send | None = None) -> list[CellResult]:
    """Train the cells of `suite` (those of `shard` i/n, and of them those `only` accepts)
    into `suite_dir`; `jobs` > 1 trains
    that many at once in worker processes (torch threads split between them). With
    `resume`, finished runs are kept, interrupted ones continue from their checkpoint. A
    cell that raises is reported in its `CellResult` and the others go on. Shards of one
    suite may share `suite_dir`: `suite.json` lists every cell of the suite. A run whose
    writes fail (`write_failure`: a full disk) stops there, cleanly, and no further cell
    starts: the results then cover only the cells started, and `resume` finishes the rest."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    every_cell = suite.cells()
    specs = [spec for spec in shard_cells(every_cell, shard) if only is None or only(spec)]
    if distributed.is_main():
        write_suite_manifest(suite_dir, suite.to_dict(), {
            spec.run_id: _spec_cell(spec, suite) for spec in every_cell})
        if wandb_mode == "online":
            forget_outage(suite_dir)  # an outage learned by an earlier invocation may be over
    send = on_message or (lambda message: None)
    jobs = 1 if distributed.world_size() > 1 else max(1, min(jobs, len(specs)))
    threads = max(1, cpu_count() // jobs) if jobs > 1 else None
    # Seed by seed, cheap loop counts first: a suite stopped early has whole seeds of every
    # architecture rather than every seed of the first few.
    specs = sorted(specs, key=lambda spec: (spec.seed, spec.n_loops, spec.lr or 0.0))
    cells = [_job(spec, suite, suite_dir, resume, wandb_mode, threads) for spec in specs]
    with _sigterm_as_interrupt():
        if jobs == 1:
            results = []
            for cell in cells:
                results.append(_run_cell(cell, send))
                if results[-1].write_failure:  # the next runs would meet the same disk
                    break
        else:
            results = _run_in_workers(cells, jobs, send)
    order = {spec.run_id: index for index, spec in enumerate(every_cell)}
    return sorted(results, key=lambda result: order[result.run_id])


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a job scheduler's time limit, `kill`) ends the suite as Ctrl-C does: the
    runs under way stop at the end of a step with a checkpoint (`train`), and no other
    starts. Not under torchrun, whose ranks stop as its launcher decides."""
    handler = signal.getsignal(signal.SIGTERM)
    if (distributed.world_size() > 1 or handler in (signal.SIG_IGN, None)
            or threading.current_thread() is not threading.main_thread()):
        yield
        return
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, handler)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _job(spec: RunSpec, suite: ProbeSuite, suite_dir: Path, resume: bool, wandb_mode: str | None,
         threads: int | None) -> CellJob:
    run_dir = suite_dir / spec.run_id
    done = resume and finished(run_dir)
    return CellJob(spec, suite, run_dir, train=not done, resume=resume, wandb_mode=wandb_mode,
                   threads=threads)


def finished(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run that ended (a verdict other than interrupted)."""
    summary = run_dir / SUMMARY_FILE
    return summary.is_file() and json.loads(summary.read_text()).get("status") != "interrupted"


def _run_cell(job: CellJob, send: Send) -> CellResult:
    run_id, suite = job.spec.run_id, job.suite
    try:
        if job.threads is not None:
            torch.set_num_threads(job.threads)
        outcome = None
        if job.train:
            send(("start", run_id, {}))
            outcome = run_one(
                job.spec, suite.model, suite.train, suite.data.load(), job.run_dir,
                log_every=suite.log_every, thresholds=suite.thresholds,
                sinks=[_MessageSink(send, run_id)],
                stop_on="critical" if suite.stop_on_collapse else None, resume=job.resume,
                reference=reference_record(job.run_dir.parent, _spec_cell(job.spec, suite)),
                wandb_mode=job.wandb_mode, wandb_group=suite.name,
                on_progress=lambda step, total, metrics: send(
                    ("progress", run_id, {"step": step, "total": total,
                                          "loss": metrics.get("train_loss")})),
            )
        evaluated = (job.run_dir / LOOP_SCALING_FILE).is_file() and not job.train
        looped = not ARCHITECTURES[job.spec.arch].fixed_depth
        if (suite.eval_loops and not evaluated and distributed.is_main()
                and (job.run_dir / CHECKPOINT_FILE).is_file()):
            send(("eval", run_id, {}))
            # a fixed-depth model runs at its own depth only: the control beside the loops
            eval_loops = list(suite.eval_loops) if looped else [job.spec.n_loops]
            loop_scaling(job.run_dir, eval_loops, examples=suite.eval_examples)
        send(("done", run_id, {"status": outcome.status if outcome else "kept"}))
        return CellResult(run_id, trained=job.train, outcome=outcome)
    except Exception as error:  # noqa: BLE001 - one broken cell must not lose the others
        if distributed.world_size() > 1:
            raise
        failed_write = write_failure(job.run_dir, error)
        if failed_write:
            send(("done", run_id, {"status": "interrupted"}))
            return CellResult(run_id, trained=job.train, write_failure=failed_write)
        send(("done", run_id, {"status": "error"}))
        return CellResult(run_id, trained=job.train, error=traceback.format_exc())


class _MessageSink:
    """Detector events as messages (the worker's only way to the terminal)."""

    def __init__(self, send: Send, run_id: str):
        self.send, self.run_id = send, run_id

    def emit(self, event: Any) -> None:
        self.send(("event", self.run_id, event.to_dict()))


_worker_queue: Any = None
_parent_gone = threading.Event()
PARENT_GONE_GRACE_S = 30.0  # for the interrupted run to flush its logs before the worker exits


def _init_worker(message_queue: Any, stop: Any) -> None:
    global _worker_queue
    _worker_queue = message_queue
    # `_stop_with_parent` interrupts the run with a simulated SIGINT, which Python drops when
    # SIGINT is ignored, as it is for a command started in the background by a shell.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    warnings.showwarning = _warning_line
    threading.Thread(target=_stop_with_parent, daemon=True).start()
    threading.Thread(target=_stop_when_asked, args=(stop,), daemon=True).start()


def _stop_when_asked(stop: Any) -> None:
    """The parent was told to stop (a SIGTERM only it received): end the run under way as a
    SIGTERM of its own would. Repeated, since one that lands outside training (where SIGTERM
    is not handled) is dropped, and the next run must not start unseen."""
    stop.wait()
    while True:
        _thread.interrupt_main(signal.SIGTERM)
        time.sleep(1.0)


def _warning_line(message: Warning | str, *_: object, **__: object) -> None:
    """A worker's warning as the command prints its own: one line, without Python's file,
    line and source line, which tell a user nothing."""
    sys.stderr.write(f"warning: {message}\n")


def _stop_with_parent() -> None:
    """A worker outliving its parent (killed, crashed) would train on unseen, possibly into a
    run a resumed suite trains too: interrupt the run in progress, which then writes its
    logs and an "interrupted" summary, and leave."""
    multiprocessing.parent_process().join()
    _parent_gone.set()
    _thread.interrupt_main()
    time.sleep(PARENT_GONE_GRACE_S)
    os._exit(1)


def _run_cell_in_worker(job: CellJob) -> CellResult:
    if _parent_gone.is_set():  # the executor hands out what it had queued: take none of it
        os._exit(1)
    return _run_cell(job, _worker_queue.put)


def _run_in_workers(cells: list[CellJob], jobs: int, send: Send) -> list[CellResult]:
    # spawn, not fork: torch's thread pools and W&B's service do not survive a fork.
    context = multiprocessing.get_context("spawn")
    messages, stop = context.Queue(), context.Event()
    results: dict[str, CellResult] = {}
    waiting = list(cells)
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                             initargs=(messages, stop)) as pool:
        pending: dict[Any, CellJob] = {}

        def start_ready() -> None:
            # In suite order, each free worker takes the first cell whose possible references
            # have all finished, so a run is judged against the same one however many train.
            while waiting and len(pending) < jobs:
                unfinished = [*waiting, *pending.values()]
                ready = next((cell for cell in waiting if not _waits_for(cell, unfinished)), None)
                if ready is None:
                    return
                waiting.remove(ready)
                pending[pool.submit(_run_cell_in_worker, ready)] = ready

        start_ready()
        try:
            while pending:
                _drain(messages, send, timeout=0.2)
                done, _ = wait(pending, timeout=0, return_when=FIRST_COMPLETED)
                for future in done:
                    cell = pending.pop(future)
                    if future.cancelled():
                        continue
                    try:
                        results[cell.spec.run_id] = future.result()
                        if results[cell.spec.run_id].write_failure:  # the next runs would meet the same disk
                            waiting.clear()
                            for queued in pending:
                                queued.cancel()
                    except Exception as error:  # noqa: BLE001 - a worker died (killed, out of memory)
                        results[cell.spec.run_id] = CellResult(
                            cell.spec.run_id, trained=cell.train, error=f"worker process failed: {error!r}")
                start_ready()
        except KeyboardInterrupt:
            stop.set()  # Ctrl-C reached the workers too; a SIGTERM reached this process alone
            pool.shutdown(wait=True, cancel_futures=True)  # workers record "interrupted"
            raise
        _drain(messages, send, timeout=0.2)
    return [results[cell.spec.run_id] for cell in cells if cell.spec.run_id in results]


def _waits_for(job: CellJob, unfinished: list[CellJob]) -> bool:
    """Whether a cell still to train or running could be `job`'s reference, or its model's
    best known loss (`reference_record`)."""
    cell = _spec_cell(job.spec, job.suite)

    def informs(other: CellJob) -> bool:
        other_cell = _spec_cell(other.spec, other.suite)
        return reference_candidate(other_cell, cell) or best_known_candidate(other_cell, cell)

    return job.train and any(other.train and informs(other) for other in unfinished)


def _spec_cell(spec: RunSpec, suite: ProbeSuite) -> dict[str, Any]:
    """The cell as the suite manifest records it."""
    return {"arch": spec.arch, "n_loops": spec.n_loops, "seed": spec.seed,
            "lr": suite.train.lr if spec.lr is None else spec.lr}


def _drain(messages: Any, send: Send, timeout: float) -> None:
    try:
        send(messages.get(timeout=timeout))
        while True:
            send(messages.get_nowait())
    except queue.Empty:
        pass


def cpu_count() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
