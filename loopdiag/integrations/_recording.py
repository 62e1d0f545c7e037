"""What the trainer callbacks share: a recorder on the trained model, the `Monitor` that
judges its records, and an optional run store. No trainer library is imported here."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from loopdiag.detect import verdict
from loopdiag.detect.monitor import ConsoleSink, Monitor
from loopdiag.probes import LoopRecorder, Record, attach, flatten_record
from loopdiag.store import RunWriter


class TrainerRecording:
    """One training run seen through a trainer's hooks.

    The callback calls `start` when training starts, `recorder.after_backward()` once per
    optimizer step where the gradients are final, `finish_step` after the optimizer step
    and `close` at the end. Under data parallelism alerts and files come from the main
    process only (`main_process` at `start`); the callback shares its stop decision.
    """

    def __init__(self, trainer: str, module: str | nn.Module | None, loop_module: str | nn.Module | None,
                 monitor: Monitor | None, run_dir: str | Path | None, config: Mapping[str, Any] | None,
                 attach_options: Mapping[str, Any]):
        options = [name for name, parameter in inspect.signature(attach).parameters.items()
                   if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
        unknown = sorted(set(attach_options) - set(options))
        if unknown:
            raise TypeError(f"unknown option(s) for loopdiag.attach: {', '.join(unknown)}; "
                            f"valid: {', '.join(options)}")
        self.module, self.loop_module = module, loop_module
        self.monitor = monitor if monitor is not None else Monitor(sinks=[ConsoleSink()])
        self.run_dir = run_dir
        self.config = {**(config or {}), "recorder": {
            "trainer": trainer, "module": _describe(module), "loop_module": _describe(loop_module),
            **{key: value for key, value in attach_options.items() if key != "shared_params"}}}
        self.attach_options = dict(attach_options)
        self.recorder: LoopRecorder | None = None
        self.writer: RunWriter | None = None
        self.main_process = True
        self._warned_no_loops = False

    def start(self, root: nn.Module, next_step: int, *, main_process: bool) -> None:
        """Attach to `module` of the trainer's model `root`; `next_step` is the first step to run.
        A run left open by a crash (a trainer without an exception hook) is closed first."""
        self.close(finished=False)
        self.recorder = attach(_submodule(root, self.module), self.loop_module, **self.attach_options)
        self.recorder.begin_step(next_step)
        self.main_process = main_process
        if self.run_dir is not None and main_process:
            self.writer = RunWriter(self.run_dir, self.config)

    def finish_step(self, step: int, *, loss: Tensor | float | None, lr: float | None) -> Record | None:
        """Close `step`; on a logged step judge, store and return its record."""
        record = self.recorder.end_step(step, loss=loss, lr=lr)
        if record is None:
            return None
        if not record.get("n_loops") and not self._warned_no_loops:
            self._warned_no_loops = True
            warnings.warn(f"step {step} ran no loop of the recorded module: if the training step calls a "
                          "submodule directly rather than the model, pass that submodule as module=",
                          stacklevel=3)
        if self.main_process:
            events = self.monitor.update(record)
            if self.writer is not None:
                self.writer.log(record)
                for event in events:
                    self.writer.event(event.to_dict())
        return record

    def close(self, *, finished: bool) -> None:
        """Remove the hooks (the records stay) and write the verdict; safe to call twice."""
        if self.recorder is not None and self.recorder.attached:
            self.recorder.detach()
        if self.writer is not None:
            if finished:
                for event in self.monitor.finish():
                    self.writer.event(event.to_dict())
            stop = self.monitor.stop_event
            summary = {**verdict(self.recorder.records, self.monitor.events, finished=finished),
                       "not_judged": sorted(self.monitor.not_judged()),
                       "stopped_by": None if stop is None else
                       f"{stop.detector} ({stop.severity}) at step {stop.step}: {stop.message}"}
            self.writer.close(summary)
            self.writer = None


def log_values(record: Record) -> dict[str, float]:
    """The record as a trainer logger takes it: per-loop lists as `resid_norm/loop_03`, ...;
    `step` left out, since loggers take the step separately."""
    return {key: value for key, value in flatten_record(record).items() if key != "step"}


def _submodule(root: nn.Module, module: str | nn.Module | None) -> nn.Module:
    if module is None:
        return root
    if isinstance(module, nn.Module):
        return module
    try:
        return root.get_submodule(module)
    except AttributeError:
        children = ", ".join(name for name, _ in root.named_children()) or "none"
        raise ValueError(f"{type(root).__name__} has no submodule {module!r} to record; "
                         f"its children: {children}") from None


def _describe(module: str | nn.Module | None) -> str | None:
    return type(module).__name__ if isinstance(module, nn.Module) else module
