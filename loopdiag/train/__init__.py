"""Training: config, optimizers and schedules, the train loop and its callbacks."""

from loopdiag.train.config import TrainConfig
from loopdiag.train.optim import build_optimizers, lr_multiplier, set_lr_multiplier
from loopdiag.train.trainer import (
    Batch,
    BatchSource,
    TrainCallback,
    TrainResult,
    TrainState,
    corpus_batches,
    eval_due,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    task_batches,
    train,
)

__all__ = [
    "Batch",
    "BatchSource",
    "TrainCallback",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "build_optimizers",
    "corpus_batches",
    "eval_due",
    "evaluate",
    "load_checkpoint",
    "lr_multiplier",
    "save_checkpoint",
    "set_lr_multiplier",
    "task_batches",
    "train",
]
