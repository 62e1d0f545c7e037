"""Train one cell (architecture, loop count, seed, learning rate) into its own run folder.

A run is: build the model, attach the recorder, train, and on every logged step write the
record to the run store and feed it to the live detectors; at the end write the verdict.
Under torchrun every rank trains the run together (see `loopdiag.train.trainer`) and runs
the detectors on the same combined records; only rank 0 writes files, W&B and alerts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from loopdiag import distributed
from loopdiag.data import SyntheticTask, TokenCorpus
from loopdiag.detect import verdict
from loopdiag.models import ModelConfig, build_model
from loopdiag.detect.monitor import AlertSink, EventLogSink, Monitor
from loopdiag.probes import RecorderCallback, attach
from loopdiag.store import RunWriter, read_records
from loopdiag.train import (
    TrainCallback,
    TrainConfig,
    TrainState,
    corpus_batches,
    task_batches,
    train,
)
from loopdiag.run.wandb_logging import WandbRun


@dataclass(frozen=True)
class RunSpec:
    arch: str
    n_loops: int
    seed: int = 0
    lr: float | None = None  # None: the training config's

    @property
    def run_id(self) -> str:
        lr = "" if self.lr is None else f"-lr{self.lr:g}"
        return f"{self.arch}-k{self.n_loops:02d}-s{self.seed}{lr}"


@dataclass
class RunOutcome:
    run_id: str
    arch: str
    n_loops: int
    seed: int
    lr: float
    status: str  # stable | collapsed | diverged | failed_to_train | interrupted
    failure_step: int | None
    signal: str | None
    steps_done: int
    final_train_loss: float
    final_val_loss: float | None
    last_loop_resid_norm: float | None  # mean token ||x_L^(K)|| at the last logged step
    wall_time_s: float


class RunLogger(TrainCallback):
    """Writes one run folder and runs the live detectors on each record.

    Records arrive from the recorder after the optimizer step, before evaluation; each is
    written at the end of its step, with the validation loss when the step is evaluated.
    Detectors see a record as soon as it exists. Must come after the
    `RecorderCallback` in `callbacks`. With `write=False` (ranks other than 0) it judges
    and stops alike but writes nothing.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], monitor: Monitor, resume: bool = False,
                 wandb_run: WandbRun | None = None, write: bool = True):
        self.run_dir, self.config, self.monitor, self.resume = run_dir, config, monitor, resume
        self.wandb_run, self.write = wandb_run, write
        self.writer: RunWriter | None = None
        self.pending: dict[str, Any] | None = None
        self.records: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None

    def on_train_start(self, state: TrainState) -> None:
        if self.write:
            self.writer = RunWriter(self.run_dir, self.config, resume=self.resume,
                                    resume_step=state.step if self.resume else None)
            self.monitor.sinks.insert(0, EventLogSink(self.writer))
        if state.step:  # resumed: restore the detectors' state from what the store kept
            # (steps past the checkpoint are dropped here too: rank 0 may not have yet)
            self.records = [r for r in read_records(self.run_dir) if r["step"] <= state.step]
            for record in self.records:
                self.monitor.restore(record)

    def on_record(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.pending = record
        self.monitor.update(record)

    def after_step(self, state: TrainState) -> None:
        if self.monitor.should_stop and not state.should_stop:
            event = self.monitor.stop_event
            state.should_stop = True
            state.stop_reason = f"{event.detector} ({event.severity}) at step {event.step}: {event.message}"

    def on_eval(self, state: TrainState) -> None:
        if self.pending is None:  # a step not logged
            self.pending = {"step": state.step}
        self.pending["val_loss"] = state.val_loss

    def on_step_end(self, state: TrainState) -> None:
        self._write_pending()

    def before_checkpoint(self, state: TrainState) -> None:
        if self.writer is not None:  # a resume restarts from the checkpoint: the logs must reach it
            self.writer.flush()

    def on_train_end(self, state: TrainState) -> None:
        self._write_pending()
        interrupted = (state.stop_reason or "").startswith("interrupted")
        if not interrupted and not state.should_stop:
            self.monitor.finish()  # the end-of-run judgements (a run stopped early has none)
        self.summary = {
            **verdict(self.records, self.monitor.events, finished=not interrupted),
            "steps_done": state.step if state.diverged_step is None else state.step - 1,
            "stopped_by": state.stop_reason if state.should_stop else None,
            "not_judged": sorted(self.monitor.not_judged()),
        }
        if interrupted:
            self.summary["status"] = "interrupted"
        if self.writer is not None:
            self.writer.close(self.summary)
        if self.wandb_run is not None:
            self.wandb_run.finish(self.summary)

    def _write_pending(self) -> None:
        if self.pending is not None and self.writer is not None:
            self.writer.log(self.pending)
            if self.wandb_run is not None:
                self.wandb_run.log_record(self.pending)
        self.pending = None  # a rank that writes nothing drops it too


def run_config(spec: RunSpec, model_config: ModelConfig, train_config: TrainConfig,
               data: TokenCorpus | SyntheticTask, probes: dict[str, Any],
               detectors: dict[str, Any]) -> dict[str, Any]:
    """The fully resolved configuration a run folder records (see `loopdiag.store`)."""
    return {
        "cell": {"arch": spec.arch, "n_loops": spec.n_loops, "seed": spec.seed, "lr": train_config.lr},
        "model": model_config.to_dict(),
        "train": asdict(train_config),
        "data": data.describe(),
        "probes": probes,
        "detectors": detectors,
    }


def run_one(
    spec: RunSpec,
    model_config: ModelConfig,
    train_config: TrainConfig,
    data: TokenCorpus | SyntheticTask,
    run_dir: Path,
    *,
    log_every: int = 1,
    thresholds: dict[str, Any] | None = None,
    sinks: Sequence[AlertSink] = (),
    stop_on: str | None = None,
    resume: bool = False,
    wandb_mode: str | None = None,
    wandb_group: str | None = None,
    on_progress: Callable[[int, int, dict], None] | None = None,
    reference: tuple[str, float] | None = None,
) -> RunOutcome:
    """Train one cell into `run_dir` on a corpus (next-byte prediction) or a synthetic task
    (loss on the answer bytes). `thresholds` overrides the default detectors' by name
    (`{"loss_spike": {"z": 8}}`) and is recorded under `detectors` in the config.
    `wandb_mode` "offline" or "online" mirrors the run to W&B (one W&B run per training run,
    grouped by `wandb_group`); None keeps it local. Under torchrun every rank calls it with
    the same arguments; `sinks` and W&B are used on rank 0 only. `reference` (run id, loss)
    names the run whose final smoothed loss this one should reach (the same architecture
    with one loop): the detectors' `expected_loss`, recorded under `reference`."""
    model_config = model_config.with_(n_loops=spec.n_loops)
    train_config = replace(train_config, seed=spec.seed, n_loops=None,
                           lr=train_config.lr if spec.lr is None else spec.lr)
    probes = {"loop_module": "loop_out", "stats": "cheap", "log_every": log_every}
    config = run_config(spec, model_config, train_config, data, probes, thresholds or {})
    if reference is not None:
        config["reference"] = {"run": reference[0], "expected_loss": reference[1]}
    main = distributed.is_main()
    sinks = sinks if main else ()
    wandb_run = None
    if wandb_mode is not None and main:
        wandb_run = WandbRun(spec.run_id, config, group=wandb_group, mode=wandb_mode, dir=run_dir.parent)
        sinks = [*sinks, wandb_run]
    monitor = Monitor(sinks=sinks, stop_on=stop_on, thresholds=thresholds,
                      expected_loss=None if reference is None else reference[1])
    torch.manual_seed(spec.seed)  # the same seed gives the same initial weights
    model = build_model(spec.arch, model_config)
    if isinstance(data, SyntheticTask):
        train_source, val_batches = task_batches(data, train_config)
    else:
        train_source, val_batches = corpus_batches(data, train_config, model_config.seq_len)
    logger = RunLogger(run_dir, config, monitor, resume=resume, wandb_run=wandb_run, write=main)
    with attach(model, log_every=log_every) as recorder:
        result = train(
            model, train_source, val_batches, train_config,
            callbacks=[RecorderCallback(recorder, on_record=logger.on_record), logger],
            checkpoint_path=run_dir / "checkpoint.pt", resume=resume, on_progress=on_progress,
        )
    summary = logger.summary
    last_resid = next((r["resid_norm"][-1] for r in reversed(logger.records) if r.get("resid_norm")), None)
    return RunOutcome(
        run_id=spec.run_id, arch=spec.arch, n_loops=spec.n_loops, seed=spec.seed, lr=train_config.lr,
        status=summary["status"], failure_step=summary["step"], signal=summary["signal"],
        steps_done=result.steps_done, final_train_loss=result.final_train_loss,
        final_val_loss=result.final_val_loss, last_loop_resid_norm=last_resid,
        wall_time_s=result.wall_time_s,
    )
