"""Trainer, optimizers, schedules and checkpoints, on a tiny looped model on CPU."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import stat

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loopdiag.data import AdditionTask, TokenCorpus
from loopdiag.train import (
    TrainCallback,
    TrainConfig,
    TrainState,
    build_optimizers,
    corpus_batches,
    evaluate,
    load_checkpoint,
    lr_multiplier,
    save_checkpoint,
    task_batches,
    train,
)

VOCAB, SEQ, BATCH = 16, 8, 8


@dataclasses.dataclass
class TinyConfig:
    vocab_size: int = VOCAB
    d_model: int = 16
    n_loops: int = 3


class TinyLooped(nn.Module):
    """Embedding, one weight-tied residual block applied n_loops times, head."""

    def __init__(self, config: TinyConfig | None = None) -> None:
        super().__init__()
        self.config = config or TinyConfig()
        d = self.config.d_model
        self.embed = nn.Embedding(self.config.vocab_size, d)
        self.norm = nn.LayerNorm(d)
        self.block = nn.Linear(d, d)
        self.dropout = nn.Dropout(0.1)  # makes the global RNG matter for resume/determinism
        self.lm_head = nn.Linear(d, self.config.vocab_size, bias=False)
        self.loops_seen: list[int] = []

    def forward(self, idx, targets=None, n_loops=None):
        n_loops = n_loops or self.config.n_loops
        self.loops_seen.append(n_loops)
        h = self.embed(idx)
        for _ in range(n_loops):
            h = h + self.dropout(torch.tanh(self.block(self.norm(h))))
        logits = self.lm_head(h)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


def next_token_batches(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task: the target is the input token plus one (mod vocab)."""
    x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    return x, (x + 1) % VOCAB


def val_set(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1234)
    return [next_token_batches(generator) for _ in range(n)]


def tiny_model(seed: int = 0) -> TinyLooped:
    torch.manual_seed(seed)
    return TinyLooped()


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{"steps": 20, "batch_size": BATCH, "lr": 1e-2, "eval_every": 5,
                          "eval_batches": 2, **overrides})


class StopAt(TrainCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, state: TrainState) -> None:
        if state.step == self.step:
            state.should_stop, state.stop_reason = True, f"asked at {self.step}"


def test_loss_goes_down():
    result = train(tiny_model(), next_token_batches, val_set(), config(steps=60, eval_every=20))
    assert not result.diverged and result.steps_done == 60
    assert result.final_val_loss < 0.1 * math.log(VOCAB)
    assert result.final_loss < result.history[0]["train_loss"]
    assert [row["step"] for row in result.history if "val_loss" in row] == [20, 40, 60]
    assert result.best_val_loss <= result.final_val_loss


def test_constant_decay_schedule():
    cfg = TrainConfig(steps=100, decay_fraction=0.2)
    assert lr_multiplier(0, cfg) == 1.0
    assert lr_multiplier(79, cfg) == 1.0
    assert lr_multiplier(80, cfg) == 1.0  # decay starts here
    assert lr_multiplier(90, cfg) == pytest.approx(0.5)
    assert lr_multiplier(99, cfg) == pytest.approx(0.05)
    assert lr_multiplier(100, cfg) == 0.0
    values = [lr_multiplier(s, cfg) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_schedule_with_warmup():
    cfg = TrainConfig(steps=110, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(4, cfg) == pytest.approx(0.5)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg) == pytest.approx(0.55)  # halfway: mean of 1 and 0.1
    assert lr_multiplier(110, cfg) == pytest.approx(0.1)


def test_trainer_applies_schedule_to_every_group():
    cfg = config(optimizer="muon", steps=10, decay_fraction=0.5)
    seen: list[list[float]] = []

    class RecordLr(TrainCallback):
        def after_backward(self, state: TrainState) -> None:
            seen.append([g["lr"] for o in state.optimizers for g in o.param_groups])

    result = train(tiny_model(), next_token_batches, val_set(), cfg, callbacks=[RecordLr()])
    for step, lrs in enumerate(seen):
        scale = lr_multiplier(step, cfg)
        assert lrs == pytest.approx([cfg.lr * scale] * (len(lrs) - 1) + [cfg.muon_lr * scale])
        assert result.history[step]["lr"] == pytest.approx(cfg.lr * scale)


def test_muon_gets_exactly_the_hidden_matrices():
    model = tiny_model()
    adamw, muon = build_optimizers(model, config(optimizer="muon", weight_decay=0.1))
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    adamw_ids = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert muon_ids == {id(model.block.weight)}
    assert adamw_ids == {id(p) for p in model.parameters()} - muon_ids
    decayed = {id(p) for g in adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model.lm_head.weight)}  # not the embedding, norm, or biases


