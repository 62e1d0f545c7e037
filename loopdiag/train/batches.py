"""Batch sources: a callable drawing one (x, y) training batch from a `torch.Generator`,
plus a fixed list of validation batches, from a corpus or a synthetic task."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from loopdiag.data import SyntheticTask, TokenCorpus, fixed_batches, get_batch
from loopdiag.train.config import TrainConfig

Batch = tuple[Tensor, Tensor]
BatchSource = Callable[[torch.Generator], Batch]


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
