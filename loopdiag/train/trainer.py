"""One training run: the loop, evaluation and the callback protocol (checkpoints in
`loopdiag.train.checkpoint`, batch sources in `loopdiag.train.batches`).

The trainer is model-agnostic: any module with `logits, loss = model(idx, targets,
n_loops=...)` trains. Data comes as a batch source (a callable drawing one (x, y) batch
from a `torch.Generator`) plus a fixed list of validation batches, so a synthetic task
plugs in exactly like a corpus.

Under torch.distributed (torchrun) training is data parallel, through DDP or FSDP2
(`parallel`): every rank draws the global batch and trains on its own contiguous rows; the
history's loss is the mean over ranks; a stop any rank asks for stops every rank on the
same step; only rank 0 writes checkpoints. Under DDP validation batches are shared out;
under FSDP every rank evaluates all of them, since each forward gathers the weights with
every rank and ranks with unequal shares would wait on each other.

FSDP shards the root module only: a looped model runs its blocks K times a forward, and one
gather per forward (not one per block call) keeps the communication independent of K, at
the memory of the full weights while a forward or backward runs.

With `grad_accum_steps` = m each rank's rows are split into m micro-batches, each
backward of its loss / m; gradients are synchronized over ranks on the last one only. The
step's loss is the mean of the micro-batches' losses.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from loopdiag import distributed
from loopdiag.train.batches import Batch, BatchSource
from loopdiag.train.checkpoint import TrainState, load_checkpoint, save_run_checkpoint
from loopdiag.train.config import TrainConfig
from loopdiag.train.optim import build_optimizers, lr_multiplier, set_lr_multiplier

ProgressFn = Callable[[int, int, dict[str, Any]], None]
# A crash or a kill loses at most this much training; a save costs well under a second.
CHECKPOINT_INTERVAL_S = 300.0


class TrainCallback:
    """Hooks into `train`; override what you need. Per step the order is:

    forward and backward (one each per micro-batch), `after_backward` (gradients present,
    before clipping), clip, divergence check, optimizer steps, `after_step` (the clipped gradients are
    still present; they are cleared right after), evaluation + `on_eval` when due,
    `on_step_end` (whether this step is evaluated and stops is now settled, on every rank),
    `before_checkpoint` when a checkpoint is about to be written.

    Update-to-weight ratios: snapshot the weights in `after_backward` and compare them in
    `after_step`. From `after_step` on, `state.history[-1]` holds this step's floats
    (train_loss, lr, grad_norm), so reading them costs no device sync.
    `should_stop` is honoured at the end of the step in which it is set.
    """

    def on_train_start(self, state: TrainState) -> None: ...
    def after_backward(self, state: TrainState) -> None: ...
    def after_step(self, state: TrainState) -> None: ...
    def on_eval(self, state: TrainState) -> None: ...
    def on_step_end(self, state: TrainState) -> None: ...
    def before_checkpoint(self, state: TrainState) -> None: ...
    def on_train_end(self, state: TrainState) -> None: ...


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    final_loss: float  # mean train loss over the last 10% of steps (at least one)
    final_val_loss: float | None  # None when never evaluated (diverged or no val batches)
    best_val_loss: float | None
    diverged: bool
    diverged_step: int | None
    stopped_early: bool
    stop_reason: str | None  # why the run ended before cfg.steps, if it did
    steps_done: int  # updates applied, including those before a resume
    wall_time_s: float  # this call only


def train(model: nn.Module, train_batches: BatchSource, val_batches: Sequence[Batch],
          cfg: TrainConfig, *, callbacks: Sequence[TrainCallback] = (),
          checkpoint_path: str | Path | None = None, resume: bool = False,
          on_progress: ProgressFn | None = None,
          checkpoint_interval_s: float | None = CHECKPOINT_INTERVAL_S) -> TrainResult:
    """Train `model` for `cfg.steps` updates; never raises on a non-finite loss.

    `resume=True` continues from `checkpoint_path` when that file exists (else starts
    fresh) and reproduces the uninterrupted run exactly on CPU. A run that diverges
    writes no final checkpoint, so the last periodic one stays usable.

    With a `checkpoint_path`, one process (no torchrun) also checkpoints every
    `checkpoint_interval_s` seconds of training (None: never), so a crash or a kill loses at
    most that much; and a SIGINT or SIGTERM during training ends the step under way, saves a
    checkpoint, closes the run as interrupted and raises KeyboardInterrupt. A second SIGINT
    stops at once. The time-based checkpoints change nothing a resume reproduces.
    """
    start_time = time.perf_counter()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = distributed.rank_device(cfg.device)
    world = distributed.world_size()
    rows = distributed.local_rows(cfg.batch_size, cfg.grad_accum_steps) if world > 1 else None
    micro_rows = cfg.batch_size // world // cfg.grad_accum_steps
    model.to(device).train()
    sharded = world > 1 and cfg.parallel == "fsdp"
    if sharded:
        fully_shard(model)  # before the optimizers: it replaces the parameters by DTensors
    optimizers = build_optimizers(model, cfg)
    state = TrainState(model=model, optimizers=optimizers, config=cfg)
    if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
        state.step, extra = load_checkpoint(checkpoint_path, model, optimizers)
        if state.step > cfg.steps:
            raise ValueError(f"cannot resume: {checkpoint_path} is at step {state.step}, "
                             f"past steps={cfg.steps}")
        generator.set_state(extra["generator_state"])
        torch.set_rng_state(extra["torch_rng_state"])
        if device.type == "cuda" and "cuda_rng_state" in extra:
            torch.cuda.set_rng_state_all(extra["cuda_rng_state"])
        state.history = extra["history"]
        state.callback_state = extra.get("callbacks", {})
    model.zero_grad(set_to_none=True)
    loop_kwargs = {} if cfg.n_loops is None else {"n_loops": cfg.n_loops}
    val_batches = list(val_batches)[: cfg.eval_batches]
    params = [p for p in model.parameters() if p.requires_grad]
    # DDP and FSDP average the gradients over the ranks during backward; callbacks,
    # evaluation and checkpoints keep using `model` itself.
    forward = model if world == 1 or sharded else DistributedDataParallel(
        model, device_ids=None if device.type == "cpu" else [device])
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16,
                                 enabled=cfg.precision == "bf16")
    evaluate_batches = functools.partial(evaluate, model, n_loops=cfg.n_loops, precision=cfg.precision)

    def fire(hook: str) -> None:
        for callback in callbacks:
            getattr(callback, hook)(state)

    def agree_to_stop() -> None:
        state.should_stop, state.stop_reason = distributed.agree_to_stop(state.should_stop, state.stop_reason)

    # Ranks would decide these apart, and a checkpoint is a collective under FSDP.
    single = checkpoint_path is not None and world == 1
    interval = checkpoint_interval_s if single else None
    saved_at = time.perf_counter()
    signals = _finish_step_on_signal() if single else contextlib.nullcontext([])
    with signals as received:
        try:
            # inside the try: an interrupt while callbacks start (a run store just opened) must
            # still reach on_train_end, which closes the run as interrupted
            fire("on_train_start")
            agree_to_stop()
            while state.step < cfg.steps and not state.should_stop:
                state.lr_scale = lr_multiplier(state.step, cfg)
                state.lr = cfg.lr * state.lr_scale
                set_lr_multiplier(optimizers, state.lr_scale)
                x, y = (t if rows is None else t[rows] for t in train_batches(generator))
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                losses = []
                for start in range(0, x.size(0), micro_rows):
                    part = slice(start, start + micro_rows)
                    with _gradient_sync(forward, last=start + micro_rows >= x.size(0)):
                        with autocast():
                            _, loss = forward(x[part], y[part], **loop_kwargs)
                        (loss / cfg.grad_accum_steps).backward()
                    losses.append(loss.detach())
                state.step += 1
                state.loss, state.grad_norm = torch.stack(losses).mean(), None
                fire("after_backward")
                grad_norm = _clip_grad_norm(params, cfg.grad_clip)
                # The one host sync per step: the divergence check must happen before the
                # optimizer step (a NaN update poisons the weights), and history needs floats.
                # The gradients (so grad_norm) are already the same on every rank; the loss is not.
                loss_value, state.grad_norm = torch.stack(
                    [distributed.mean_over_ranks(state.loss.float()), grad_norm.float()]).tolist()
                row = {"step": state.step, "train_loss": loss_value, "lr": state.lr,
                       "grad_norm": state.grad_norm}
                state.history.append(row)
                if not (math.isfinite(loss_value) and math.isfinite(state.grad_norm)):
                    state.diverged_step = state.step
                    state.stop_reason = (f"non-finite loss or grad norm at step {state.step} "
                                         f"(loss={loss_value}, grad_norm={state.grad_norm})")
                    model.zero_grad(set_to_none=True)
                    break
                for optimizer in optimizers:
                    optimizer.step()
                fire("after_step")
                agree_to_stop()  # before eval_due, which depends on it
                model.zero_grad(set_to_none=True)
                last = state.step == cfg.steps or state.should_stop
                if val_batches and eval_due(state):
                    state.val_loss = row["val_loss"] = (
                        evaluate_batches(val_batches) if sharded
                        else distributed.mean_in_shares(val_batches, evaluate_batches))
                    if sharded:
                        model.reshard()  # the root keeps its gathered weights after a forward
                    fire("on_eval")
                fire("on_step_end")
                agree_to_stop()
                if on_progress is not None:
                    on_progress(state.step, cfg.steps, dict(row))
                last = last or state.should_stop
                interrupted = bool(received)  # read once: a signal may land while saving
                if checkpoint_path is not None and (
                        last or interrupted or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0)
                        or (interval is not None and time.perf_counter() - saved_at >= interval)):
                    if distributed.is_main():
                        fire("before_checkpoint")
                    # every rank: sharded weights are gathered for rank 0 to write
                    save_run_checkpoint(checkpoint_path, state, generator, write=distributed.is_main())
                    saved_at = time.perf_counter()
                if interrupted:
                    state.stop_reason = f"interrupted ({received[0]})"
                    break
        except BaseException as exc:
            # Let recorders close their files and mark the run as interrupted, then re-raise.
            state.stop_reason = f"interrupted ({type(exc).__name__})"
            fire("on_train_end")
            raise
        fire("on_train_end")
    if received:
        raise KeyboardInterrupt(f"{received[0]} after step {state.step}; checkpoint saved")
    return _result(state, time.perf_counter() - start_time)


@contextlib.contextmanager
def _finish_step_on_signal() -> Iterator[list[str]]:
    """While training: SIGINT and SIGTERM only note their name in the list yielded, so the
    loop ends its step and saves a checkpoint; a second SIGINT raises KeyboardInterrupt at
    once. A signal the process ignores (SIGINT in a shell's background job) stays ignored."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():  # only it may set handlers
        yield received
        return

    def note(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and "SIGINT" in received:
            signal.default_int_handler(signum, frame)
        received.append(signal.Signals(signum).name)

    # None: a handler set outside Python, which could not be put back
    previous = {number: handler for number in (signal.SIGINT, signal.SIGTERM)
                if (handler := signal.getsignal(number)) not in (signal.SIG_IGN, None)}
    for number in previous:
        signal.signal(number, note)
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def eval_due(state: TrainState) -> bool:
    """Whether the step that just finished is evaluated: every `eval_every` steps, the last
    step, and a step after which training stops."""
    cfg = state.config
    return (state.step == cfg.steps or state.should_stop
            or bool(cfg.eval_every and state.step % cfg.eval_every == 0))


def _gradient_sync(forward: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Synchronize gradients over ranks on the last micro-batch of a step only."""
    if isinstance(forward, DistributedDataParallel) and not last:
        return forward.no_sync()
    if isinstance(forward, FSDPModule):
        forward.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def _clip_grad_norm(params: list[nn.Parameter], max_norm: float | None) -> Tensor:
    """Global grad norm before clipping; clips only when `max_norm` is set."""
    if max_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm  # sharded: summed over ranks


def _result(state: TrainState, wall_time_s: float) -> TrainResult:
    history = state.history
    tail = history[-max(1, len(history) // 10):]
    val_losses = [row["val_loss"] for row in history if "val_loss" in row]
    return TrainResult(
        history=history,
        final_loss=sum(row["train_loss"] for row in tail) / len(tail) if tail else math.nan,
        final_val_loss=history[-1].get("val_loss") if history else None,
        best_val_loss=min(val_losses) if val_losses else None,
        diverged=state.diverged_step is not None,
        diverged_step=state.diverged_step,
        stopped_early=state.should_stop,
        stop_reason=state.stop_reason,
        steps_done=state.step if state.diverged_step is None else state.step - 1,
        wall_time_s=wall_time_s,
    )


@torch.no_grad()
def evaluate(model: nn.Module, val_batches: Sequence[Batch], n_loops: int | None = None,
             precision: str = "fp32") -> float:
    """Mean loss over `val_batches` in eval mode (forwards under bf16 autocast with
    precision="bf16"); the model's mode is restored."""
    if not val_batches:
        raise ValueError("evaluate needs at least one validation batch")
    device = next(model.parameters()).device
    loop_kwargs = {} if n_loops is None else {"n_loops": n_loops}
    was_training = model.training
    model.eval()
    try:
        # Sum on the device and sync once, not once per batch.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            total = sum(model(x.to(device), y.to(device), **loop_kwargs)[1].float()
                        for x, y in val_batches)
    finally:
        model.train(was_training)
    return total.item() / len(val_batches)


