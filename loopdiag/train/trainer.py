"""One training run: the loop, evaluation, checkpoints and the callback protocol.

The trainer is model-agnostic: any module with `logits, loss = model(idx, targets,
n_loops=...)` trains. Data comes as a batch source (a callable drawing one (x, y) batch
from a `torch.Generator`) plus a fixed list of validation batches, so a synthetic task
plugs in exactly like a corpus.

Under torch.distributed (torchrun) training is data parallel through DDP: every rank draws
the global batch and trains on its own contiguous rows; the history's loss is the mean over
ranks; a stop any rank asks for stops every rank on the same step; validation batches are
shared out; only rank 0 writes checkpoints. No gradient accumulation: one backward a step.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from loopdiag import distributed
from loopdiag.data import SyntheticTask, TokenCorpus, fixed_batches, get_batch
from loopdiag.train.config import TrainConfig
from loopdiag.train.optim import build_optimizers, lr_multiplier, set_lr_multiplier

Batch = tuple[Tensor, Tensor]
BatchSource = Callable[[torch.Generator], Batch]
ProgressFn = Callable[[int, int, dict[str, Any]], None]


@dataclass
class TrainState:
    """What callbacks see; they may set `should_stop` (and `stop_reason`)."""

    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    config: TrainConfig
    step: int = 0  # updates done, counting the one in progress (1-based inside a step)
    loss: Tensor | None = None  # this step's loss (this rank's own), detached; on the device
    lr: float = 0.0  # AdamW learning rate this step (config.lr * lr_scale)
    lr_scale: float = 0.0  # schedule multiplier applied to every param group
    grad_norm: float | None = None  # pre-clip global norm; None until clipping is done
    val_loss: float | None = None  # latest validation loss
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per step (loss: mean over ranks)
    diverged_step: int | None = None  # set when the loss or grad norm is non-finite
    should_stop: bool = False
    stop_reason: str | None = None  # a callback's reason, divergence, or interruption


class TrainCallback:
    """Hooks into `train`; override what you need. Per step the order is:

    forward, backward, `after_backward` (gradients present, before clipping),
    clip, divergence check, optimizer steps, `after_step` (the clipped gradients are
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
    final_train_loss: float  # mean train loss over the last 10% of steps (at least one)
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
          on_progress: ProgressFn | None = None) -> TrainResult:
    """Train `model` for `cfg.steps` updates; never raises on a non-finite loss.

    `resume=True` continues from `checkpoint_path` when that file exists (else starts
    fresh) and reproduces the uninterrupted run exactly on CPU. A run that diverges
    writes no final checkpoint, so the last periodic one stays usable.
    """
    start_time = time.perf_counter()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = distributed.rank_device(cfg.device)
    world = distributed.world_size()
    rows = distributed.local_rows(cfg.batch_size) if world > 1 else None
    model.to(device).train()
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
    model.zero_grad(set_to_none=True)
    loop_kwargs = {} if cfg.n_loops is None else {"n_loops": cfg.n_loops}
    val_batches = list(val_batches)[: cfg.eval_batches]
    params = [p for p in model.parameters() if p.requires_grad]
    # DDP averages the gradients over the ranks during backward; callbacks, evaluation and
    # checkpoints keep using `model` itself.
    forward = model if world == 1 else DistributedDataParallel(
        model, device_ids=None if device.type == "cpu" else [device])
    writes_checkpoint = checkpoint_path is not None and distributed.is_main()

    def fire(hook: str) -> None:
        for callback in callbacks:
            getattr(callback, hook)(state)

    def agree_to_stop() -> None:
        state.should_stop, state.stop_reason = distributed.agree_to_stop(state.should_stop, state.stop_reason)

    fire("on_train_start")
    agree_to_stop()
    try:
        while state.step < cfg.steps and not state.should_stop:
            state.lr_scale = lr_multiplier(state.step, cfg)
            state.lr = cfg.lr * state.lr_scale
            set_lr_multiplier(optimizers, state.lr_scale)
            x, y = (t if rows is None else t[rows] for t in train_batches(generator))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            _, loss = forward(x, y, **loop_kwargs)
            loss.backward()
            state.step += 1
            state.loss, state.grad_norm = loss.detach(), None
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
                state.val_loss = row["val_loss"] = distributed.mean_in_shares(
                    val_batches, functools.partial(evaluate, model, n_loops=cfg.n_loops))
                fire("on_eval")
            fire("on_step_end")
            agree_to_stop()
            if on_progress is not None:
                on_progress(state.step, cfg.steps, dict(row))
            last = last or state.should_stop
            if writes_checkpoint and (
                    last or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0)):
                fire("before_checkpoint")
                _save_run_checkpoint(checkpoint_path, state, generator)
    except BaseException as exc:
        # Let recorders close their files and mark the run as interrupted, then re-raise.
        state.stop_reason = f"interrupted ({type(exc).__name__})"
        fire("on_train_end")
        raise
    fire("on_train_end")
    return _result(state, time.perf_counter() - start_time)


