"""Loop diagnostics in a Lightning `Trainer`: `pip install 'loopdiag[lightning]'`.

    trainer = Trainer(callbacks=[LoopdiagCallback(module="model", monitor=Monitor(stop_on="critical"))])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as error:
    raise ImportError("loopdiag.integrations.lightning needs Lightning: "
                      "pip install 'loopdiag[lightning]'") from error

from loopdiag.detect.monitor import Monitor
from loopdiag.integrations import log_values
from loopdiag.probes import LoopRecorder
from loopdiag.run.session import RunSession


class LoopdiagCallback(Callback):
    """Records per-loop statistics of the trained model once per optimizer step.

    module: what to attach to, a dotted path from the LightningModule or the module itself;
        None for the LightningModule. It must be the module whose forward the training step
        calls: loops are counted within its forwards (`training_step` calling `self.model(x)`
        needs module="model").
    loop_module: the module that runs once per loop, a path from `module`, as in
        `loopdiag.attach` (None: `module.loop_out`, our models' hook point).
    monitor: judges every record (default: the default detectors, alerts on the console);
        with `stop_on` set, its stop ends training (`trainer.should_stop`).
    run_dir: when given, the records, events and verdict are also written there as a
        loopdiag run store, with `config` (plus the recorder's settings) as its config.json.
    attach_options: passed to `loopdiag.attach` (stats, log_every, window, ...).

    Gradient statistics are taken in `on_before_optimizer_step`: once per optimizer step,
    after the last micro-batch of gradient accumulation has run its backward and AMP has
    unscaled the gradients, and before Lightning clips them. They describe the accumulated,
    unclipped gradient the step starts from; the forwards of all the step's micro-batches
    are averaged into its per-loop values. `loss` is the mean of the step's micro-batch
    losses, `lr` that of the first parameter group.

    Each record goes to every logger of the trainer (`logger.log_metrics`) at the optimizer
    step's number (`trainer.global_step`), as `resid_norm/loop_03`, `grad_cos`, ...: every
    step the recorder logs (attach's `log_every`, and the last of `trainer.estimated_stepping_batches`),
    whatever `Trainer(log_every_n_steps=)`.
    The recorder stays readable as `callback.recorder` after training.
    """

    def __init__(self, module: str | nn.Module | None = None, loop_module: str | nn.Module | None = None, *,
                 monitor: Monitor | None = None, run_dir: str | Path | None = None,
                 config: Mapping[str, Any] | None = None, **attach_options: Any):
        self.session = RunSession.for_trainer("lightning", module, loop_module, monitor, run_dir, config,
                                              attach_options)
        self._lr: float | None = None
        self._losses: list[Tensor] = []
        self._stepped = False

    @property
    def recorder(self) -> LoopRecorder | None:
        return self.session.recorder

    @property
    def monitor(self) -> Monitor:
        return self.session.monitor

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        main = trainer.is_global_zero
        total = trainer.estimated_stepping_batches  # optimizer steps; inf for an endless run
        last_step = int(total) if math.isfinite(total) and total > 0 else None
        self.session.start(pl_module, first_step=trainer.global_step + 1, last_step=last_step,
                           write=main, judge=main)
        self._losses, self._stepped = [], False

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._stepped:  # manual optimization may step several optimizers per batch
            return
        self._stepped = True
        self.recorder.after_backward()
        self._lr = optimizer.param_groups[0]["lr"]

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            # automatic optimization hands back the loss divided by accumulate_grad_batches
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            self._losses.append(loss.detach() * scale)
        if not self._stepped:  # a micro-batch that only accumulated
            return
        mean_loss = torch.stack(self._losses).mean() if self._losses else None
        self._losses, self._stepped = [], False
        record = self.session.step(trainer.global_step, loss=mean_loss, lr=self._lr)
        if record is None:
            return
        for logger in trainer.loggers:
            logger.log_metrics(log_values(record), step=record["step"])
        # every process reaches this on the same steps, so the stop is decided together
        if self.monitor.stop_on is not None and trainer.strategy.reduce_boolean_decision(
                self.monitor.should_stop, all=False):
            trainer.should_stop = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.session.close(stopped_by=self.session.stop_reason)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.session.close(finished=False, stopped_by=self.session.stop_reason)
