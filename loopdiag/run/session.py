"""One training run, wired: a recorder on the model, the `Monitor` that judges each record,
the run store and W&B that keep it, and the verdict at the end.

Every run goes through a `RunSession`: the CLI's (`loopdiag.run.runner`), the Lightning and
Hugging Face callbacks (`loopdiag.integrations`) and a training loop of your own:

    with loopdiag.RunSession(model, run_dir="runs/mine") as run:
        for step in range(1, steps + 1):
            loss = model(x, y).loss
            loss.backward()
            run.after_backward()                   # gradient statistics, before clipping
            optimizer.step(); optimizer.zero_grad()
            run.step(step, loss=loss, lr=optimizer.param_groups[0]["lr"])
            if run.should_stop:
                break
    run.summary                                    # the verdict, also in runs/mine/summary.json
"""

from __future__ import annotations

import atexit
import inspect
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from loopdiag.detect import Event, verdict
from loopdiag.detect.base import is_int
from loopdiag.detect.monitor import AlertSink, ConsoleSink, EventLogSink, Monitor
from loopdiag.probes import LoopRecorder, Record, attach
from loopdiag.probes.recorder import caller_stacklevel
from loopdiag.run.wandb_logging import WandbRun
from loopdiag.store import RunWriter, read_records

ATTACH_OPTIONS = tuple(name for name, parameter in inspect.signature(attach).parameters.items()
                       if parameter.kind is inspect.Parameter.KEYWORD_ONLY)


def stop_message(event: Event) -> str:
    """Why a run stopped, as `stopped_by` in its summary."""
    return f"{event.detector} ({event.severity}) at step {event.step}: {event.message}"


