"""Loop diagnostics in a Hugging Face `transformers.Trainer`: `pip install 'loopdiag[hf]'`.

    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[LoopdiagCallback(loop_module="albert.encoder.albert_layer_groups.0")])
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:
    from transformers import (
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )
except ImportError as error:
    raise ImportError("loopdiag.integrations.huggingface needs transformers: "
                      "pip install 'loopdiag[hf]'") from error

from loopdiag.detect.monitor import Monitor
from loopdiag.integrations import log_values
from loopdiag.probes import LoopRecorder
from loopdiag.run.session import RunSession


class LoopdiagCallback(TrainerCallback):
    """Records per-loop statistics of the trained model once per optimizer step.

    module: what to attach to, a dotted path from the Trainer's model or the module itself;
        None for the model. Loops are counted within its forwards.
    loop_module: the module that runs once per loop, a path from `module`, as in
        `loopdiag.attach` (None: `module.loop_out`, our models' hook point).
    monitor: judges every record (default: the default detectors, alerts on the console);
        with `stop_on` set, its stop ends training (`control.should_training_stop`).
    run_dir: when given, the records, events and verdict are also written there as a
        loopdiag run store, with `config` (plus the recorder's settings) as its config.json.
    attach_options: passed to `loopdiag.attach` (stats, log_every, window, ...); the Trainer's
        last step (`state.max_steps`) is recorded whatever `log_every`.

    Gradient statistics are taken in `on_pre_optimizer_step`, the Trainer's only hook
    between the last backward of a step and the optimizer: after gradient accumulation,
    the data-parallel reduction and the Trainer's gradient-norm pass (which unscales fp16
    gradients), but also after it clipped to `max_grad_norm` (1.0 by default). So they
    describe the gradient the optimizer uses: when the clip engages, the gradient norms
    (`grad_norm`, `grad_norm/<group>`, `shared_grad_norm` and its window statistics) are
    the clipped ones, while `grad_cos` and `sign_flip` are unaffected (clipping rescales
    every gradient by one factor) and `update_ratio` measures the actual update either way.
    The Trainer's own pre-clip `grad_norm` stays in its logs. For unclipped norms set
    `max_grad_norm=0`.

    `loss` is the mean over the step's micro-batches of the `loss` the model returns (a
    dict or `ModelOutput`; absent when the model returns none), `lr` the first parameter
    group's learning rate during the step.

    Logs: at each Trainer log (`logging_steps`), the latest record not yet logged is added
    to the logs (`resid_norm/loop_03`, ...; the Trainer's own keys such as `loss` and
    `grad_norm` win) and to `state.log_history`. Reporting integrations (`report_to`) run
    before callbacks passed to the Trainer, so they see these keys only when this callback
    comes first in `trainer.callback_handler.callbacks`.
    """

    def __init__(self, module: str | nn.Module | None = None, loop_module: str | nn.Module | None = None, *,
                 monitor: Monitor | None = None, run_dir: str | Path | None = None,
                 config: Mapping[str, Any] | None = None, **attach_options: Any):
        self.session = RunSession.for_trainer("transformers", module, loop_module, monitor, run_dir, config,
                                              attach_options)
        self._lr: float | None = None
        self._losses: list[Tensor] = []
        self._loss_hook: torch.utils.hooks.RemovableHandle | None = None
        self._logged_step: int | None = None

    @property
    def recorder(self) -> LoopRecorder | None:
        return self.session.recorder

    @property
    def monitor(self) -> Monitor:
        return self.session.monitor

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        main = state.is_world_process_zero
        self.session.start(model, first_step=state.global_step + 1,
                           last_step=state.max_steps if state.max_steps > 0 else None, write=main, judge=main)
        self._remove_loss_hook()  # left by a run that crashed
        self._loss_hook = model.register_forward_hook(self._keep_loss)
        self._losses, self._logged_step = [], None

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        self.recorder.after_backward()
        self._lr = optimizer.param_groups[0]["lr"]

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        loss = torch.stack(self._losses).mean() if self._losses else None
        self._losses = []
        record = self.session.step(state.global_step, loss=loss, lr=self._lr)
        # every process reaches this on the same steps, so the stop is decided together
        if record is not None and self.monitor.stop_on is not None and _any_process(
                self.monitor.should_stop, args.device):
            control.should_training_stop = True

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        record = self.recorder.latest if self.recorder is not None else None
        if logs is None or record is None or record["step"] == self._logged_step:
            return
        self._logged_step = record["step"]
        for key, value in log_values(record).items():
            logs.setdefault(key, value)
            if state.log_history:  # the Trainer appended a copy of `logs` before calling us
                state.log_history[-1].setdefault(key, value)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._remove_loss_hook()
        self.session.close(stopped_by=self.session.stop_reason)

    def _remove_loss_hook(self) -> None:
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None

    def _keep_loss(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.is_grad_enabled() and isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
            self._losses.append(output["loss"].detach())


def _any_process(flag: bool, device: torch.device) -> bool:
    """`flag` or'ed over the data-parallel processes (itself when there is one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    shared = torch.tensor(float(flag), device=device)
    dist.all_reduce(shared, op=dist.ReduceOp.MAX)
    return bool(shared.item())
