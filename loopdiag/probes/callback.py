"""`RecorderCallback`: a `LoopRecorder` inside `loopdiag.train.train`."""

from __future__ import annotations

from collections.abc import Callable

from loopdiag.probes.records import Record
from loopdiag.probes.recorder import LoopRecorder
from loopdiag.train.checkpoint import TrainState
from loopdiag.train.trainer import TrainCallback

RECORDER_STATE = "loop_recorder"  # its key in a checkpoint's callback state


class RecorderCallback(TrainCallback):
    """Feeds the trainer's steps to `recorder` and passes each finished record to
    `on_record` (where a run store or detectors plug in).

    The trainer's last step is logged whatever `log_every` (`LoopRecorder.last_step`).
    Loss, learning rate and the pre-clip global grad norm come from the trainer's own
    host-side history, so they cost no extra sync (under torchrun the loss there is
    already the mean over ranks). A step that diverges (non-finite loss
    or grad norm) stops the trainer before `after_step`; its record is still finished at the
    end of training, logged step or not, since it is the one that matters most.
    """

    def __init__(self, recorder: LoopRecorder, on_record: Callable[[Record], None] | None = None):
        self.recorder = recorder
        self.on_record = on_record

    def on_train_start(self, state: TrainState) -> None:
        saved = state.callback_state.get(RECORDER_STATE)
        if saved is not None:  # a resume: continue the windows that span steps
            self.recorder.load_state_dict(saved)
        self.recorder.last_step = state.config.steps
        self.recorder.begin_step(state.step + 1)  # trainer steps are 1-based; resumes continue

    def before_checkpoint(self, state: TrainState) -> None:
        state.callback_state[RECORDER_STATE] = self.recorder.state_dict()

    def after_backward(self, state: TrainState) -> None:
        self.recorder.after_backward()

    def after_step(self, state: TrainState) -> None:
        self._finish(state)

    def on_eval(self, state: TrainState) -> None:
        self.recorder.begin_step(state.step + 1)  # evaluation forwards belong to no step

    def on_train_end(self, state: TrainState) -> None:
        if state.diverged_step is not None and state.diverged_step == state.step:
            self._finish(state, force=True)

    def _finish(self, state: TrainState, force: bool = False) -> None:
        row = state.history[-1]
        record = self.recorder.end_step(state.step, loss=row["train_loss"], lr=row["lr"],
                                        grad_norm=row["grad_norm"], force=force)
        if record is not None and self.on_record is not None:
            self.on_record(record)
