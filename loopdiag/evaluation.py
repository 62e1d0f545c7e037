"""Test-time loop scaling: a run trained at K, evaluated from its checkpoint at other K'.

The loop count is a forward argument of every reference model, so the same weights run
at any K'. Each run's result is a long table in `<run>/loop_scaling.csv`:
run_id, arch, train_loops, seed, lr, eval_loops, metric, value; `val_loss` always,
`accuracy` (exact match on held-out examples) for a run trained on a task, and
`accuracy_<h>hop` per depth for pointer chasing over several hop counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from loopdiag.analysis.depth import hop_accuracy_metric
from loopdiag.data import (
    EMBEDDED_CORPUS,
    PointerChasingTask,
    SyntheticTask,
    exact_match_accuracy,
    load_corpus,
    task_from_description,
)
from loopdiag.models import ModelConfig, build_model
from loopdiag.store import load_run
from loopdiag.store._files import CHECKPOINT_FILE, LOOP_SCALING_FILE
from loopdiag.train import (
    TrainConfig,
    corpus_batches,
    evaluate,
    load_checkpoint,
    task_batches,
)
from loopdiag.train.batches import HELD_OUT_SEED


def parse_loops(text: str) -> list[int]:
    """"1..12", "1,2,4,8" or "1..4,8,12" as a sorted list of distinct loop counts >= 1."""
    loops: set[int] = set()
    for part in text.replace(" ", "").split(","):
        low, sep, high = part.partition("..")
        try:
            span = range(int(low), int(high) + 1) if sep else [int(low)]
        except ValueError:
            raise ValueError(f"loop counts must look like 1..12 or 1,2,4,8; got {text!r}") from None
        if not span or min(span) < 1:
            raise ValueError(f"loop counts must be >= 1 and ranges ascending; got {text!r}")
        loops.update(span)
    return sorted(loops)


def loop_scaling(run_dir: str | Path, eval_loops: list[int], *, examples: int = 256,
                 corpus_files: list[str | Path] | None = None) -> pd.DataFrame:
    """Evaluate the run in `run_dir` at every K' in `eval_loops` and write
    `<run_dir>/loop_scaling.csv`. The data is the run's own (from its config) unless
    `corpus_files` replaces a corpus that moved; its checksum must match."""
    run_dir = Path(run_dir)
    if not eval_loops or min(eval_loops) < 1:
        raise ValueError(f"eval_loops must be loop counts >= 1, got {eval_loops!r}")
    run = load_run(run_dir)
    checkpoint = run_dir / CHECKPOINT_FILE
    if not checkpoint.is_file():
        status = (run.summary or {}).get("status")
        why = {"diverged": "a run that diverged keeps none",
               "interrupted": "it was stopped before its first checkpoint; `loopdiag run --resume` trains it again",
               None: "it has no summary: still training, or killed before its first checkpoint"}
        raise FileNotFoundError(f"{run_dir} has no {CHECKPOINT_FILE} to evaluate"
                                f"{f' ({why[status]})' if status in why else ''}")
    cell = run.config["cell"]
    model_config = ModelConfig.from_dict(run.config["model"])
    model = build_model(cell["arch"], model_config)
    if model.fixed_depth and list(eval_loops) != [cell["n_loops"]]:
        raise ValueError(f"{run.run_id}: {cell['arch']} is not looped; its depth is fixed at "
                         f"{cell['n_loops']} loops' worth of blocks, the only K' it runs at")
    load_checkpoint(checkpoint, model)
    train_config = TrainConfig(**run.config["train"])
    data = _run_data(run.config["data"], corpus_files)
    is_task = isinstance(data, SyntheticTask)
    if is_task:
        _, val_batches = task_batches(data, train_config)
    else:
        _, val_batches = corpus_batches(data, train_config, model_config.seq_len)
    val_batches = val_batches[: train_config.eval_batches]

    rows: list[dict[str, Any]] = []
    base = {"run_id": run.run_id, "arch": cell["arch"], "train_loops": cell["n_loops"],
            "seed": cell["seed"], "lr": cell["lr"]}
    with torch.no_grad():
        for k in eval_loops:
            rows.append({**base, "eval_loops": k, "metric": "val_loss",
                         "value": evaluate(model, val_batches, n_loops=k)})
            if is_task:
                accuracy = exact_match_accuracy(model, data, n_examples=examples, n_loops=k,
                                                seed=HELD_OUT_SEED + 1)
                rows.append({**base, "eval_loops": k, "metric": "accuracy", "value": accuracy})
                for hops, task in _tasks_by_depth(data).items():
                    accuracy = exact_match_accuracy(model, task, n_examples=examples, n_loops=k,
                                                    seed=HELD_OUT_SEED + 1)
                    rows.append({**base, "eval_loops": k, "metric": hop_accuracy_metric(hops),
                                 "value": accuracy})
    frame = pd.DataFrame(rows)
    frame.to_csv(run_dir / LOOP_SCALING_FILE, index=False)
    return frame


def _tasks_by_depth(task: SyntheticTask) -> dict[int, SyntheticTask]:
    """A mixed-depth task split into one task per depth; empty for any other task."""
    if not isinstance(task, PointerChasingTask) or len(task.hop_choices) < 2:
        return {}
    return {hops: task.at_hops(hops) for hops in task.hop_choices}


def _run_data(described: dict[str, Any], corpus_files: list[str | Path] | None):
    if "task" in described:
        return task_from_description(described)
    if corpus_files:
        corpus = load_corpus(corpus_files)
    elif described["source"] == EMBEDDED_CORPUS:
        corpus = load_corpus(None)
    else:
        # `files` is exact; runs recorded before it have only the joined `source`
        files = described.get("files") or described["source"].split(", ")
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"the run's corpus file {missing[0]} is gone; pass the text "
                                    "again (--data) to evaluate on it")
        corpus = load_corpus(files)
    if corpus.sha256 != described["sha256"]:
        raise ValueError(f"corpus {corpus.source} differs from the one the run trained on "
                         f"(sha256 {corpus.sha256[:12]} vs {described['sha256'][:12]})")
    return corpus