def test_tied_head_stays_with_adamw():
    model = tiny_model()
    model.lm_head.weight = model.embed.weight
    adamw, muon = build_optimizers(model, config(optimizer="muon"))
    assert {id(p) for g in muon.param_groups for p in g["params"]} == {id(model.block.weight)}


def test_adamw_covers_all_params():
    model = tiny_model()
    (adamw,) = build_optimizers(model, config())
    assert sorted(id(p) for g in adamw.param_groups for p in g["params"]) == sorted(
        id(p) for p in model.parameters())


@pytest.mark.parametrize("clip", [1e-3, None], ids=["clip", "noclip"])
def test_grad_norm_is_pre_clip_and_clipping_bounds_grads(clip):
    pre, post = [], []

    class GradProbe(TrainCallback):
        def after_backward(self, state: TrainState) -> None:
            grads = [p.grad for p in state.model.parameters() if p.grad is not None]
            pre.append(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads])).item())

        def after_step(self, state: TrainState) -> None:
            post.append(torch.linalg.vector_norm(torch.cat(
                [p.grad.flatten() for p in state.model.parameters()])).item())

    result = train(tiny_model(), next_token_batches, val_set(), config(steps=3, grad_clip=clip),
                   callbacks=[GradProbe()])
    assert [row["grad_norm"] for row in result.history] == pytest.approx(pre, rel=1e-5)
    if clip is None:
        assert post == pytest.approx(pre, rel=1e-5)
    else:
        assert all(n > clip for n in pre)
        assert all(n <= clip * (1 + 1e-4) for n in post)


class NanAtStep(TinyLooped):
    def __init__(self, bad_step: int) -> None:
        super().__init__()
        self.bad_step, self.calls = bad_step, 0

    def forward(self, idx, targets=None, n_loops=None):
        logits, loss = super().forward(idx, targets, n_loops)
        self.calls += 1
        return logits, loss * math.nan if self.calls == self.bad_step else loss


def test_non_finite_loss_stops_without_raising(tmp_path):
    torch.manual_seed(0)
    model = NanAtStep(bad_step=3)
    ended = []

    class End(TrainCallback):
        def on_train_end(self, state: TrainState) -> None:
            ended.append(state.step)

    result = train(model, next_token_batches, val_set(), config(eval_every=0), callbacks=[End()],
                   checkpoint_path=tmp_path / "ckpt.pt")
    assert result.diverged and result.diverged_step == 3 and result.steps_done == 2
    assert len(result.history) == 3 and math.isnan(result.history[-1]["train_loss"])
    assert result.final_val_loss is None and ended == [3] and "non-finite" in result.stop_reason
    assert not result.stopped_early
    assert all(torch.isfinite(p).all() for p in model.parameters())  # NaN step not applied
    assert not (tmp_path / "ckpt.pt").exists()


