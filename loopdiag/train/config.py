"""Training configuration: one flat, validated dataclass that `asdict` turns into
the run's `config.json` and the W&B config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loopdiag.detect.base import is_int

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("constant-decay", "cosine")
PRECISIONS = ("fp32", "bf16")
PARALLEL = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3  # AdamW learning rate (every parameter, or the non-Muon ones)
    optimizer: str = "adamw"  # "adamw" | "muon"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    # "constant-decay": constant, then linear to 0 over the last `decay_fraction` of
    # steps (the FLT paper's schedule). "cosine": cosine from 1 to `min_lr_ratio`.
    # Both start with a linear warm-up over `warmup_steps` (0 = none).
    schedule: str = "constant-decay"
    decay_fraction: float = 0.2
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0  # max global grad norm; None disables clipping
    eval_every: int = 50  # 0 = only at the end; the last step is always evaluated
    eval_batches: int = 8  # validation batches per evaluation (the first ones given)
    # Steps between checkpoints (when a checkpoint path is given); 0: none by step count. The
    # trainer also saves at the end, every 5 minutes and on SIGINT or SIGTERM (`train`).
    checkpoint_every: int = 0
    seed: int = 0
    n_loops: int | None = None  # None = the model's configured loop count
    muon_lr: float = 0.02
    device: str = "cpu"
    # Micro-batches per update: `batch_size` rows make one update, in this many forwards.
    grad_accum_steps: int = 1
    # "bf16": forwards under torch.autocast; weights, gradients, optimizer and statistics fp32.
    precision: str = "fp32"
    # How torchrun ranks share the model: "ddp" replicates it, "fsdp" shards it (FSDP2).
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        # JSON round-trips turn the tuple into a list; accept that.
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        _check(is_int(self.steps) and self.steps >= 1, "steps", "an int >= 1", self.steps)
        _check(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "an int >= 1",
               self.batch_size)
        _check(_is_number(self.lr) and self.lr > 0, "lr", "> 0", self.lr)
        _check(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}", self.optimizer)
        _check(_is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", ">= 0",
               self.weight_decay)
        _check(isinstance(self.betas, tuple) and len(self.betas) == 2
               and all(_is_number(b) and 0 <= b < 1 for b in self.betas),
               "betas", "two numbers in [0, 1)", self.betas)
        _check(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}", self.schedule)
        _check(_is_number(self.decay_fraction) and 0 <= self.decay_fraction <= 1,
               "decay_fraction", "in [0, 1]", self.decay_fraction)
        _check(is_int(self.warmup_steps) and 0 <= self.warmup_steps < self.steps,
               "warmup_steps", f"an int in [0, steps={self.steps})", self.warmup_steps)
        _check(_is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio",
               "in [0, 1]", self.min_lr_ratio)
        _check(self.grad_clip is None or (_is_number(self.grad_clip) and self.grad_clip > 0),
               "grad_clip", "> 0 or None", self.grad_clip)
        _check(is_int(self.eval_every) and self.eval_every >= 0, "eval_every", "an int >= 0",
               self.eval_every)
        _check(is_int(self.eval_batches) and self.eval_batches >= 1, "eval_batches",
               "an int >= 1", self.eval_batches)
        _check(is_int(self.checkpoint_every) and self.checkpoint_every >= 0,
               "checkpoint_every", "an int >= 0", self.checkpoint_every)
        _check(is_int(self.seed), "seed", "an int", self.seed)
        _check(self.n_loops is None or (is_int(self.n_loops) and self.n_loops >= 1), "n_loops",
               "an int >= 1 or None", self.n_loops)
        _check(_is_number(self.muon_lr) and self.muon_lr > 0, "muon_lr", "> 0", self.muon_lr)
        _check(is_int(self.grad_accum_steps) and self.grad_accum_steps >= 1, "grad_accum_steps",
               "an int >= 1", self.grad_accum_steps)
        _check(self.batch_size % self.grad_accum_steps == 0, "batch_size",
               f"a multiple of grad_accum_steps={self.grad_accum_steps} (each micro-batch takes "
               f"batch_size / grad_accum_steps rows)", self.batch_size)
        _check(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}", self.precision)
        _check(self.parallel in PARALLEL, "parallel", f"one of {PARALLEL}", self.parallel)
        _check(self.parallel != "fsdp" or self.optimizer == "adamw", "optimizer",
               "'adamw' with parallel='fsdp' (Muon orthogonalizes whole matrices, FSDP holds "
               "shards)", self.optimizer)
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            _check(False, "device", "a torch device string such as 'cpu' or 'cuda:0'",
                   self.device)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, field: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"TrainConfig.{field} must be {rule}, got {value!r}")
