"""A run's state, as the trainer's callbacks see it, and its checkpoints: the weights,
optimizers, RNG states and history a resume restarts from."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from loopdiag import distributed
from loopdiag.store._files import write_atomically
from loopdiag.train.config import TrainConfig


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
    # Callbacks' own state that a resume needs (saved by `before_checkpoint`, restored
    # before `on_train_start`): tensors, numbers, lists and dicts only.
    callback_state: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | Path, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                    step: int, extra: dict[str, Any], *, write: bool = True) -> None:
    """Write atomically, with the run store's file permissions: a crash mid-write never
    leaves a torn file.

    Only tensors, primitives, lists, tuples and dicts go in, so loading works with
    `torch.load(..., weights_only=True)`. A sharded (FSDP) model's full weights and optimizer
    states are gathered to rank 0's CPU, so every rank calls it and only one writes.
    """
    if _is_sharded(model):
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()  # an evaluation forward leaves the root's weights gathered
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optimizer_states = [get_optimizer_state_dict(model, o, options=options) for o in optimizers]
    else:
        model_state, optimizer_states = model.state_dict(), [o.state_dict() for o in optimizers]
    if write:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": model_state, "optimizers": optimizer_states, "step": step, "extra": extra}
        # Serialised in memory first: torch reports a short write (a full disk) as a
        # RuntimeError, a plain file write as the OSError callers can tell apart from a bug.
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        write_atomically(path, lambda handle: handle.write(buffer.getbuffer()))
    if _is_sharded(model):
        distributed.barrier()  # every rank reads this file to resume: none goes on before it exists


def load_checkpoint(path: str | Path, model: nn.Module,
                    optimizers: Sequence[torch.optim.Optimizer] = ()) -> tuple[int, dict[str, Any]]:
    """Restore model (and optimizers, when given) in place; returns (step, extra)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    sharded = _is_sharded(model)
    if sharded:  # every rank reads the full file and keeps its shards
        set_model_state_dict(model, payload["model"], options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(payload["model"])
    if optimizers:
        if len(optimizers) != len(payload["optimizers"]):
            raise ValueError(f"checkpoint holds {len(payload['optimizers'])} optimizer states, "
                             f"got {len(optimizers)} optimizers")
        for optimizer, optimizer_state in zip(optimizers, payload["optimizers"]):
            if sharded:
                set_optimizer_state_dict(model, optimizer, optimizer_state,
                                         options=StateDictOptions(full_state_dict=True))
            else:
                optimizer.load_state_dict(optimizer_state)
    return payload["step"], payload["extra"]


def _is_sharded(model: nn.Module) -> bool:
    return any(isinstance(module, FSDPModule) for module in model.modules())


def save_run_checkpoint(path: str | Path, state: TrainState, generator: torch.Generator, *,
                        write: bool = True) -> None:
    model_config = getattr(state.model, "config", None)
    extra: dict[str, Any] = {
        "generator_state": generator.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "history": state.history,
        "callbacks": state.callback_state,
        "train_config": dataclasses.asdict(state.config),
        "model_config": (dataclasses.asdict(model_config)
                         if dataclasses.is_dataclass(model_config) else None),
    }
    if torch.device(state.config.device).type == "cuda":
        extra["cuda_rng_state"] = torch.cuda.get_rng_state_all()
    save_checkpoint(path, state.model, state.optimizers, state.step, extra, write=write)
