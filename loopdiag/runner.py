"""Train a grid of (architecture, loop count) runs on one corpus and summarise each run."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from loopdiag.data import TokenCorpus
from loopdiag.models import ModelConfig, build_model
from loopdiag.train import TrainConfig, corpus_batches, train

DEFAULT_ARCHS = ("standard", "looped", "looped-inject", "flt-res", "flt")
LOOP_LADDER = (1, 2, 4, 6, 9, 12)


def loop_grid(max_loops: int) -> list[int]:
    """The loop counts compared up to `max_loops`: a fixed ladder, always ending at the maximum."""
    if max_loops < 1:
        raise ValueError(f"--loops must be >= 1, got {max_loops}")
    return sorted({k for k in LOOP_LADDER if k < max_loops} | {max_loops})


@dataclass(frozen=True)
class RunSpec:
    arch: str
    n_loops: int
    seed: int = 0


@dataclass
class RunOutcome:
    arch: str
    n_loops: int
    seed: int
    params: int
    steps_done: int
    final_train_loss: float
    final_val_loss: float | None
    best_val_loss: float | None
    last_loop_resid_norm: float | None  # mean token ||x_L^(K)|| on validation text
    diverged: bool
    wall_time_s: float


@torch.no_grad()
def loop_residual_norms(model: torch.nn.Module, idx: torch.Tensor) -> list[float]:
    """Mean token L2 norm of the stream at the end of every loop, from one forward."""
    norms: list[float] = []
    handle = model.loop_out.register_forward_hook(
        lambda module, inputs, output: norms.append(output.norm(dim=-1).mean().item())
    )
    was_training = model.training
    try:
        model.eval()
        model(idx)
    finally:
        handle.remove()
        model.train(was_training)
    return norms


def run_one(
    spec: RunSpec,
    model_config: ModelConfig,
    train_config: TrainConfig,
    corpus: TokenCorpus,
    on_progress: Callable[[int, int, dict], None] | None = None,
) -> RunOutcome:
    model_config = model_config.with_(n_loops=spec.n_loops)
    train_config = TrainConfig(**{**asdict(train_config), "seed": spec.seed, "n_loops": None})
    torch.manual_seed(spec.seed)  # the same seed gives the same initial weights
    model = build_model(spec.arch, model_config)
    train_source, val_batches = corpus_batches(corpus, train_config, model_config.seq_len)
    result = train(model, train_source, val_batches, train_config, on_progress=on_progress)
    resid = None if result.diverged else loop_residual_norms(model, val_batches[0][0])[-1]
    return RunOutcome(
        arch=spec.arch,
        n_loops=spec.n_loops,
        seed=spec.seed,
        params=model.num_params(),
        steps_done=result.steps_done,
        final_train_loss=result.final_train_loss,
        final_val_loss=result.final_val_loss,
        best_val_loss=result.best_val_loss,
        last_loop_resid_norm=resid,
        diverged=result.diverged,
        wall_time_s=result.wall_time_s,
    )


def run_grid(
    specs: Sequence[RunSpec],
    model_config: ModelConfig,
    train_config: TrainConfig,
    corpus: TokenCorpus,
    results_csv: Path | None = None,
    on_run_start: Callable[[int, RunSpec], None] | None = None,
    on_progress: Callable[[int, int, dict], None] | None = None,
) -> Iterator[RunOutcome]:
    """Run every spec in order; each finished run is appended to `results_csv` at once, so an
    interrupted grid keeps what it completed."""
    for index, spec in enumerate(specs):
        if on_run_start is not None:
            on_run_start(index, spec)
        outcome = run_one(spec, model_config, train_config, corpus, on_progress)
        if results_csv is not None:
            append_csv_row(results_csv, asdict(outcome))
        yield outcome


def append_csv_row(path: Path, row: dict) -> None:
    new_file = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new_file:
            writer.writeheader()
        writer.writerow(row)
