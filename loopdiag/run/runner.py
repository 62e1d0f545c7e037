"""Train one cell (architecture, loop count, seed, learning rate) into its own run folder.

A run is: build the model, attach the recorder, train, and on every logged step write the
record to the run store and feed it to the live detectors; at the end write the verdict.
Under torchrun every rank trains the run together (see `loopdiag.train.trainer`) and runs
the detectors on the same combined records; only rank 0 writes files, W&B and alerts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from loopdiag import distributed
from loopdiag.data import SyntheticTask, TokenCorpus
from loopdiag.detect.monitor import AlertSink, Monitor
from loopdiag.models import ModelConfig, build_model
from loopdiag.probes import RecorderCallback
from loopdiag.run.session import RunSession
from loopdiag.store._files import CHECKPOINT_FILE, CONFIG_FILE, read_json_object
from loopdiag.store.reference import recorded_losses
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
    status: str  # stable | collapsed | recovered | diverged | failed_to_train | interrupted
    failure_step: int | None
    signal: str | None
    steps_done: int
    final_loss: float  # mean train loss over the last 10% of steps, as in the report's table
    final_val_loss: float | None
    last_loop_resid_norm: float | None  # mean token ||x_L^(K)|| at the last logged step
    wall_time_s: float


class SessionCallback(TrainCallback):
    """Drives a `RunSession` from `loopdiag.train.train`'s hooks.

    Records take the trainer's own loss, learning rate and pre-clip grad norm (see
    `RecorderCallback`). Each is judged as soon as it exists and written at the end of its
    step, with the validation loss when the step is evaluated. With `write=False` (ranks
    other than 0) it judges and stops alike but writes nothing.
    """

    def __init__(self, session: RunSession, resume: bool = False, write: bool = True):
        self.session, self.resume, self.write = session, resume, write
        self.recording: RecorderCallback | None = None
        self.pending: dict[str, Any] | None = None

    def on_train_start(self, state: TrainState) -> None:
        self.session.start(first_step=state.step + 1, resume=self.resume, write=self.write)
        self.recording = RecorderCallback(self.session.recorder, on_record=self.on_record)
        self.recording.on_train_start(state)

    def on_record(self, record: dict[str, Any]) -> None:
        self.pending = record
        self.session.judge(record)

    def after_backward(self, state: TrainState) -> None:
        self.recording.after_backward(state)

    def after_step(self, state: TrainState) -> None:
        self.recording.after_step(state)
        if self.session.should_stop and not state.should_stop:
            state.should_stop = True
            state.stop_reason = self.session.stop_reason

    def on_eval(self, state: TrainState) -> None:
        self.recording.on_eval(state)
        if self.pending is None:  # a step not logged
            self.pending = {"step": state.step}
        self.pending["val_loss"] = state.val_loss

    def on_step_end(self, state: TrainState) -> None:
        self._write_pending()

    def before_checkpoint(self, state: TrainState) -> None:
        self.recording.before_checkpoint(state)
        self.session.flush()  # a resume restarts from the checkpoint: the logs must reach it

    def on_train_end(self, state: TrainState) -> None:
        if self.recording is not None:
            self.recording.on_train_end(state)
        if self.session.writer is None or self.session.writer.write_error is None:
            self._write_pending()  # after a failed write the store takes nothing more
        self.session.close(finished=not (state.stop_reason or "").startswith("interrupted"),
                           stopped_by=state.stop_reason if state.should_stop else None,
                           steps_done=state.step if state.diverged_step is None else state.step - 1)

    def _write_pending(self) -> None:
        if self.pending is not None:
            self.session.write(self.pending)
        self.pending = None


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


def stored_wandb_id(run_dir: Path) -> str | None:
    """The W&B id an earlier process of the run in `run_dir` logged to, if it logged to W&B."""
    try:
        wandb_id = read_json_object(run_dir / CONFIG_FILE).get("wandb", {}).get("id")
    except (OSError, ValueError, AttributeError):  # no run yet, or a config the writer refuses
        return None
    return wandb_id if isinstance(wandb_id, str) else None


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
    reference: Mapping[str, Any] | None = None,
) -> RunOutcome:
    """Train one cell into `run_dir` on a corpus (next-byte prediction) or a synthetic task
    (loss on the answer bytes). `thresholds` overrides the default detectors' by name
    (`{"loss_spike": {"z": 8}}`) and is recorded under `detectors` in the config.
    `wandb_mode` "offline" or "online" mirrors the run to W&B (one W&B run per training run,
    grouped by `wandb_group`); None keeps it local. Under torchrun every rank calls it with
    the same arguments; `sinks` and W&B are used on rank 0 only. `reference`
    (`store.reference_record`: `run`, `expected_loss`, perhaps `best_known_loss`) names the
    run of the same suite folder whose final smoothed loss this one should reach (the same
    architecture with one loop): the detectors' `expected_loss` and `best_known_loss`,
    recorded under `reference`; its records give them its loss curve (`reference_losses`)."""
    model_config = model_config.with_(n_loops=spec.n_loops)
    train_config = replace(train_config, seed=spec.seed, n_loops=None,
                           lr=train_config.lr if spec.lr is None else spec.lr)
    probes = {"loop_module": "loop_out", "stats": "cheap", "log_every": log_every}
    config = run_config(spec, model_config, train_config, data, probes, thresholds or {})
    if reference is not None:
        config["reference"] = dict(reference)
    main = distributed.is_main()
    sinks = sinks if main else ()
    wandb_run = None
    wandb_id = stored_wandb_id(run_dir) if resume else None
    if wandb_mode is not None and main:
        wandb_run = WandbRun(spec.run_id, config, group=wandb_group, mode=wandb_mode, dir=run_dir.parent,
                             resume_id=wandb_id)
        wandb_id = wandb_run.wandb_id or wandb_id
    if wandb_id is not None:  # kept for a later --resume, and to find the run in W&B
        config["wandb"] = {"id": wandb_id}
    monitor = Monitor(sinks=sinks, stop_on=stop_on, thresholds=thresholds,
                      expected_loss=None if reference is None else reference["expected_loss"],
                      context_free_loss=config["data"]["context_free_loss"],
                      reference_losses=(None if reference is None
                                        else recorded_losses(run_dir.parent / reference["run"])),
                      best_known_loss=None if reference is None else reference.get("best_known_loss"))
    torch.manual_seed(spec.seed)  # the same seed gives the same initial weights
    model = build_model(spec.arch, model_config)
    if isinstance(data, SyntheticTask):
        train_source, val_batches = task_batches(data, train_config)
    else:
        train_source, val_batches = corpus_batches(data, train_config, model_config.seq_len)
    session = RunSession(model, monitor=monitor, run_dir=run_dir, config=config, wandb=wandb_run,
                         log_every=log_every)
    result = train(model, train_source, val_batches, train_config,
                   callbacks=[SessionCallback(session, resume=resume, write=main)],
                   checkpoint_path=run_dir / CHECKPOINT_FILE, resume=resume, on_progress=on_progress)
    summary = session.summary
    last_resid = next((r["resid_norm"][-1] for r in reversed(session.records) if r.get("resid_norm")), None)
    return RunOutcome(
        run_id=spec.run_id, arch=spec.arch, n_loops=spec.n_loops, seed=spec.seed, lr=train_config.lr,
        status=summary["status"], failure_step=summary["step"], signal=summary["signal"],
        steps_done=result.steps_done, final_loss=result.final_loss,
        final_val_loss=result.final_val_loss, last_loop_resid_norm=last_resid,
        wall_time_s=result.wall_time_s,
    )