def test_callback_stop_writes_checkpoint(tmp_path):
    path = tmp_path / "run" / "ckpt.pt"
    progress = []
    result = train(tiny_model(), next_token_batches, val_set(), config(), callbacks=[StopAt(7)],
                   checkpoint_path=path, on_progress=lambda s, t, m: progress.append((s, t, m)))
    assert result.stopped_early and result.stop_reason == "asked at 7"
    assert result.steps_done == 7 and not result.diverged
    assert result.final_val_loss is not None  # evaluated at the stopping step
    assert [(s, t) for s, t, _ in progress] == [(s, 20) for s in range(1, 8)]
    payload = torch.load(path, weights_only=True)
    assert payload["step"] == 7 and payload["extra"]["train_config"]["steps"] == 20
    assert payload["extra"]["model_config"] == dataclasses.asdict(TinyConfig())
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temp files left


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_matches_uninterrupted_run(tmp_path, optimizer):
    cfg = config(optimizer=optimizer, checkpoint_every=4)
    straight_model = tiny_model()
    straight = train(straight_model, next_token_batches, val_set(), cfg)

    path = tmp_path / "ckpt.pt"
    train(tiny_model(), next_token_batches, val_set(), cfg, callbacks=[StopAt(10)],
          checkpoint_path=path)
    resumed_model = tiny_model(seed=99)  # different init: everything must come from the file
    resumed = train(resumed_model, next_token_batches, val_set(), cfg, checkpoint_path=path,
                    resume=True)

    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    assert resumed.final_val_loss == straight.final_val_loss and resumed.steps_done == 20
    for name, tensor in straight_model.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name


class SignalAt(TrainCallback):
    """Sends this process `signals` after the update of `step`, as a Ctrl-C or a kill would."""

    def __init__(self, step: int, *signals: int) -> None:
        self.step, self.signals, self.ended_as = step, signals, None

    def after_step(self, state: TrainState) -> None:
        if state.step == self.step:
            for signum in self.signals:
                os.kill(os.getpid(), signum)

    def on_train_end(self, state: TrainState) -> None:
        self.ended_as = state.stop_reason


@pytest.fixture
def sigint_delivered():
    """SIGINT handled as an interactive process handles it. A job that a non-interactive shell
    starts in the background (a CI runner's, often) inherits SIGINT ignored, and the trainer
    rightly leaves an ignored signal ignored."""
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.usefixtures("sigint_delivered")
def test_a_signal_ends_the_step_with_a_checkpoint_that_resumes_as_if_uninterrupted(tmp_path, signum):
    straight_model = tiny_model()
    straight = train(straight_model, next_token_batches, val_set(), config())
    path, handler = tmp_path / "ckpt.pt", signal.getsignal(signum)
    interrupt = SignalAt(7, signum)
    with pytest.raises(KeyboardInterrupt, match="after step 7; checkpoint saved"):
        train(tiny_model(), next_token_batches, val_set(), config(), callbacks=[interrupt], checkpoint_path=path)
    assert interrupt.ended_as == f"interrupted ({signal.Signals(signum).name})"
    assert torch.load(path, weights_only=True)["step"] == 7 and signal.getsignal(signum) is handler
    resumed_model = tiny_model(seed=99)
    resumed = train(resumed_model, next_token_batches, val_set(), config(), checkpoint_path=path, resume=True)
    assert resumed.history == straight.history  # no evaluation was added at the stopping step
    for name, tensor in straight_model.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name


@pytest.mark.usefixtures("sigint_delivered")
def test_a_second_sigint_stops_at_once(tmp_path):
    path = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), next_token_batches, val_set(), config(),
              callbacks=[SignalAt(7, signal.SIGINT, signal.SIGINT)], checkpoint_path=path,
              checkpoint_interval_s=None)
    assert not path.exists()  # left inside step 7, before the step's end could save one


def test_a_sigint_the_process_ignores_stays_ignored(tmp_path):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's
    try:
        result = train(tiny_model(), next_token_batches, val_set(), config(),
                       callbacks=[SignalAt(7, signal.SIGINT)], checkpoint_path=tmp_path / "ckpt.pt")
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.steps_done == config().steps


class FailAt(TrainCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, state: TrainState) -> None:
        if state.step == self.step:
            raise RuntimeError("the machine went away")


def test_a_crash_loses_at_most_the_checkpoint_interval(tmp_path):
    path = tmp_path / "ckpt.pt"
    with pytest.raises(RuntimeError):
        train(tiny_model(), next_token_batches, val_set(), config(), callbacks=[FailAt(5)], checkpoint_path=path,
              checkpoint_interval_s=0.0)
    assert torch.load(path, weights_only=True)["step"] == 4


