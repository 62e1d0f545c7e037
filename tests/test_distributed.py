"""Data-parallel training under torch.distributed: two gloo processes on CPU against one
process over the same global batch, with the model replicated (DDP) or sharded (FSDP2).
Same statistics, one run store, one stop step.

The two ranks are started once (`two_ranks`) and go through every scenario in turn,
saving what each saw; the tests compare that with single-process runs made here.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loopdiag import distributed
from loopdiag.data import load_corpus
from loopdiag.models import build_model
from loopdiag.probes import RecorderCallback, attach
from loopdiag.run.runner import RunSpec, run_one
from loopdiag.store import load_run, read_records
from loopdiag.train import TrainCallback, TrainConfig, TrainState, corpus_batches, train
from run_files import tiny_model_config

pytestmark = pytest.mark.processes  # every test here starts torchrun ranks
WORLD = 2
TINY = tiny_model_config()
SPEC = RunSpec("flt", 2)
CONFIG = TrainConfig(steps=4, batch_size=4, eval_every=2, eval_batches=2)
SHARDED = replace(CONFIG, parallel="fsdp", eval_batches=3)  # 3: more batches than ranks, unevenly
LONGER = TrainConfig(steps=8, batch_size=4, eval_every=0)  # runs that should stop at step 3
FAULT_STEP = 3
# Two processes differ from one only in the order of float32 sums: DDP all-reduces two
# half-batch gradients where one process sums the whole batch, and each rank sums its own
# statistics first. That is ~1e-7 relative per step, and Adam can amplify it over steps
# where a gradient coordinate is near 0 (it divides by the coordinate's own scale); the
# largest difference measured here was 1.2e-6 (rel_update). 1e-4 leaves a wide margin,
# while a real error (a rank's half counted twice or missing, a norm summed instead of its
# square) is off by 1e-1 or more.
CLOSE = dict(rel=1e-4, abs=1e-6, nan_ok=True)
# sign_flip is a fraction of ~10^4 coordinates: one near-0 coordinate rounding the other
# way moves it by 1e-4.
SIGN_FLIP_ABS = 1e-3


class ScaleOutput:
    """A fault on one rank: from training step `start` on, `module`'s output in this rank's
    `model` is multiplied by `factor`. Training forwards are counted on the model."""

    def __init__(self, model: torch.nn.Module, module: torch.nn.Module, start: int, factor: float):
        self.start, self.factor, self.forwards = start, factor, 0
        model.register_forward_pre_hook(self._count)
        module.register_forward_hook(self._scale)  # registered before the recorder's: it sees the fault

    def _count(self, module, args) -> None:
        self.forwards += module.training

    def _scale(self, module, args, output):
        return output * self.factor if module.training and self.forwards >= self.start else None


class StopOnLocalLoss(TrainCallback):
    """The same on every rank: asks to stop when this rank's own loss (`state.loss`, not
    the mean over ranks) passes `limit`."""

    def __init__(self, limit: float):
        self.limit = limit

    def after_step(self, state: TrainState) -> None:
        local = state.loss.item()
        if local > self.limit:
            state.should_stop = True
            state.stop_reason = f"local loss {local:.3g} > {self.limit} on rank {distributed.rank()}"


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("flt", TINY.with_(n_loops=2))


def costly_records(parallel: str = "ddp") -> list[dict]:
    """Two steps with the costly statistics (attention, per layer) on every logged step."""
    model, config = tiny_model(), TrainConfig(steps=2, batch_size=4, eval_every=0, parallel=parallel)
    source, val = corpus_batches(load_corpus(), config, TINY.seq_len)
    with attach(model, stats="full", costly_every=1) as recorder:
        train(model, source, val, config, callbacks=[RecorderCallback(recorder)])
    return recorder.records


def sharded_resume(corpus, checkpoint) -> dict[str, list[float]]:
    """Train 4 sharded steps at once, and 2 + 2 resumed from a checkpoint: train losses."""
    config = replace(CONFIG, parallel="fsdp", eval_every=0)
    source, val = corpus_batches(corpus, config, TINY.seq_len)
    losses = {}
    for name, steps, resume in (("whole", 4, False), ("first", 2, False), ("resumed", 4, True)):
        path = checkpoint if name != "whole" else checkpoint.with_name("whole.pt")
        result = train(tiny_model(), source, val, replace(config, steps=steps), checkpoint_path=path, resume=resume)
        losses[name] = [row["train_loss"] for row in result.history]
    return losses


class PackedLoop(torch.nn.Module):
    """A per-token loop over one packed row (1, N) of sequences: each rank packs its own."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.block, self.head = (torch.nn.Embedding(256, 16), torch.nn.Linear(16, 16),
                                             torch.nn.Linear(16, 8))

    def forward(self, ids, position_ids=None):
        x = self.embed(ids)
        for _ in range(3):
            x = x + torch.tanh(self.block(x))
        return self.head(x).square().mean()


