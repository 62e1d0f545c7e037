"""The least memory a suite's runs need, checked before any of them starts.

A loop count far past what the machine holds (`--loops 100000`) would otherwise train the
suite's smaller runs first and be killed for memory hours later. What one training step
keeps for its backward is measured, not modelled: a forward of one row at K = 1 and K = 2
counts the bytes autograd saves (each storage once, the weights' not at all), and each
further loop adds what the second did. The figure is a floor (the allocator, the
optimizer's state and the probes' own tensors come on top), so a suite it refuses could not
have run without swapping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from loopdiag.models import ModelConfig, build_model
from loopdiag.models.recurrent_depth import RecurrentDepthTransformer, longest_sampled_loops
from loopdiag.run.probe_suite import ProbeSuite, RunSpec
from loopdiag.store.writer import byte_size

MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class RunMemory:
    run_id: str
    n_loops: int
    step_loops: int  # the most loops one step runs: n_loops, or a sampled run's longest step
    activation_bytes: int  # saved for one micro-batch's backward
    weight_bytes: int  # the weights and their gradients
    per_loop_bytes: int  # what each loop adds to both

    @property
    def total(self) -> int:
        return self.activation_bytes + self.weight_bytes


class StepBytes(NamedTuple):
    saved: int  # what autograd keeps for the backward
    weights: int  # the parameters' bytes


def step_bytes_per_row(arch: str, model_config: ModelConfig, n_loops: int, seq_len: int | None = None) -> StepBytes:
    """What a one-row forward (with targets) at `n_loops` keeps for its backward, the row
    `seq_len` tokens long (default: the model's `seq_len`), and the model's weights there."""
    with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
        model = build_model(arch, model_config.with_(n_loops=n_loops)).train()
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.zeros(1, seq_len or model_config.seq_len, dtype=torch.long)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(tokens, tokens, n_loops=n_loops)
    return StepBytes(sum(saved.values()), sum(p.numel() * p.element_size() for p in model.parameters()))


def step_loops(suite: ProbeSuite, cell: RunSpec) -> int:
    """The most loops one training step of `cell` runs: its K, or where each step draws its
    loop count (`sample_loops`), the longest step its run is likely to draw."""
    if suite.model.sample_loops and cell.arch == RecurrentDepthTransformer.arch:
        return longest_sampled_loops(cell.n_loops, suite.train.steps)
    return cell.n_loops


def suite_memory(suite: ProbeSuite, cells: Sequence[RunSpec], seq_len: int) -> list[RunMemory]:
    """The floor of each cell's memory in its longest training step, of rows `seq_len` tokens
    long (a synthetic task's own length, or the model's on a corpus), measured once per
    architecture. A model of K distinct layer stacks (`standard`) also grows its weights with K."""
    rows = suite.train.batch_size // suite.train.grad_accum_steps
    # bf16 autocast saves most activations in half the bytes; halving all keeps a floor
    shrink = 2 if suite.train.precision == "bf16" else 1
    measured = {arch: tuple(step_bytes_per_row(arch, suite.model, k, seq_len) for k in (1, 2))
                for arch in dict.fromkeys(cell.arch for cell in cells)}
    estimates = []
    for cell in cells:
        one, two = measured[cell.arch]
        saved_per_loop = max(0, two.saved - one.saved)
        weights_per_loop = two.weights - one.weights
        loops = step_loops(suite, cell)
        # loops under no_grad keep nothing: truncated backprop stops the activations' growth
        with_grad = min(loops, suite.model.backprop_loops or loops)
        last_loop_saves = with_grad == loops
        estimates.append(RunMemory(
            cell.run_id, cell.n_loops, loops,
            activation_bytes=rows * (one.saved + (with_grad - 1) * saved_per_loop) // shrink,
            weight_bytes=2 * (one.weights + (cell.n_loops - 1) * weights_per_loop),  # and their gradients
            per_loop_bytes=rows * saved_per_loop * last_loop_saves // shrink + 2 * weights_per_loop))
    return estimates


def available_memory() -> int | None:
    """Bytes the kernel can give without swapping (`MemAvailable`); None where it is not known."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def largest_together(estimates: Sequence[RunMemory], count: int) -> int:
    """Bytes the `count` largest runs need at once."""
    return sum(sorted((estimate.total for estimate in estimates), reverse=True)[:count])


def jobs_that_fit(estimates: Sequence[RunMemory], jobs: int, available: int) -> int:
    """The most runs, up to `jobs`, that fit in `available` bytes together when the largest
    meet (0: not even the largest alone)."""
    fit = 0
    while fit < min(jobs, len(estimates)) and largest_together(estimates, fit + 1) <= available:
        fit += 1
    return fit


def too_large(estimate: RunMemory, available: int, rows: int, seq_len: int) -> str:
    """Why `estimate`'s run cannot fit in `available` bytes, and what would."""
    over = estimate.total - available
    step_loops_that_fit = (estimate.step_loops - math.ceil(over / estimate.per_loop_bytes)
                           if estimate.per_loop_bytes else 0)
    # a sampled mean is about the same share of its longest step at any size
    loops_that_fit = step_loops_that_fit * estimate.n_loops // estimate.step_loops
    lower = (f"about {loops_that_fit} loops would fit" if loops_that_fit >= 1
             else "a smaller d_model, seq_len or batch would")
    split = f", as would a grad_accum_steps that splits the {rows} rows" if rows > 1 else ""
    step = ("one training step (" if estimate.step_loops == estimate.n_loops else
            f"its longest training step (about {estimate.step_loops} loops of a sampled mean of "
            f"{estimate.n_loops}; ")
    return (f"{estimate.run_id} needs at least {byte_size(estimate.total)} for {step}"
            f"each loop adds {byte_size(estimate.per_loop_bytes)}, with {rows} rows of {seq_len} tokens) "
            f"and this machine has {byte_size(available)} available: {lower}{split}")
