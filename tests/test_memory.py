"""The memory floor `loopdiag run` checks before training: measured, linear in the loops."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from loopdiag.models import ARCHITECTURES, ModelConfig, build_model
from loopdiag.models.recurrent_depth import longest_sampled_loops
from loopdiag.run.memory import RunMemory, jobs_that_fit, step_bytes_per_row, suite_memory, too_large
from loopdiag.run.probe_suite import find_suite, load_probe_suite

SMALL = ModelConfig(d_model=32, n_heads=2, seq_len=16)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_each_loop_keeps_what_the_second_did(arch):
    """The premise of extrapolating from K = 1 and 2: the saved bytes grow by a constant per loop."""
    one, two, five = (step_bytes_per_row(arch, SMALL, k).saved for k in (1, 2, 5))
    assert two > one
    assert five == one + 4 * (two - one)


def test_only_a_model_of_distinct_layers_grows_its_weights_with_the_loops():
    suite = load_probe_suite(find_suite("default"))
    suite = suite.with_(archs=("standard", "flt"), loops=(1, 12), model=SMALL)
    weights = {(e.run_id.split("-k")[0], e.n_loops): e.weight_bytes for e in suite_memory(suite, suite.cells(), 16)}
    assert weights["flt", 12] == weights["flt", 1]
    assert weights["standard", 12] > weights["standard", 1]
    # extrapolated from one and two stacks, as a model of twelve measures (and its gradients)
    assert weights["standard", 12] == 2 * step_bytes_per_row("standard", SMALL, 12).weights


def test_truncated_backprop_stops_the_growth():
    truncated = SMALL.with_(backprop_loops=2)
    seven, two = (step_bytes_per_row("recurrent-depth", truncated, k).saved for k in (7, 2))
    assert seven == two
    suite = load_probe_suite(find_suite("default"))
    suite = suite.with_(archs=("recurrent-depth",), loops=(2, 7), model=truncated)
    short, long = suite_memory(suite, suite.cells(), SMALL.seq_len)
    assert short.activation_bytes == long.activation_bytes
    assert short.per_loop_bytes > 0 and long.per_loop_bytes == 0  # fewer loops would not help the long one


def test_the_estimate_scales_with_the_rows_and_halves_under_bf16():
    suite = load_probe_suite(find_suite("default"))
    suite = suite.with_(archs=("flt",), loops=(12,), model=SMALL)
    [full] = suite_memory(suite, suite.cells(), SMALL.seq_len)
    [split] = suite_memory(suite.with_(train=replace(suite.train, grad_accum_steps=4)), suite.cells(), SMALL.seq_len)
    [bf16] = suite_memory(suite.with_(train=replace(suite.train, precision="bf16")), suite.cells(), SMALL.seq_len)
    assert split.activation_bytes * 4 == pytest.approx(full.activation_bytes, abs=4)
    assert bf16.activation_bytes * 2 == pytest.approx(full.activation_bytes, abs=2)
    rows = suite.train.batch_size
    assert full.activation_bytes == rows * (step_bytes_per_row("flt", SMALL, 1).saved
                                            + 11 * (step_bytes_per_row("flt", SMALL, 2).saved
                                                    - step_bytes_per_row("flt", SMALL, 1).saved))


def run_memory(run_id, total, per_loop=1, n_loops=12, step_loops=None):
    return RunMemory(run_id, n_loops, step_loops or n_loops, activation_bytes=total, per_loop_bytes=per_loop,
                     weight_bytes=0)


def test_jobs_that_fit_counts_the_largest_runs_together():
    estimates = [run_memory("a", 10), run_memory("b", 40), run_memory("c", 30), run_memory("d", 20)]
    assert jobs_that_fit(estimates, jobs=4, available=100) == 4
    assert jobs_that_fit(estimates, jobs=4, available=90) == 3  # 40 + 30 + 20
    assert jobs_that_fit(estimates, jobs=2, available=1000) == 2
    assert jobs_that_fit(estimates, jobs=4, available=39) == 0  # not even the largest


def test_too_large_says_how_many_loops_would_fit():
    said = too_large(run_memory("flt-k1000-s0", total=1000 * 2**20, per_loop=2**20, n_loops=1000),
                     available=400 * 2**20, rows=16, seq_len=64)
    assert said.startswith("flt-k1000-s0 needs at least 1000.0 MB for one training step")
    assert "about 400 loops would fit" in said
    assert "grad_accum_steps that splits the 16 rows" in said
    nothing_fits = too_large(run_memory("x", total=100, per_loop=1, n_loops=3), available=10, rows=1, seq_len=8)
    assert "a smaller d_model, seq_len or batch would" in nothing_fits
    assert "grad_accum_steps" not in nothing_fits


def test_a_sampled_loop_count_is_judged_at_its_longest_step():
    """Each step of a `sample_loops` run draws its K: its memory is that of the longest step
    the run is likely to draw, with the activations of every one of those loops."""
    sampled = SMALL.with_(sample_loops=True)
    suite = load_probe_suite(find_suite("default"))
    suite = suite.with_(archs=("recurrent-depth",), loops=(12,), model=sampled)
    [fixed] = suite_memory(suite.with_(model=SMALL), suite.cells(), SMALL.seq_len)
    [drawn] = suite_memory(suite, suite.cells(), SMALL.seq_len)
    longest = longest_sampled_loops(12, suite.train.steps)
    assert drawn.n_loops == fixed.n_loops == 12 and fixed.step_loops == 12 and drawn.step_loops == longest
    assert drawn.activation_bytes - fixed.activation_bytes == (longest - 12) * fixed.per_loop_bytes
    said = too_large(drawn, available=fixed.total, rows=suite.train.batch_size, seq_len=SMALL.seq_len)
    assert f"for its longest training step (about {longest} loops of a sampled mean of 12; each loop adds" in said
    # memory for a 12-loop step holds the longest step of a smaller mean
    assert f"about {12 * 12 // longest} loops would fit" in said


def test_the_longest_sampled_step_is_what_the_sampler_draws():
    """About one step in `steps` draws more loops than `longest_sampled_loops` gives, as the
    model's own sampler draws them."""
    model = build_model("recurrent-depth", SMALL.with_(sample_loops=True, n_loops=12))
    torch.manual_seed(0)
    draws = torch.tensor([model.sample_loop_count() for _ in range(20_000)])
    for steps in (50, 300):
        longest = longest_sampled_loops(12, steps)
        assert 0.5 / steps < (draws > longest).double().mean() <= 1 / steps
        assert (draws > longest - 1).double().mean() > 1 / steps  # and it is the least such count
    assert longest_sampled_loops(12, 300) > 3 * 12  # far past the mean: why the mean is no floor
    with pytest.raises(ValueError, match="steps >= 1"):
        longest_sampled_loops(12, 0)