# The packed rows of the global batch: rank 0's sequences, then rank 1's (lengths differ).
PACKED_LENGTHS = ([5, 12], [3, 9, 7])


def packed_rows() -> list[list[torch.Tensor]]:
    tokens = torch.randint(0, 256, (sum(map(sum, PACKED_LENGTHS)),), generator=torch.Generator().manual_seed(2))
    sequences = list(tokens.split([n for lengths in PACKED_LENGTHS for n in lengths]))
    return [sequences[:len(PACKED_LENGTHS[0])], sequences[len(PACKED_LENGTHS[0]):]]


def packed_record(sequences: list[torch.Tensor]) -> dict:
    """One step of `PackedLoop` over `sequences` packed into one row, recorded."""
    model = PackedLoop()
    positions = torch.cat([torch.arange(len(sequence)) for sequence in sequences])[None]
    with attach(model, "block", loops=3) as recorder:
        model(torch.cat(sequences)[None], position_ids=positions).backward()
        recorder.after_backward()
        return recorder.end_step(0)


def exploding_on_rank_1(arch, config):
    model = build_model(arch, config)
    if distributed.rank() == 1:  # its residual stream; the final norm keeps its loss as it was
        ScaleOutput(model, model.loop_out, FAULT_STEP, 1e5)
    return model


