"""The loop recorder, checked against naive references: plain hooks that keep every loop
output, autograd's own gradients, explicit Gram matrices and attention, numpy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from loopdiag import probes
from loopdiag.models import ModelConfig, build_model, norm
from loopdiag.models.layers import Attention
from loopdiag.probes.stats import group_name, window_stats
from loopdiag.train import TrainConfig, train

D, T, B = 32, 16, 2
APPROX = dict(rel=1e-4, abs=1e-6, nan_ok=True)


def tiny(arch: str, n_loops: int, **overrides) -> nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(d_model=D, n_heads=2, seq_len=T, n_loops=n_loops, zero_init_out=False)
    return build_model(arch, config, **overrides)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))
    return idx, idx.roll(-1, dims=1)


class Outputs:
    """A plain forward hook keeping every output of a module: the reference."""

    def __init__(self, module: nn.Module):
        self.tensors: list[torch.Tensor] = []
        self.handle = module.register_forward_hook(lambda m, args, out: self.tensors.append(out))


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class UserLooped(nn.Module):
    """What a user writes: an embedding, one shared block applied n times, a head."""

    def __init__(self, block: str = "mlp", n_loops: int = 3, checkpointed: str | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.n_loops, self.checkpointed = n_loops, checkpointed
        self.embed = nn.Embedding(256, D)
        self.block = (nn.TransformerEncoderLayer(D, 2, 2 * D, dropout=0.0, batch_first=True)
                      if block == "encoder" else ResidualMLP())
        self.head = nn.Linear(D, 256)

    def forward(self, idx, targets=None, n_loops=None):
        x = self.embed(idx)
        for _ in range(n_loops or self.n_loops):
            if self.checkpointed:
                x = checkpoint(self.block, x, use_reentrant=self.checkpointed == "reentrant")
            else:
                x = self.block(x)
        logits = self.head(x)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def by_hand(outputs: list[torch.Tensor]) -> dict[str, list[float]]:
    outputs = [o.detach() for o in outputs]
    off_diagonal = ~torch.eye(outputs[0].size(1), dtype=torch.bool)
    corr = []
    for o in outputs:
        unit = F.normalize(o, dim=-1)
        corr.append((unit @ unit.transpose(1, 2))[:, off_diagonal].mean().item())  # explicit Gram
    return {
        "resid_norm": [o.norm(dim=-1).mean().item() for o in outputs],
        "rel_update": [math.nan] + [((b - a).norm(dim=-1) / b.norm(dim=-1)).mean().item()
                                    for a, b in zip(outputs, outputs[1:])],
        "token_corr": corr,
    }


def one_step(model, rec, ref: Outputs, step: int = 0, seed: int = 0):
    """Forward, autograd.grad on the loop outputs (reference), backward, record."""
    _, loss = model(*batch(seed))
    outs = [o for o in ref.tensors if o.requires_grad]
    grads = torch.autograd.grad(loss, outs, retain_graph=True) if outs else []
    loss.backward()
    rec.after_backward()
    record = rec.end_step(step, loss=loss)
    assert record["loss"] == pytest.approx(loss.item(), nan_ok=True)
    return record, [g.norm().item() for g in grads]


def assert_matches(record, outputs, grad_norms):
    assert record["n_loops"] == len(outputs)
    for stat, expected in by_hand(outputs).items():
        assert record[stat] == pytest.approx(expected, **APPROX), stat
    assert record["act_grad_norm"] == pytest.approx(grad_norms, **APPROX)


@pytest.mark.parametrize("arch,n_loops", [("looped", 1), ("looped", 4), ("looped", 12), ("flt", 1),
                                          ("flt", 4), ("flt", 12), ("looped-inject", 4),
                                          ("looped-scaled", 4), ("flt-res", 4), ("flt-ai1", 4),
                                          ("recurrent-depth", 4), ("standard", 4)])
def test_reference_models_match_by_hand(arch, n_loops):
    model = tiny(arch, n_loops)
    rec, ref = probes.attach(model), Outputs(model.loop_out)
    record, grad_norms = one_step(model, rec, ref)
    assert_matches(record, ref.tensors, grad_norms)
    assert len(record["resid_norm"]) == n_loops
    named = dict(model.named_parameters())
    assert record["grad_norm"] == pytest.approx(
        torch.nn.utils.get_total_norm([p.grad for p in named.values()]).item(), rel=1e-5)
    groups = [key.removeprefix("grad_norm/") for key in record if key.startswith("grad_norm/")]
    shared = "core" if arch == "recurrent-depth" else "blocks"
    assert {f"{shared}.0.attn", f"{shared}.0.mlp", "wte", "lm_head"} <= set(groups)
    for group in groups:
        members = torch.cat([p.grad.flatten() for name, p in named.items() if name.startswith(group + ".")])
        assert record[f"grad_norm/{group}"] == pytest.approx(members.norm().item(), rel=1e-5)


@pytest.mark.parametrize("block", ["encoder", "mlp"])
@pytest.mark.parametrize("by_name", [True, False], ids=["name", "module"])
def test_user_model(block, by_name):
    model = UserLooped(block)
    rec = probes.attach(model, "block" if by_name else model.block)
    ref = Outputs(model.block)
    record, grad_norms = one_step(model, rec, ref)
    assert_matches(record, ref.tensors, grad_norms)
    assert record["shared_grad_norm"] == pytest.approx(
        torch.cat([p.grad.flatten() for p in model.block.parameters()]).norm().item(), rel=1e-5)


def test_loop_count_changes_and_micro_batches_average():
    model = UserLooped()
    rec, ref = probes.attach(model, "block"), Outputs(model.block)
    _, loss = model(*batch(), n_loops=3)
    loss.backward()
    assert rec.end_step(0)["n_loops"] == 3
    # step 1: two micro-batches with 2 and 4 loops; each loop averages the forwards reaching it
    expected, grad_norms = [], []
    for seed, n_loops in ((1, 2), (2, 4)):
        ref.tensors.clear()
        _, loss = model(*batch(seed), n_loops=n_loops)
        grad_norms.append([g.norm().item() for g in torch.autograd.grad(loss, ref.tensors, retain_graph=True)])
        (loss / 2).backward()  # (scaling the loss scales act_grad_norm alike)
        expected.append(by_hand(ref.tensors)["resid_norm"])
    record = rec.end_step(1)
    assert record["n_loops"] == 4
    assert record["resid_norm"] == pytest.approx(
        [(expected[0][0] + expected[1][0]) / 2, (expected[0][1] + expected[1][1]) / 2, *expected[1][2:]], **APPROX)
    halved = [[g / 2 for g in norms] for norms in grad_norms]
    assert record["act_grad_norm"] == pytest.approx(
        [(halved[0][0] + halved[1][0]) / 2, (halved[0][1] + halved[1][1]) / 2, *halved[1][2:]], **APPROX)


def test_eval_no_grad_records_forward_stats_only():
    model = tiny("looped", 3)
    rec, ref = probes.attach(model), Outputs(model.loop_out)
    model.eval()
    with torch.no_grad():
        model(batch()[0])
    record = rec.end_step(0)
    assert record["resid_norm"] == pytest.approx(by_hand(ref.tensors)["resid_norm"], **APPROX)
    assert not any(key.startswith(("act_grad", "grad_", "update")) for key in record)
    # a step with a gradient-enabled forward ignores the no-grad ones (evaluation batches)
    model.train()
    with torch.no_grad():
        model(batch(5)[0])
    ref.tensors.clear()
    record, grad_norms = one_step(model, rec, ref, step=1)
    assert_matches(record, ref.tensors, grad_norms)


def test_truncated_backprop_loops_have_nan_act_grad():
    model = tiny("recurrent-depth", 4, backprop_loops=2)
    rec, ref = probes.attach(model), Outputs(model.loop_out)
    record, grad_norms = one_step(model, rec, ref)
    assert all(math.isnan(v) for v in record["act_grad_norm"][:2])
    assert record["act_grad_norm"][2:] == pytest.approx(grad_norms, **APPROX)
    assert record["resid_norm"] == pytest.approx(by_hand(ref.tensors)["resid_norm"], **APPROX)


@pytest.mark.parametrize("flavour", ["non-reentrant", "reentrant"])
def test_checkpoint_recomputation_adds_no_loops(flavour):
    model = UserLooped(n_loops=3, checkpointed=flavour)
    rec, ref = probes.attach(model, "block"), Outputs(model.block)
    with set_checkpoint_early_stop(False):  # recompute whole blocks, so their hooks fire
        _, loss = model(*batch())
        forward_outputs = list(ref.tensors)
        grads = (torch.autograd.grad(loss, forward_outputs, retain_graph=True)
                 if flavour == "non-reentrant" else [])
        loss.backward()
    assert len(ref.tensors) > 3  # recomputation did call the block again, during backward
    record = rec.end_step(0)
    assert record["n_loops"] == 3
    assert record["resid_norm"] == pytest.approx(by_hand(forward_outputs)["resid_norm"], **APPROX)
    if flavour == "non-reentrant":
        assert record["act_grad_norm"] == pytest.approx([g.norm().item() for g in grads], **APPROX)
    else:  # reentrant checkpointing runs the forward under no_grad: no gradient to hook
        assert "act_grad_norm" not in record


def hooks_left(model: nn.Module) -> int:
    return sum(len(getattr(m, name)) for m in model.modules() for name in
               ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called", "_backward_hooks"))


def test_detach_leaves_no_hooks():
    model = tiny("flt", 3)
    with probes.attach(model, stats="full", costly_every=1) as rec:
        ref = Outputs(model.loop_out)
        model(*batch())
        ref.handle.remove()
        assert all(o._backward_hooks for o in ref.tensors)
    assert hooks_left(model) == 0
    assert not any(o._backward_hooks for o in ref.tensors)
    ref = Outputs(model.loop_out)
    model(*batch())
    assert not any(o._backward_hooks for o in ref.tensors)
    with pytest.raises(RuntimeError, match="detached"):
        rec.end_step(0)


def test_unlogged_steps_record_nothing():
    model = tiny("looped", 3)
    rec, ref = probes.attach(model, log_every=3), Outputs(model.loop_out)
    logged = []
    for step in range(6):
        ref.tensors.clear()
        _, loss = model(*batch(step))
        assert all(bool(o._backward_hooks) == (step % 3 == 0) for o in ref.tensors)
        loss.backward()
        rec.after_backward()
        logged.append(rec.end_step(step, loss=loss) is not None)
        model.zero_grad()
    assert logged == [True, False, False, True, False, False]
    assert [r["step"] for r in rec.records] == [0, 3]


def flat_grad(params) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in params])


def test_gradient_oscillation_by_hand():
    model = tiny("looped", 2)
    shared = model.shared_parameters()
    rec = probes.attach(model, log_every=2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # large steps: gradients swing
    grads = []
    for step in range(3):
        _, loss = model(*batch(step))
        loss.backward()
        grads.append(flat_grad(shared).clone())
        rec.after_backward()
        opt.step()
        opt.zero_grad()
        rec.end_step(step, loss=loss)
    first, third = rec.records
    assert "grad_cos" not in first and "sign_flip" not in first
    previous, current = grads[1], grads[2]
    both = (previous != 0) & (current != 0)
    assert third["grad_cos"] == pytest.approx(F.cosine_similarity(current, previous, dim=0).item(), rel=1e-5)
    assert third["sign_flip"] == pytest.approx(
        (torch.sign(current) != torch.sign(previous))[both].float().mean().item(), rel=1e-6)
    assert 0 < third["sign_flip"] < 1
    assert third["shared_grad_norm"] == pytest.approx(current.norm().item(), rel=1e-5)


def numpy_window(norms) -> tuple[float, float]:
    norms = np.asarray(norms)
    increments = np.diff(norms)
    centred = increments - increments.mean()
    acf = np.correlate(centred, centred, mode="full")[len(centred) - 1:]
    return norms.std() / norms.mean(), acf[1] / acf[0]


@pytest.mark.parametrize("log_every", [1, 3])
def test_window_stats_match_numpy(log_every):
    model = tiny("looped", 2)
    rec = probes.attach(model, window=4, log_every=log_every)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    norms = []
    for step in range(10):
        model(*batch(step))[1].backward()
        norms.append(flat_grad(model.shared_parameters()).norm().item())
        rec.after_backward()
        opt.step()
        opt.zero_grad()
        record = rec.end_step(step)
        if record is None:
            continue
        assert record["shared_grad_norm"] == pytest.approx(norms[-1], rel=1e-5)
        if step < 3:
            assert "gnorm_cv" not in record
            continue
        cv, autocorr = numpy_window(norms[-4:])  # unlogged steps count too
        assert record["gnorm_cv"] == pytest.approx(cv, rel=1e-4)
        assert record["gnorm_autocorr"] == pytest.approx(autocorr, rel=1e-4, abs=1e-6)
    if log_every == 1:  # the same, on the recorded series itself
        recorded = [r["shared_grad_norm"] for r in rec.records]
        assert rec.latest["gnorm_cv"] == pytest.approx(numpy_window(recorded[-4:])[0], rel=1e-6)



@pytest.mark.parametrize("seq_len", [64, 8192])
def test_token_corr_reads_identical_tokens_as_identical_at_any_context(seq_len):
    from loopdiag.probes.stats import finish_loop, reduce_loop_output

    def corr(x):
        sums = {k: v.item() if torch.is_tensor(v) else v for k, v in reduce_loop_output(x, None).items()}
        return finish_loop(sums)["token_corr"]

    g = torch.Generator().manual_seed(0)
    common = 7 * torch.randn(64, generator=g)
    identical = common.expand(2, seq_len, 64).contiguous()
    assert abs(1 - corr(identical)) < 1e-7  # the collapse threshold is 1e-5
    # 1 − token_corr ≈ 1e-6: below what a sum of 8k unit vectors resolves in float32
    nearly = identical + 7e-3 * torch.randn(2, seq_len, 64, generator=g)
    unit = F.normalize(nearly.double(), dim=-1)
    exact = 1 - (unit.sum(1).square().sum(-1) - seq_len).mean() / (seq_len * (seq_len - 1))
    assert 1 - corr(nearly) == pytest.approx(exact.item(), rel=0.01)


def test_window_autocorr_sign():
    assert window_stats([1.0, 2.0] * 8)[1] < -0.9  # zig-zag
    assert window_stats([float(i * i) for i in range(16)])[1] > 0.5  # smooth growth


def test_update_ratio_by_hand():
    model = tiny("flt", 2)
    rec = probes.attach(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(*batch())[1].backward()
    rec.after_backward()
    before = torch.cat([p.detach().flatten() for p in model.shared_parameters()]).clone()
    opt.step()
    after = torch.cat([p.detach().flatten() for p in model.shared_parameters()])
    record = rec.end_step(0)
    assert record["update_ratio"] == pytest.approx(((after - before).norm() / before.norm()).item(), rel=1e-4)


def test_nan_loss_is_recorded_as_nan():
    model = tiny("looped", 3)
    with torch.no_grad():
        model.blocks[0].mlp.c_fc.weight[0, 0] = math.nan
    rec, ref = probes.attach(model), Outputs(model.loop_out)
    record, _ = one_step(model, rec, ref)
    assert math.isnan(record["loss"]) and math.isnan(record["grad_norm"])
    assert all(math.isnan(v) for v in record["resid_norm"])
    rec.detach()
    # inside the trainer, the diverging step stops training before after_step: still recorded
    records = []
    train(model, lambda g: batch(), [], TrainConfig(steps=5, batch_size=B),
          callbacks=[probes.RecorderCallback(probes.attach(model), on_record=records.append)])
    assert [r["step"] for r in records] == [1] and math.isnan(records[0]["loss"])


def test_recorder_callback_in_train():
    model = tiny("looped", 3)
    rec = probes.attach(model, log_every=5)
    records = []
    cfg = TrainConfig(steps=20, batch_size=B, eval_every=4, eval_batches=1)
    source = lambda g: (lambda idx: (idx, idx.roll(-1, dims=1)))(torch.randint(0, 256, (B, T), generator=g))
    result = train(model, source, [batch(7)], cfg,
                   callbacks=[probes.RecorderCallback(rec, on_record=records.append)])
    # every 5th step, and the first: its update is where a learning rate too large shows
    assert records == rec.records and [r["step"] for r in records] == [1, 5, 10, 15, 20]
    for record in records:
        row = result.history[record["step"] - 1]
        assert record["loss"] == row["train_loss"] and record["grad_norm"] == row["grad_norm"]
        assert record["lr"] == row["lr"] and record["n_loops"] == 3
        assert "update_ratio" in record
    assert "grad_cos" not in records[0] and all("grad_cos" in record for record in records[1:])


def test_the_last_step_of_a_training_run_is_recorded_whatever_log_every():
    model = tiny("looped", 3)
    rec = probes.attach(model, log_every=5)
    source = lambda g: (lambda idx: (idx, idx.roll(-1, dims=1)))(torch.randint(0, 256, (B, T), generator=g))
    result = train(model, source, [], TrainConfig(steps=13, batch_size=B, eval_every=0),
                   callbacks=[probes.RecorderCallback(rec)])
    assert [r["step"] for r in rec.records] == [1, 5, 10, 13]
    last = rec.records[-1]
    # a full record: the loop statistics of its forward, and the cosine with step 12's gradient
    assert last["loss"] == result.history[-1]["train_loss"] and last["n_loops"] == 3
    assert len(last["resid_norm"]) == 3 and all(math.isfinite(v) for v in last["token_corr"])
    assert math.isfinite(last["grad_cos"])


@pytest.mark.parametrize("last_step", [-1, 2.0, True, "12"])
def test_a_last_step_that_is_no_step_number_is_refused(last_step):
    rec = probes.attach(tiny("looped", 2))
    with pytest.raises(ValueError, match="last_step"):
        rec.last_step = last_step


def test_a_run_that_diverges_between_logged_steps_records_the_step_it_diverged_at():
    model = tiny("looped", 2)
    forward, calls = model.forward, []

    def nan_at_step_7(*args, **kwargs):
        logits, loss = forward(*args, **kwargs)
        calls.append(1)
        return logits, loss * math.nan if len(calls) == 7 else loss
    model.forward = nan_at_step_7
    rec = probes.attach(model, log_every=5)
    source = lambda g: (lambda idx: (idx, idx.roll(-1, dims=1)))(torch.randint(0, 256, (B, T), generator=g))
    result = train(model, source, [], TrainConfig(steps=20, batch_size=B, eval_every=0),
                   callbacks=[probes.RecorderCallback(rec)])
    assert result.diverged_step == 7
    # the non-finite loss is in the records, where the detectors and the verdict read it
    assert [r["step"] for r in rec.records] == [1, 5, 7] and math.isnan(rec.records[-1]["loss"])


def test_a_resumed_recorder_logs_only_every_nth_step():
    model = tiny("looped", 2)
    first = probes.attach(model, log_every=4)
    for step in (1, 2):
        _, loss = model(*batch(step))
        loss.backward()
        first.after_backward()
        first.end_step(step, loss=loss)
        model.zero_grad()
    state = first.state_dict()
    first.detach()
    resumed = probes.attach(model, log_every=4)
    resumed.load_state_dict(state)
    for step in (3, 4, 5):
        resumed.begin_step(step)
        _, loss = model(*batch(step))
        loss.backward()
        resumed.after_backward()
        resumed.end_step(step, loss=loss)
        model.zero_grad()
    assert [r["step"] for r in first.records] == [1]
    assert [r["step"] for r in resumed.records] == [4]


def attention_by_hand(attn: Attention, x, query_source):
    """Explicit softmax attention; returns (output, entropy, max logit)."""
    batch_size, seq_len, d_model = x.shape
    split = (batch_size, seq_len, attn.n_heads, attn.head_dim)
    q = attn.c_q(x if query_source is None else query_source).view(split)
    k, v = attn.c_k(x).view(split), attn.c_v(x).view(split)
    q, k = attn.rotary(q), attn.rotary(k)
    q, k = (norm(q), norm(k)) if attn.qk_norm else (q, k)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1), -math.inf)
    probs = scores.softmax(dim=-1)
    out = attn.c_proj(torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch_size, seq_len, d_model))
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
    return out, entropy.item(), scores.max().item()


def test_costly_tier_attention_and_layers_by_hand():
    model = tiny("flt", 3)
    rec = probes.attach(model, stats="full", costly_every=2)
    calls = []
    for module in model.modules():
        if isinstance(module, Attention):
            module.register_forward_hook(lambda m, args, out: calls.append((m, *args, out)))
    layers = [Outputs(block) for block in model.blocks]
    ref = Outputs(model.loop_out)
    with torch.no_grad():
        model(*batch())
    record = rec.end_step(0)
    entropies, max_logits = [[], [], []], [[], [], []]
    for i, (attn, x, query_source, out) in enumerate(calls):
        by_hand_out, entropy, max_logit = attention_by_hand(attn, x, query_source)
        torch.testing.assert_close(by_hand_out, out)  # the by-hand logits are the module's
        entropies[i // 2].append(entropy)
        max_logits[i // 2].append(max_logit)
    assert record["attn_entropy"] == pytest.approx([np.mean(e) for e in entropies], rel=1e-4)
    assert record["attn_max_logit"] == pytest.approx([max(m) for m in max_logits], rel=1e-4)
    assert record["resid_norm/layer_01"] == pytest.approx(by_hand(layers[0].tensors)["resid_norm"], rel=1e-4)
    assert record["resid_norm/layer_02"] == pytest.approx(by_hand(ref.tensors)["resid_norm"], rel=1e-4)
    with torch.no_grad():
        model(*batch())
    assert "attn_entropy" not in rec.end_step(1)  # costly every 2nd logged step


@pytest.mark.parametrize("arch", ["looped", "flt"])
def test_bf16_per_loop_statistics_match_fp32(arch):
    records, outputs = [], []
    for bf16 in (False, True):
        model = tiny(arch, 4)
        rec, ref = probes.attach(model, stats="full", costly_every=1), Outputs(model.loop_out)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(*batch())
        loss.backward()
        rec.after_backward()
        records.append(rec.end_step(0, loss=loss))
        outputs.append(ref.tensors)
    fp32, bf16 = records
    assert bf16["loss"] != fp32["loss"]  # the forward did run in bf16
    for key in ("resid_norm", "rel_update", "token_corr", "act_grad_norm", "attn_entropy",
                "attn_max_logit", "resid_norm/layer_01"):
        # bf16 keeps 8 bits of mantissa: ~0.4% per rounding, a few roundings per loop
        assert bf16[key] == pytest.approx(fp32[key], rel=3e-2, abs=1e-2, nan_ok=True), key
    # the bf16 forward's own loop outputs, reduced in fp32 by hand: the recorder's sums are fp32
    for stat, expected in by_hand([o.float() for o in outputs[1]]).items():
        assert bf16[stat] == pytest.approx(expected, **APPROX), stat


def train_steps(model, forward, rec, steps: int = 3) -> list[dict]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        _, loss = forward(*batch(step))
        loss.backward()
        rec.after_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rec.end_step(step, loss=loss)
    return rec.records


@pytest.mark.slow  # compiling forward and backward takes ~10 s on CPU
def test_compiled_model_records_per_loop_statistics_without_graph_breaks():
    torch._dynamo.reset()
    eager = train_steps(model := tiny("flt", 2), model, probes.attach(model))
    model = tiny("flt", 2)
    rec = probes.attach(model, log_every=2)  # logged and unlogged steps: one graph each
    # fullgraph=True: a graph break (one per loop, from a hook) raises instead of falling back
    compiled = train_steps(model, torch.compile(model, backend="aot_eager", fullgraph=True), rec)
    assert [r["step"] for r in compiled] == [0, 2]
    for record, expected in zip(compiled, eager[::2]):
        assert "act_grad_norm" not in record  # its tensor hook would break the graph
        assert len(record["resid_norm"]) == 2
        for key in ("resid_norm", "rel_update", "token_corr", "grad_norm", "shared_grad_norm", "update_ratio"):
            assert record[key] == pytest.approx(expected[key], **APPROX), key
    assert compiled[1]["resid_norm"] != compiled[0]["resid_norm"]  # per loop, from this step's forward


def test_full_stats_on_user_model_skip_costly_tier():
    model = UserLooped("encoder")
    rec, ref = probes.attach(model, "block", stats="full", costly_every=1), Outputs(model.block)
    record, grad_norms = one_step(model, rec, ref)
    assert_matches(record, ref.tensors, grad_norms)
    assert not any(key.startswith("attn_") for key in record)


def test_flatten_and_frames():
    model = tiny("looped", 2)
    rec = probes.attach(model)
    for step in range(2):
        _, loss = model(*batch(step))
        loss.backward()
        rec.after_backward()
        rec.end_step(step, loss=loss, lr=0.1)
        model.zero_grad()
    flat = probes.flatten_record(rec.latest)
    assert flat["resid_norm/loop_02"] == rec.latest["resid_norm"][1]
    assert flat["grad_norm/blocks.1.mlp"] == rec.latest["grad_norm/blocks.1.mlp"]
    assert not any(isinstance(v, list) for v in flat.values())
    frame = rec.frame()
    assert list(frame["step"]) == [0, 1] and "act_grad_norm/loop_01" in frame
    long = rec.loop_frame()
    assert list(long.columns) == ["step", "loop", "stat", "value"]
    row = long[(long.step == 1) & (long.loop == 2) & (long.stat == "token_corr")]
    assert row["value"].item() == rec.latest["token_corr"][1]


def test_group_names():
    assert group_name("blocks.0.attn.c_q.weight") == "blocks.0.attn"
    assert group_name("encoder.layer.3.attention.self.query.weight") == "encoder.layer.3.attention"
    assert group_name("block.self_attn.out_proj.weight") == "block.self_attn"
    assert group_name("wte.weight") == "wte" and group_name("scale") == "scale"


@pytest.mark.parametrize("arch,shared", [("looped", "blocks"), ("flt", "blocks"),
                                         ("recurrent-depth", "core"), ("standard", "blocks")])
def test_shared_parameters(arch, shared):
    model = tiny(arch, 2)
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in getattr(model, shared).parameters()}


@pytest.mark.parametrize("kwargs,match", [
    (dict(stats="everything"), "stats"), (dict(log_every=0), "log_every"),
    (dict(costly_every=True), "costly_every"), (dict(window=2), "window"),
    (dict(loop_module="blokc"), "block"), (dict(loop_module=nn.Linear(2, 2)), "not a submodule"),
    (dict(loop_module=3), "loop_module"), (dict(shared_params=nn.Linear(2, 2).parameters()), "shared_params"),
    (dict(loops=0), "loops"), (dict(loops=3.0), "loops"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        probes.attach(UserLooped(), **{"loop_module": "block", **kwargs})


def test_a_loop_module_outside_the_loop_is_named_once_when_loops_is_given():
    model = UserLooped(n_loops=3)
    rec = probes.attach(model, "embed", loops=3)  # runs once per forward, before the loop
    with pytest.warns(UserWarning, match=r"step 0: loop_module \(Embedding\) ran once per forward.*loops=3"):
        model(*batch())[1].backward()
        assert rec.end_step(0)["n_loops"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(*batch())[1].backward()
        rec.end_step(1)  # said once
        rec.detach()
        rec = probes.attach(model, "block", loops=3)
        model(*batch())[1].backward()
        assert rec.end_step(0)["n_loops"] == 3
    with pytest.warns(UserWarning, match=r"step 1: loop_module \(ResidualMLP\) ran 2 times, not loops=3"):
        model(*batch(), n_loops=2)[1].backward()
        rec.end_step(1)


class SharedNormBlock(nn.Module):
    """One loop of a block that applies one small norm twice: no loop inside it."""

    def __init__(self):
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(D), ResidualMLP()

    def forward(self, x):
        return self.norm(self.mlp(self.norm(x)))


def test_a_loop_module_holding_the_loop_is_named_with_the_module_to_pass_instead():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = ResidualMLP()

        def forward(self, x):
            for _ in range(3):
                x = self.block(x)
            return x

    model = UserLooped(n_loops=1)
    model.block = Encoder()  # one call of "block" runs the whole loop
    rec = probes.attach(model, "block")
    with pytest.warns(UserWarning, match=r"'block.block' inside it ran 3 times.*loop_module='block.block'") as said:
        model(*batch())[1].backward()
        model(*batch(1))[1].backward()
    assert len(said) == 1  # the first forward only
    assert said[0].filename == __file__  # the forward's line, not torch's module call
    assert rec.end_step(0)["n_loops"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec.detach()
        probes.attach(model, "block.block")  # the right module: nothing to say
        model(*batch())[1].backward()
        shared = UserLooped(n_loops=1)
        shared.block = SharedNormBlock()  # a small module applied twice is no loop
        probes.attach(shared, "block")
        shared(*batch())[1].backward()


def test_a_loop_module_outside_the_loop_is_named_with_the_module_to_pass_instead():
    model = UserLooped(n_loops=3)
    for outside in ("embed", "head"):
        rec = probes.attach(model, outside)
        with pytest.warns(UserWarning, match=rf"loop_module '{outside}' ran once.*'block' ran 3 times.*"
                                             r"loop_module='block'"):
            model(*batch())[1].backward()
        assert rec.end_step(0)["n_loops"] == 1
        rec.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_loop = UserLooped(n_loops=1)  # nothing repeats: a one-loop model
        probes.attach(one_loop, "embed")
        one_loop(*batch())[1].backward()
        small = UserLooped(n_loops=2)
        small.embed = nn.Embedding(256, D * 8)  # 2 calls apply fewer weights than the named module's one
        small.block = nn.Sequential(nn.Linear(D * 8, D), nn.Linear(D, D * 8))
        small.head = nn.Linear(D * 8, 256)
        probes.attach(small, "embed")
        small(*batch())[1].backward()
        marked = UserLooped(n_loops=1)
        marked.block = nn.Sequential(ResidualMLP(), nn.Identity())  # a weightless marker, one loop
        probes.attach(marked, "block.1")
        marked(*batch())[1].backward()
    # a weightless marker after the loop, or an embedding larger than the loop's work, once
    # the loop applies half the model's weights
    marked = UserLooped(n_loops=3)
    marked.head = nn.Sequential(nn.Identity(), nn.Linear(D, 256))
    large = UserLooped(n_loops=40)
    large.embed = nn.Embedding(8192, D)  # 40 calls of the block apply fewer weights than it holds
    for model, named, calls in ((marked, "head.0", 3), (large, "embed", 40)):
        probes.attach(model, named)
        with pytest.warns(UserWarning, match=rf"'{named}' ran once.*'block' ran {calls} times"):
            model(*batch())[1].backward()


def test_missing_hook_point_names_what_to_pass():
    model = UserLooped()
    with pytest.raises(ValueError, match="loop_module=.*block"):
        probes.attach(model)
    for itself in (model, ""):
        with pytest.raises(ValueError, match="itself"):
            probes.attach(model, itself)


class ReturnsMapping(nn.Module):
    """A Hugging Face-style layer: the hidden state in a `ModelOutput`-like mapping."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return {"hidden_states": self.block(x), "attentions": None}


