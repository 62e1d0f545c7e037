"""Training: config, optimizers and schedules, the train loop and its callbacks."""

from loopdiag.train.config import TrainConfig
from loopdiag.train.optim import build_optimizers, lr_multiplier, set_lr_multiplier
from loopdiag.train.batches import Batch, BatchSource, corpus_batches, task_batches
from loopdiag.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from loopdiag.train.trainer import TrainCallback, TrainResult, eval_due, evaluate, train

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