def rank_main(rank: int, store_file: str, out: str) -> None:
    torch.set_num_threads(1)
    # A stop the ranks disagreed on would leave one waiting in a collective: fail, not hang.
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    out_dir, corpus, seen = Path(out), load_corpus(), {}
    try:
        # Every rank is handed the same run folder, as `loopdiag run` under torchrun does.
        outcome = run_one(SPEC, TINY, CONFIG, corpus, out_dir / "same" / SPEC.run_id)
        seen["same"] = {"steps_done": outcome.steps_done, "loss": outcome.final_loss}
        seen["costly"] = costly_records()
        seen["packed"] = packed_record(packed_rows()[rank])

        outcome = run_one(SPEC, TINY, SHARDED, corpus, out_dir / "sharded" / SPEC.run_id)
        seen["sharded"] = {"steps_done": outcome.steps_done, "loss": outcome.final_loss}
        seen["sharded_costly"] = costly_records("fsdp")  # attached before the weights are sharded
        seen["sharded_resume"] = sharded_resume(corpus, out_dir / "resume.pt")

        # residual_explosion with its baseline at the first record, so a few steps are
        # enough; a stream that explodes while the loss shows nothing is information, and
        # stopping on information makes its event the stop
        for parallel in ("ddp", "fsdp"):
            with mock.patch("loopdiag.run.runner.build_model", exploding_on_rank_1):
                outcome = run_one(SPEC, TINY, replace(LONGER, parallel=parallel), corpus,
                                  out_dir / f"blowup-{parallel}" / SPEC.run_id, stop_on="info",
                                  thresholds={"residual_explosion": {
                                      "warmup": 0, "baseline_window": 1, "smooth": 1}})
            seen[f"blowup-{parallel}"] = {"steps_done": outcome.steps_done, "status": outcome.status}

        model = tiny_model()
        if rank == 1:  # confident nonsense from step 3: rank 1's own loss soars
            ScaleOutput(model, model.lm_head, FAULT_STEP, 1e3)
        source, val = corpus_batches(corpus, LONGER, TINY.seq_len)
        result = train(model, source, val, LONGER, callbacks=[StopOnLocalLoss(limit=10.0)])
        seen["local_stop"] = {"steps_done": result.steps_done, "reason": result.stop_reason,
                              "losses": [row["train_loss"] for row in result.history]}

        with pytest.raises(ValueError) as error:
            train(tiny_model(), source, val, TrainConfig(steps=1, batch_size=5))
        seen["odd_batch"] = str(error.value)
        with pytest.raises(ValueError) as error:  # 6 rows: 3 a rank, not 2 micro-batches
            train(tiny_model(), source, val, TrainConfig(steps=1, batch_size=6, grad_accum_steps=2))
        seen["odd_micro_batch"] = str(error.value)
    finally:
        dist.destroy_process_group()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(seen))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("two-ranks")
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1"}):
        mp.spawn(rank_main, args=(str(out / "rendezvous"), str(out)), nprocs=WORLD)
    return out, [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def assert_same_records(records: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for record, expected in zip(records, reference):
        assert record.keys() == expected.keys()
        for key, value in expected.items():
            tolerance = dict(abs=SIGN_FLIP_ABS) if key == "sign_flip" else CLOSE
            assert record[key] == pytest.approx(value, **tolerance), (record["step"], key)


def test_two_ranks_record_what_one_process_records(two_ranks, tmp_path):
    out, (rank0, rank1) = two_ranks
    one = run_one(SPEC, TINY, CONFIG, load_corpus(), tmp_path / SPEC.run_id)
    records, reference = read_records(out / "same" / SPEC.run_id), read_records(tmp_path / SPEC.run_id)
    for stat in ("loss", "val_loss", "resid_norm", "act_grad_norm", "grad_norm", "grad_cos", "update_ratio"):
        assert any(stat in record for record in reference), stat  # compared below, not vacuously
    assert_same_records(records, reference)
    assert rank0["same"] == rank1["same"]  # the history's loss is the mean over ranks on each
    assert rank0["same"]["loss"] == pytest.approx(one.final_loss, **CLOSE)


def test_sharded_ranks_record_what_one_process_records(two_ranks, tmp_path):
    out, (rank0, rank1) = two_ranks
    one = run_one(SPEC, TINY, SHARDED, load_corpus(), tmp_path / SPEC.run_id)
    records, reference = read_records(out / "sharded" / SPEC.run_id), read_records(tmp_path / SPEC.run_id)
    for stat in ("val_loss", "grad_norm/blocks.0.attn", "shared_grad_norm", "grad_cos", "sign_flip", "update_ratio"):
        assert any(stat in record for record in reference), stat
    assert_same_records(records, reference)
    assert rank0["sharded"] == rank1["sharded"]
    assert rank0["sharded"]["loss"] == pytest.approx(one.final_loss, **CLOSE)
    assert rank0["sharded_costly"] == rank1["sharded_costly"]
    assert_same_records(rank0["sharded_costly"], costly_records())


def test_a_sharded_run_resumes_from_its_checkpoint_as_if_uninterrupted(two_ranks):
    _, (rank0, rank1) = two_ranks
    assert rank0["sharded_resume"] == rank1["sharded_resume"]
    losses = rank0["sharded_resume"]
    assert losses["resumed"][:2] == losses["first"]  # the history comes back from the checkpoint
    assert losses["resumed"] == pytest.approx(losses["whole"], rel=1e-6)


def test_a_sharded_checkpoint_holds_the_full_weights(two_ranks, tmp_path):
    out, _ = two_ranks
    run_one(SPEC, TINY, SHARDED, load_corpus(), tmp_path / SPEC.run_id)
    sharded = torch.load(out / "sharded" / SPEC.run_id / "checkpoint.pt", weights_only=True)
    single = torch.load(tmp_path / SPEC.run_id / "checkpoint.pt", weights_only=True)
    assert sharded["model"].keys() == single["model"].keys()
    for name, weight in single["model"].items():
        # weights ~0.01 to 4, rounding differences of ~5e-6 after Adam's four steps
        torch.testing.assert_close(sharded["model"][name], weight, rtol=1e-4, atol=2e-5, msg=name)
    (state,) = sharded["optimizers"]
    assert len(state["state"]) == len(single["optimizers"][0]["state"])


def test_only_rank_0_writes_the_run_store(two_ranks):
    out, _ = two_ranks
    (run_dir,) = (out / "same").iterdir()
    assert sorted(path.name for path in run_dir.iterdir()) == [
        "checkpoint.pt", "config.json", "events.jsonl", "metrics.jsonl", "metrics.parquet",
        "summary.json"]
    assert [record["step"] for record in read_records(run_dir)] == [1, 2, 3, 4]  # each step once


def test_costly_statistics_combine_like_one_process(two_ranks):
    _, (rank0, rank1) = two_ranks
    assert rank0["costly"] == rank1["costly"]  # one record on every rank: the detectors agree
    assert {"attn_entropy", "attn_max_logit", "resid_norm/layer_02"} <= rank0["costly"][-1].keys()
    assert_same_records(rank0["costly"], costly_records())


def test_packed_rows_combine_like_one_process_over_all_their_sequences(two_ranks):
    _, (rank0, rank1) = two_ranks
    one = packed_record([sequence for row in packed_rows() for sequence in row])
    for stat in ("resid_norm", "rel_update", "token_corr"):  # the forward's: one record on every rank
        assert rank0["packed"][stat] == rank1["packed"][stat]
        assert rank0["packed"][stat] == pytest.approx(one[stat], **CLOSE), stat


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_collapse_on_rank_1_stops_both_ranks_at_its_step(two_ranks, parallel):
    out, (rank0, rank1) = two_ranks
    name = f"blowup-{parallel}"
    # stopped at an event of information: nothing failed, and the run did not end
    assert rank0[name] == rank1[name] == {"steps_done": FAULT_STEP, "status": "interrupted"}
    run = load_run(out / name / SPEC.run_id)
    assert run.summary["stopped_by"].startswith(f"residual_explosion (info) at step {FAULT_STEP}")
    # The combined record carries rank 1's signal at its true weight: half the tokens of the
    # global batch grew 1e5-fold, so the mean grew about 5e4-fold (not 1e5: rank 0's did not).
    before, after = (record["resid_norm"][-1] for record in read_records(run.run_dir)[FAULT_STEP - 2:FAULT_STEP])
    assert 0.3e5 < after / before < 0.7e5


def test_a_stop_one_rank_asks_for_stops_every_rank(two_ranks):
    _, (rank0, rank1) = two_ranks
    assert rank0["local_stop"]["steps_done"] == rank1["local_stop"]["steps_done"] == FAULT_STEP
    assert rank1["local_stop"]["reason"].startswith("local loss")
    assert rank1["local_stop"]["reason"].endswith("on rank 1")
    assert rank0["local_stop"]["reason"] == f"rank 1: {rank1['local_stop']['reason']}"
    assert rank0["local_stop"]["losses"] == rank1["local_stop"]["losses"]


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(two_ranks):
    _, (rank0, rank1) = two_ranks
    assert rank0["odd_batch"] == rank1["odd_batch"]
    assert "batch_size 5 does not split over 2 ranks" in rank0["odd_batch"]
    assert rank0["odd_micro_batch"] == rank1["odd_micro_batch"]
    assert "3 rows, which do not split into grad_accum_steps=2" in rank0["odd_micro_batch"]


TINY_SUITE = textwrap.dedent("""
    name = "two-ranks"
    archs = ["flt"]
    loops = [2]
    steps = 3
    [model]
    preset = "tiny"
    seq_len = 16
    [train]
    batch_size = 4
    eval_batches = 2
""")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_runs_a_suite_with_two_ranks(tmp_path, parallel):
    (tmp_path / "tiny.toml").write_text(TINY_SUITE)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
               "-m", "loopdiag", "run", "tiny.toml", "--wandb", "off", "--out", "out", "--parallel", parallel,
               "--grad-accum-steps", "2", "--precision", "bf16"]
    done = subprocess.run(command, check=False, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = tmp_path / "out" / "runs"
    assert sorted(path.name for path in runs.iterdir()) == ["flt-k02-s0", "suite.json"]
    assert [record["step"] for record in read_records(runs / "flt-k02-s0")] == [1, 2, 3]
    run = load_run(runs / "flt-k02-s0")
    assert run.summary["status"] == "stable"
    assert (run.config["train"]["parallel"], run.config["train"]["precision"]) == (parallel, "bf16")
    assert (tmp_path / "out" / "report.md").is_file()
    assert done.stdout.count("loopdiag run two-ranks") == 1  # rank 0 speaks for both