def test_resume_refuses_a_checkpoint_past_the_last_step(tmp_path):
    path = tmp_path / "ckpt.pt"
    train(tiny_model(), next_token_batches, val_set(), config(steps=6), checkpoint_path=path)
    with pytest.raises(ValueError, match="at step 6, past steps=4"):
        train(tiny_model(), next_token_batches, val_set(), config(steps=4), checkpoint_path=path,
              resume=True)


def test_load_checkpoint_restores_model(tmp_path):
    path = tmp_path / "ckpt.pt"
    trained = tiny_model()
    train(trained, next_token_batches, val_set(), config(steps=5, optimizer="muon"),
          checkpoint_path=path)
    fresh = tiny_model(seed=5)
    optimizers = build_optimizers(fresh, config(optimizer="muon"))
    step, extra = load_checkpoint(path, fresh, optimizers)
    assert step == 5 and len(extra["history"]) == 5
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(),
                                                  fresh.state_dict().values()))


def test_same_seed_is_bit_identical():
    runs = [train(tiny_model(), next_token_batches, val_set(), config(steps=10)) for _ in range(2)]
    assert [r["train_loss"] for r in runs[0].history] == [r["train_loss"] for r in runs[1].history]
    other = train(tiny_model(), next_token_batches, val_set(), config(steps=10, seed=1))
    assert [r["train_loss"] for r in other.history] != [r["train_loss"] for r in runs[0].history]


def test_n_loops_reaches_train_and_eval():
    model = tiny_model()
    train(model, next_token_batches, val_set(), config(steps=2, n_loops=5))
    assert set(model.loops_seen) == {5}


def test_evaluate_restores_mode_and_averages():
    model, batches = tiny_model(), val_set(3)
    model.train()
    value = evaluate(model, batches)
    assert model.training
    model.eval()
    with torch.no_grad():
        expected = sum(model(x, y)[1].item() for x, y in batches) / 3
    assert value == pytest.approx(expected)
    assert not model.training  # eval mode kept too


@pytest.mark.parametrize("field,value", [
    ("steps", 0), ("batch_size", 0), ("lr", -1.0), ("optimizer", "sgd"), ("weight_decay", -0.1),
    ("betas", (0.9,)), ("schedule", "linear"), ("decay_fraction", 1.5), ("warmup_steps", 300),
    ("min_lr_ratio", 2.0), ("grad_clip", 0.0), ("eval_every", -1), ("eval_batches", 0),
    ("checkpoint_every", -1), ("n_loops", 0), ("muon_lr", 0.0), ("device", "not-a-device"),
    ("grad_accum_steps", 0), ("grad_accum_steps", 1.5), ("precision", "fp16"), ("parallel", "zero3"),
], ids=lambda v: str(v))
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field} "):
        TrainConfig(**{field: value})


