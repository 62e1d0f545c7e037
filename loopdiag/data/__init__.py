"""Training data: byte-level text corpora and synthetic reasoning tasks."""

from loopdiag.data.corpus import (
    EMBEDDED_CORPUS,
    VOCAB_SIZE,
    DataError,
    TokenCorpus,
    embedded_corpus_bytes,
    expand_globs,
    fixed_batches,
    get_batch,
    load_corpus,
    unigram_loss,
)
from loopdiag.data.tasks import (
    IGNORE_INDEX,
    TASKS,
    AdditionTask,
    PointerChasingTask,
    SyntheticTask,
    exact_match_accuracy,
    task_from_description,
)

__all__ = [
    "EMBEDDED_CORPUS",
    "IGNORE_INDEX",
    "TASKS",
    "VOCAB_SIZE",
    "AdditionTask",
    "DataError",
    "PointerChasingTask",
    "SyntheticTask",
    "TokenCorpus",
    "embedded_corpus_bytes",
    "exact_match_accuracy",
    "expand_globs",
    "fixed_batches",
    "get_batch",
    "load_corpus",
    "task_from_description",
    "unigram_loss",
]