class UserLoopedMapping(UserLooped):
    def __init__(self):
        super().__init__()
        self.layer = ReturnsMapping(self.block)

    def forward(self, idx, targets=None):
        x = self.embed(idx)
        for _ in range(self.n_loops):
            x = self.layer(x)["hidden_states"]
        logits = self.head(x)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_a_loop_module_returning_a_mapping_is_read_by_its_first_value():
    model = UserLoopedMapping()
    rec, ref = probes.attach(model, "layer", loops=3), Outputs(model.block)
    record, grad_norms = one_step(model, rec, ref)
    assert_matches(record, ref.tensors, grad_norms)


class UserLoopedFlatRows(UserLooped):
    """A loop over the batch's tokens flattened into rows (B·T, d)."""

    def forward(self, idx, targets=None):
        x = self.embed(idx).flatten(0, 1)
        for _ in range(self.n_loops):
            x = self.block(x)
        logits = self.head(x.view(*idx.shape, -1))
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class UserLoopedFlatRowsWithPositions(UserLoopedFlatRows):
    def forward(self, positions, idx, targets=None):  # position ids (1, T) come first
        return super().forward(idx, targets)


def test_a_loop_over_flattened_rows_is_read_as_the_inputs_sequences():
    model = UserLoopedFlatRows()
    rec, ref = probes.attach(model, "block", loops=3), Outputs(model.block)
    record, grad_norms = one_step(model, rec, ref)
    assert_matches(record, [o.view(B, T, D) for o in ref.tensors], grad_norms)
    model = UserLoopedFlatRowsWithPositions()
    rec, ref = probes.attach(model, "block", loops=3), Outputs(model.block)
    model(torch.arange(T)[None], *batch())[1].backward()
    expected = by_hand([o.view(B, T, D) for o in ref.tensors])["token_corr"]
    assert rec.end_step(0)["token_corr"] == pytest.approx(expected, **APPROX)