def test_a_device_this_machine_lacks_is_refused_before_training():
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"device 'cuda:99' is not available here"):
        train(model, next_token_batches, val_set(), config(device="cuda:99"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("values,field,reason", [
    ({"batch_size": 6, "grad_accum_steps": 4}, "batch_size", "a multiple of grad_accum_steps=4"),
    ({"parallel": "fsdp", "optimizer": "muon"}, "optimizer", "'adamw' with parallel='fsdp'"),
])
def test_config_refuses_combinations_that_cannot_train(values, field, reason):
    with pytest.raises(ValueError, match=f"TrainConfig.{field} must be {reason}"):
        TrainConfig(**values)


def deterministic_model() -> TinyLooped:
    model = tiny_model()
    model.dropout.p = 0.0  # micro-batches draw dropout masks in another order
    return model


def test_accumulated_micro_batches_train_like_one_full_batch():
    from loopdiag.probes import RecorderCallback, attach

    runs = []
    for accum in (1, 2, 4):
        model = deterministic_model()
        with attach(model, loop_module="block") as recorder:
            result = train(model, next_token_batches, val_set(), config(steps=4, grad_accum_steps=accum),
                           callbacks=[RecorderCallback(recorder)])
        runs.append((result, recorder.records, model.state_dict(), model.loops_seen))
    (full, full_records, full_weights, full_loops) = runs[0]
    assert len(full_loops) == 4 + 2  # 4 steps, then one evaluation of 2 batches
    for accum, (result, records, weights, loops) in zip((2, 4), runs[1:]):
        assert len(loops) == 4 * accum + 2  # one forward per micro-batch
        for row, expected in zip(result.history, full.history):
            assert row.keys() == expected.keys()
            for key in row.keys() - {"step", "lr"}:
                assert row[key] == pytest.approx(expected[key], rel=1e-5), (accum, key)
        for record, expected in zip(records, full_records):
            for key in ("resid_norm", "rel_update", "shared_grad_norm", "update_ratio"):
                assert record[key] == pytest.approx(expected[key], rel=1e-4, nan_ok=True), (accum, key)
        for name, weight in full_weights.items():
            torch.testing.assert_close(weights[name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_trains_close_to_fp32():
    results = [train(deterministic_model(), next_token_batches, val_set(), config(steps=5, precision=precision))
               for precision in ("fp32", "bf16")]
    fp32, bf16 = ([row["train_loss"] for row in result.history] for result in results)
    assert fp32 == pytest.approx(bf16, rel=2e-2)  # bf16 keeps ~3 significant digits
    assert fp32 != bf16  # autocast did run in bf16
    assert results[1].final_val_loss == pytest.approx(results[0].final_val_loss, rel=2e-2)


def test_config_is_asdict_able():
    cfg = TrainConfig(grad_clip=None, n_loops=4)
    assert TrainConfig(**dataclasses.asdict(cfg)) == cfg
    assert TrainConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)


def test_interrupt_reaches_on_train_end_and_reraises():
    reasons = []

    class Interrupt(TrainCallback):
        def after_step(self, state: TrainState) -> None:
            if state.step == 2:
                raise KeyboardInterrupt

        def on_train_end(self, state: TrainState) -> None:
            reasons.append(state.stop_reason)

    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), next_token_batches, val_set(), config(), callbacks=[Interrupt()])
    assert reasons == ["interrupted (KeyboardInterrupt)"]


def test_task_batches_share_validation_across_seeds():
    task = AdditionTask(n_digits=2)
    source, val = task_batches(task, config(seed=0))
    _, val_other_seed = task_batches(task, config(seed=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, val_other_seed)) and len(val) == 2
    torch.manual_seed(0)
    model = TinyLooped(TinyConfig(vocab_size=128))
    result = train(model, source, val, config(steps=3))
    assert result.steps_done == 3 and math.isfinite(result.final_val_loss)


def test_task_training_stream_does_not_replay_the_validation_examples():
    task = AdditionTask(n_digits=3)
    source, val = task_batches(task, config(seed=0))
    first_train, _ = source(torch.Generator().manual_seed(0))  # the trainer seeds with cfg.seed
    assert not torch.equal(first_train, val[0][0])


def test_corpus_batches_train_a_real_flt_model():
    try:
        from loopdiag.models import ModelConfig, build_model
    except ImportError:
        pytest.skip("loopdiag.models not available yet")
    generator = torch.Generator().manual_seed(0)
    train_tokens, val_tokens = (torch.randint(0, 256, (n,), generator=generator, dtype=torch.uint8)
                                for n in (2000, 500))
    corpus = TokenCorpus(train_tokens, val_tokens, "random bytes", "", 2500)
    cfg = config(steps=5, optimizer="muon", eval_every=0)
    source, val = corpus_batches(corpus, cfg, seq_len=SEQ)
    assert len(val) == cfg.eval_batches and val[0][0].shape == (BATCH, SEQ)
    torch.manual_seed(0)
    model = build_model("flt", ModelConfig(d_model=32, n_heads=2, n_layers=1, n_loops=2,
                                           seq_len=SEQ))
    result = train(model, source, val, cfg)
    assert not result.diverged and result.steps_done == 5
    assert math.isfinite(result.final_val_loss)


def test_checkpoint_is_readable_by_the_group_like_the_run_store(tmp_path):
    """A shared cluster group reads the run folders: the checkpoint takes the umask's
    permissions, as the store's files do, not a temp file's 0600."""
    old_umask = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "checkpoint.pt", nn.Linear(2, 2), [], step=1, extra={})
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "checkpoint.pt").stat().st_mode) == 0o644
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left