class RunSession:
    """Attaches a `LoopRecorder` to `module`, judges its records with `monitor`, writes them
    to a run store at `run_dir` and to `wandb` when given, and writes the verdict at `close`.

    module: the module to record, or (for a trainer callback) a dotted path resolved
        against the model handed to `start`; None records that model itself.
    loop_module: the module that runs once per loop, as in `loopdiag.attach`.
    monitor: judges every record (default: the default detectors, alerts on the console).
    run_dir, config: the run store and its config.json; None writes no files.
    wandb: a `WandbRun` that mirrors the records, events and verdict; the session finishes it.
    attach_options: passed to `loopdiag.attach` (stats, log_every, window, ...).

    Per optimizer step: `after_backward()` once the gradients are final, then `step(...)`
    after the optimizer step. The session attaches on `start` (or entering the `with`
    block) and detaches on `close` (or leaving it); an exception leaving the block closes
    the run as interrupted.
    """

    def __init__(self, module: str | nn.Module | None = None, loop_module: str | nn.Module | None = None, *,
                 monitor: Monitor | None = None, run_dir: str | Path | None = None,
                 config: Mapping[str, Any] | None = None, wandb: WandbRun | None = None,
                 **attach_options: Any):
        unknown = sorted(set(attach_options) - set(ATTACH_OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) for loopdiag.attach: {', '.join(unknown)}; "
                            f"valid: {', '.join(ATTACH_OPTIONS)}")
        self.module, self.loop_module = module, loop_module
        self.monitor = monitor if monitor is not None else Monitor(sinks=[ConsoleSink()])
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.config = dict(config or {})
        self.wandb = wandb
        self.attach_options = dict(attach_options)
        self.recorder: LoopRecorder | None = None
        self.writer: RunWriter | None = None
        self.records: list[Record] = []
        self.summary: dict[str, Any] | None = None
        self.judges = True
        self.writes = False
        self._added_sinks: list[AlertSink] = []
        self._warned_no_loops = False
        self._last_step: int | None = None

    @classmethod
    def for_trainer(cls, trainer: str, module: str | nn.Module | None, loop_module: str | nn.Module | None,
                    monitor: Monitor | None, run_dir: str | Path | None, config: Mapping[str, Any] | None,
                    attach_options: Mapping[str, Any]) -> RunSession:
        """The session of a trainer callback: its config.json also names the trainer library
        and what was recorded."""
        recorder = {"trainer": trainer, "module": _describe(module), "loop_module": _describe(loop_module),
                    **{key: value for key, value in attach_options.items() if key != "shared_params"}}
        return cls(module, loop_module, monitor=monitor, run_dir=run_dir,
                   config={**(config or {}), "recorder": recorder}, **attach_options)

    @property
    def should_stop(self) -> bool:
        return self.monitor.should_stop

    @property
    def stop_reason(self) -> str | None:
        stop = self.monitor.stop_event
        return None if stop is None else stop_message(stop)

    def start(self, model: nn.Module | None = None, *, first_step: int = 1, last_step: int | None = None,
              resume: bool = False, write: bool = True, judge: bool = True) -> RunSession:
        """Attach to `module` (found in `model` when it is a path) and open the run store.
        `last_step`, when the trainer knows it, is recorded whatever `log_every`
        (`LoopRecorder.last_step`).

        Under data parallelism only the main process writes (`write`). The recorder combines
        each record across processes (see `loopdiag.probes.recorder`); the CLI judges it in
        every process alike, a trainer callback in the main one only (`judge`). `resume`
        continues the run store's run from step `first_step` and restores the detectors'
        state from the records it kept. A session still open (a trainer that crashed without
        an exception hook) is closed first, as interrupted.
        """
        if self.recorder is not None:
            self.close(finished=False)
        self.summary, self.records = None, []
        self._last_step = first_step - 1 if resume else None
        self.recorder = attach(_submodule(model, self.module), self.loop_module, **self.attach_options)
        self.recorder.last_step = last_step
        self.recorder.begin_step(first_step)
        self.judges, self.writes = judge, write
        if write and self.run_dir is not None:
            try:
                self.writer = RunWriter(self.run_dir, self.config, resume=resume,
                                        resume_step=first_step - 1 if resume else None)
            except BaseException:
                # hooks left behind would keep collecting from every forward of the model
                self.recorder.detach()
                self.recorder = None
                raise
            self._add_sink(EventLogSink(self.writer), first=True)
            # A trainer with no exception hook (Hugging Face's) leaves the session open when
            # training raises: the run must still end as interrupted, not without a verdict.
            atexit.register(self._close_at_exit)
        if write and self.wandb is not None:
            self._add_sink(self.wandb)
        if resume and first_step > 1 and self.run_dir is not None:
            # steps past the checkpoint are dropped here too: the main process may not have yet
            self.records = [r for r in read_records(self.run_dir) if r["step"] < first_step]
            for record in self.records:
                self.monitor.restore(record)
        return self

    def after_backward(self) -> None:
        """Take the gradient statistics: once per optimizer step, where the gradients are final."""
        self._check_running("after_backward")
        self.recorder.after_backward()

    def step(self, step: int, *, loss: Tensor | float | None, lr: float | None = None,
             grad_norm: Tensor | float | None = None) -> Record | None:
        """Close optimizer step `step`; on a logged step judge and write its record, and return it.
        `lr` is only kept in the record (no default detector judges by it); None leaves it out.
        Steps must increase from call to call (the optimizer step's count, not a batch index
        that restarts every epoch): the detectors' windows and the run store are in steps."""
        self._check_running("step")
        if not is_int(step):
            raise TypeError(f"step must be an integer, got {type(step).__name__} {step!r}")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step must increase from call to call: got step {step} after step "
                             f"{self._last_step}; pass the optimizer step's count, not a batch index "
                             "that restarts every epoch")
        self._last_step = int(step)
        record = self.recorder.end_step(step, loss=loss, lr=lr, grad_norm=grad_norm)
        if record is None:
            return None
        if not record.get("n_loops") and not self._warned_no_loops:
            self._warned_no_loops = True
            warnings.warn(f"step {step} ran no loop of the recorded module: if the training step calls a "
                          "submodule directly rather than the model, pass that submodule as module=",
                          stacklevel=caller_stacklevel())
        self.judge(record)
        self.write(record)
        return record

    def judge(self, record: Record) -> None:
        """Keep `record` for the verdict and run the detectors on it; alerts reach the sinks."""
        self.records.append(record)
        if self.judges:
            self.monitor.update(record)

    def write(self, record: Record) -> None:
        """Append `record` to the run store and W&B (a process that writes nothing skips it)."""
        if self.writer is not None:
            self.writer.log(record)
        if self.writes and self.wandb is not None:
            self.wandb.log_record(record)

    def flush(self) -> None:
        """Make everything written so far durable (before a checkpoint a resume starts from)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self, *, finished: bool = True, stopped_by: str | None = None,
              steps_done: int | None = None) -> dict[str, Any]:
        """Detach (the records stay), judge the end of a run that finished without being
        stopped, and write the verdict; a run that did not finish is "interrupted". Returns
        the summary; safe to call twice."""
        if self.summary is not None:
            return self.summary
        if self.recorder is not None and self.recorder.attached:
            self.recorder.detach()
        if finished and stopped_by is None and self.judges:
            self.monitor.finish()  # the end-of-run judgements (a run stopped early has none)
        summary = verdict(self.records, self.monitor.events, finished=finished,
                          context_free_loss=self.monitor.context_free_loss)
        if steps_done is not None:
            summary["steps_done"] = steps_done
        summary["stopped_by"] = stopped_by
        summary["not_judged"] = sorted(self.monitor.not_judged())
        summary["reference"] = self._reference()
        # A run that did not end, or that `stop_on` stopped at a warning or information, is
        # no finished stable run; a failure it was stopped at stands.
        if not finished or (stopped_by is not None and summary["status"] == "stable"):
            summary["status"] = "interrupted"
        writer, self.writer = self.writer, None
        atexit.unregister(self._close_at_exit)
        if writer is not None:
            try:
                writer.close(summary)
            except OSError:
                if finished:
                    raise
                # else the write failure that interrupted the run is already on its way up
        if self.writes and self.wandb is not None:
            self.wandb.finish(summary)
        for sink in self._added_sinks:
            self.monitor.sinks.remove(sink)
        self._added_sinks = []
        self.summary = summary
        return summary

    def _check_running(self, method: str) -> None:
        if self.recorder is None:
            raise RuntimeError(f"RunSession.{method}() before the session started: use it as "
                               "`with RunSession(...) as run:`, or call run.start() first")
        if not self.recorder.attached:
            raise RuntimeError(f"RunSession.{method}() after the session closed (its `with` block "
                               "ended, or close() was called); start it again for a new run")

    def _close_at_exit(self) -> None:
        self.close(finished=False)

    def __enter__(self) -> RunSession:
        started = self.recorder is not None and self.recorder.attached
        return self if started else self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: Any) -> None:
        self.close(finished=exc_type is None, stopped_by=self.stop_reason)

    def _reference(self) -> dict[str, Any] | None:
        """What the verdict was judged against: the monitor's expected loss, with the run it
        came from when the config names one (a suite's one-loop run); None without one."""
        loss = self.monitor.expected_loss
        if loss is None:
            return None
        recorded = self.config.get("reference")
        if isinstance(recorded, Mapping) and recorded.get("expected_loss") == loss:
            return dict(recorded)
        return {"expected_loss": loss}

    def _add_sink(self, sink: AlertSink, first: bool = False) -> None:
        self.monitor.sinks.insert(0 if first else len(self.monitor.sinks), sink)
        self._added_sinks.append(sink)


def _submodule(root: nn.Module | None, module: str | nn.Module | None) -> nn.Module:
    if isinstance(module, nn.Module):
        return module
    if root is None:
        raise ValueError("nothing to record: give the session a module, or start it with the model")
    if module is None:
        return root
    try:
        return root.get_submodule(module)
    except AttributeError:
        children = ", ".join(name for name, _ in root.named_children()) or "none"
        raise ValueError(f"{type(root).__name__} has no submodule {module!r} to record; "
                         f"its children: {children}") from None


def _describe(module: str | nn.Module | None) -> str | None:
    return type(module).__name__ if isinstance(module, nn.Module) else module