class UserLoopedPacked(UserLooped):
    """A per-token loop over a packed row (1, N): sequences laid end to end, told apart by
    position ids that restart, as Hugging Face's `DataCollatorWithFlattening` passes them."""

    def forward(self, idx, position_ids=None):
        x = self.embed(idx)
        for _ in range(self.n_loops):
            x = self.block(x)
        return self.head(x).square().mean()


def packed(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, position_ids), each (1, N), of `sequences` laid end to end."""
    return (torch.cat(sequences)[None],
            torch.cat([torch.arange(len(sequence)) for sequence in sequences])[None])


def packed_record(sequences: list[torch.Tensor], **kwargs) -> tuple[dict, list[torch.Tensor]]:
    model = UserLoopedPacked()
    rec, ref = probes.attach(model, "block", loops=3), Outputs(model.block)
    ids, positions = packed(sequences)
    model(ids, **({"position_ids": positions} | kwargs)).backward()
    return rec.end_step(0), ref.tensors


def test_a_packed_batch_is_read_as_its_sequences():
    idx = batch()[0]
    record, outputs = packed_record(list(idx))
    # each loop's output per token as batched: the statistics of the B sequences of T tokens
    expected = by_hand([o.view(B, T, D) for o in outputs])
    for stat in ("resid_norm", "rel_update", "token_corr"):
        assert record[stat] == pytest.approx(expected[stat], **APPROX), stat
    # sequences of unequal length count by their pairs of distinct tokens, T − 1 each
    lengths = [3, T, 17, 1]
    sequences = list(torch.randint(0, 256, (sum(lengths),), generator=torch.Generator().manual_seed(1))
                     .split(lengths))
    record, outputs = packed_record(sequences)
    for loop, output in enumerate(outputs):
        parts = output[0].detach().split(lengths)
        one_minus = [(len(p) - 1) * (1 - by_hand([p[None]])["token_corr"][0]) for p in parts if len(p) > 1]
        assert record["token_corr"][loop] == pytest.approx(1 - sum(one_minus) / (sum(lengths) - len(lengths)),
                                                           rel=1e-5)


def test_a_packed_batch_whose_sequences_each_collapsed_reads_collapsed():
    # every position of a sequence holds the same token; the sequences differ
    sequences = [torch.full((T,), token) for token in (3, 70, 200)]
    assert packed_record(sequences)[0]["token_corr"] == pytest.approx([1.0] * 3, abs=1e-6)
    # read as one sequence, the same positions look far from collapsed
    unpacked = packed_record(sequences, position_ids=None)[0]["token_corr"]
    assert max(unpacked) < 0.9
    # position ids (1, T) broadcast over a batch of several rows do not pack it
    idx = batch()[0]
    model = UserLoopedPacked()
    rec = probes.attach(model, "block", loops=3)
    for positions in (None, torch.tensor([0, 1, 2, 0, 1, 2, 3, 0] * (T // 8))[None]):
        model(idx, position_ids=positions).backward()
        rec.after_backward()
        rec.end_step(0 if positions is None else 1)
    assert rec.records[1]["token_corr"] == rec.records[0]["token_corr"]
    # position ids that never restart, or not integers, leave it one sequence
    ids, positions = packed(sequences)
    arange = torch.arange(ids.size(1))[None]
    assert packed_record(sequences, position_ids=arange)[0]["token_corr"] == pytest.approx(unpacked, rel=1e-5)
    assert packed_record(sequences, position_ids=positions.float())[0]["token_corr"] == unpacked


def test_position_ids_passed_by_position_mark_a_packed_batch():
    sequences = [torch.full((T,), token) for token in (3, 70, 200)]
    ids, positions = packed(sequences)
    model = UserLoopedPacked()
    rec = probes.attach(model, "block", loops=3)
    model(ids, positions).backward()
    assert rec.end_step(0)["token_corr"] == pytest.approx([1.0] * 3, abs=1e-6)


class PooledLoop(nn.Module):
    """A loop over one pooled vector (D,): no token axis for the loop statistics."""

    def __init__(self):
        super().__init__()
        self.embed, self.cell = nn.Embedding(256, D), nn.Linear(D, D)

    def forward(self, idx):
        h = self.embed(idx).mean(dim=(0, 1))
        for _ in range(3):
            h = self.cell(h)
        return h.sum()


def test_a_loop_output_without_tokens_and_features_is_refused_naming_its_shape():
    model = PooledLoop()
    with probes.attach(model, "cell"), pytest.raises(
            ValueError, match=rf"tensor of shape \({D},\); the recorder needs one of \(\.\.\., tokens"):
        model(batch()[0])


def test_a_loop_count_warning_points_at_the_callers_line():
    model = UserLooped(n_loops=3)
    rec = probes.attach(model, "block", loops=4)
    model(*batch())[1].backward()
    with pytest.warns(UserWarning, match="ran 3 times, not loops=4") as caught:
        rec.end_step(0)
    assert caught[0].filename == __file__


def test_after_backward_per_micro_batch_is_named_once_and_only_its_last_call_counts():
    def train(per_micro_batch: bool) -> list[dict]:
        model = UserLooped(n_loops=3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        rec = probes.attach(model, "block", window=4)
        for step in range(6):
            for seed in range(3):  # gradient accumulation
                model(*batch(3 * step + seed))[1].backward()
                if per_micro_batch:
                    rec.after_backward()
            if not per_micro_batch:
                rec.after_backward()
            optimizer.step()
            optimizer.zero_grad()
            rec.end_step(step)
        return rec.records

    with pytest.warns(UserWarning, match=r"after_backward\(\) ran twice in one step: only its last call") as said:
        misplaced = train(per_micro_batch=True)
    assert len(said) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per step: nothing to say
        placed = train(per_micro_batch=False)
    for keys in ("grad_norm", "gnorm_cv", "gnorm_autocorr", "grad_cos", "shared_grad_norm"):
        assert [r.get(keys) for r in misplaced] == pytest.approx([r.get(keys) for r in placed], nan_ok=True), keys