def eval_due(state: TrainState) -> bool:
    """Whether the step that just finished is evaluated: every `eval_every` steps, the last
    step, and a step after which training stops."""
    cfg = state.config
    return (state.step == cfg.steps or state.should_stop
            or bool(cfg.eval_every and state.step % cfg.eval_every == 0))


def _clip_grad_norm(params: list[nn.Parameter], max_norm: float | None) -> Tensor:
    """Global grad norm before clipping; clips only when `max_norm` is set."""
    if max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def _result(state: TrainState, wall_time_s: float) -> TrainResult:
    history = state.history
    tail = history[-max(1, len(history) // 10):]
    val_losses = [row["val_loss"] for row in history if "val_loss" in row]
    return TrainResult(
        history=history,
        final_train_loss=sum(row["train_loss"] for row in tail) / len(tail) if tail else math.nan,
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
def evaluate(model: nn.Module, val_batches: Sequence[Batch], n_loops: int | None = None) -> float:
    """Mean loss over `val_batches` in eval mode; the model's mode is restored."""
    if not val_batches:
        raise ValueError("evaluate needs at least one validation batch")
    device = next(model.parameters()).device
    loop_kwargs = {} if n_loops is None else {"n_loops": n_loops}
    was_training = model.training
    model.eval()
    try:
        # Sum on the device and sync once, not once per batch.
        total = sum(model(x.to(device), y.to(device), **loop_kwargs)[1].float()
                    for x, y in val_batches)
    finally:
        model.train(was_training)
    return total.item() / len(val_batches)


def save_checkpoint(path: str | Path, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                    step: int, extra: dict[str, Any]) -> None:
    """Write atomically (temp file + rename): a crash mid-write never leaves a torn file.

    Only tensors, primitives, lists, tuples and dicts go in, so loading works with
    `torch.load(..., weights_only=True)`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
               "step": step, "extra": extra}
    # Serialised in memory first: torch reports a short write (a full disk) as a RuntimeError,
    # a plain file write as the OSError callers can tell apart from a bug.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getbuffer())
        os.replace(tmp_name, path)
    except BaseException:
        os.unlink(tmp_name)
        raise


def load_checkpoint(path: str | Path, model: nn.Module,
                    optimizers: Sequence[torch.optim.Optimizer] = ()) -> tuple[int, dict[str, Any]]:
    """Restore model (and optimizers, when given) in place; returns (step, extra)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(payload["model"])
    if optimizers:
        if len(optimizers) != len(payload["optimizers"]):
            raise ValueError(f"checkpoint holds {len(payload['optimizers'])} optimizer states, "
                             f"got {len(optimizers)} optimizers")
        for optimizer, optimizer_state in zip(optimizers, payload["optimizers"]):
            optimizer.load_state_dict(optimizer_state)
    return payload["step"], payload["extra"]


def _save_run_checkpoint(path: str | Path, state: TrainState, generator: torch.Generator) -> None:
    model_config = getattr(state.model, "config", None)
    extra: dict[str, Any] = {
        "generator_state": generator.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "history": state.history,
        "train_config": dataclasses.asdict(state.config),
        "model_config": (dataclasses.asdict(model_config)
                         if dataclasses.is_dataclass(model_config) else None),
    }
    if torch.device(state.config.device).type == "cuda":
        extra["cuda_rng_state"] = torch.cuda.get_rng_state_all()
    save_checkpoint(path, state.model, state.optimizers, state.step, extra)


def corpus_batches(corpus: TokenCorpus, cfg: TrainConfig, seq_len: int,
                   val_seed: int = 0) -> tuple[BatchSource, list[Batch]]:
    """Random training windows and fixed validation windows from a corpus's splits.

    Validation uses `val_seed`, not `cfg.seed`, so runs that differ only in their seed
    are scored on the same text (likewise in `task_batches`).
    """
    train_source = functools.partial(get_batch, corpus.train, cfg.batch_size, seq_len)
    return train_source, fixed_batches(corpus.val, cfg.batch_size, seq_len, cfg.eval_batches,
                                       val_seed)


# Held-out task examples come from a seed no training run uses, so a training stream never
# replays the validation examples. (The CPU generator keeps only 32 bits of a seed: 2**32
# would be seed 0 again.)
HELD_OUT_SEED = 2**31 - 1


def task_batches(task: SyntheticTask, cfg: TrainConfig,
                 val_seed: int = 0) -> tuple[BatchSource, list[Batch]]:
    """Fresh task examples for training and a fixed set for validation."""
    generator = torch.Generator().manual_seed(HELD_OUT_SEED + val_seed)
    val = [task.batch(cfg.batch_size, generator) for _ in range(cfg.eval_batches)]
    return functools.partial(task.batch, cfg.batch_size), val
