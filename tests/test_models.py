"""The architectures of docs/design.md §2, pinned down by behaviour and by a hand-unrolled reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from loopdiag.models import ARCHITECTURES, ModelConfig, build_model, norm

SMALL = ModelConfig(d_model=32, n_heads=2, n_layers=2, seq_len=16, zero_init_out=False)
TIED_SAME_PARAMS = ["looped", "looped-inject", "looped-scaled", "flt-res", "flt-ai1", "flt"]


def tokens(seed: int = 0, batch: int = 2, seq_len: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def seeded_logits(model, idx, n_loops=None, seed=0):
    torch.manual_seed(seed)  # recurrent-depth draws its initial state
    return model(idx, n_loops=n_loops)[0]


def test_parameter_free_fixes_add_no_parameters():
    counts = {arch: build_model(arch, SMALL).num_params() for arch in TIED_SAME_PARAMS}
    assert len(set(counts.values())) == 1, counts
    assert build_model("standard", SMALL, n_loops=3).num_params() > counts["looped"]


@pytest.mark.parametrize("arch", ["looped-inject", "looped-scaled", "flt-res", "flt-ai1", "flt", "standard"])
def test_one_loop_is_a_plain_transformer(arch):
    cfg = SMALL.with_(n_loops=1)
    reference = build_model("looped", cfg)
    model = build_model(arch, cfg)
    model.load_state_dict(reference.state_dict())
    idx = tokens()
    torch.testing.assert_close(model(idx)[0], reference(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("n_loops", [1, 4, 12], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_causal_at_every_loop_count(arch, n_loops):
    model = build_model(arch, SMALL, n_loops=n_loops).eval()
    idx = tokens(seq_len=12)
    changed = idx.clone()
    j = 7
    changed[:, j] = (changed[:, j] + 1) % 256
    before, after = seeded_logits(model, idx), seeded_logits(model, changed)
    torch.testing.assert_close(before[:, :j], after[:, :j], rtol=0, atol=1e-5)
    assert not torch.allclose(before[:, j:], after[:, j:])


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_outputs_finite_up_to_twelve_loops(arch):
    idx = tokens()
    for n_loops in range(1, 13):
        model = build_model(arch, SMALL, n_loops=n_loops)
        logits, loss = model(idx, targets=idx)
        assert torch.isfinite(logits).all() and torch.isfinite(loss), (arch, n_loops)


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "standard"])
def test_loop_count_is_a_forward_argument(arch):
    model = build_model(arch, SMALL, n_loops=4).eval()
    calls = []
    handle = model.loop_out.register_forward_hook(lambda mod, inp, out: calls.append(out.shape))
    try:
        for n_loops in (1, 4, 9):
            calls.clear()
            seeded_logits(model, tokens(), n_loops=n_loops)
            assert len(calls) == n_loops
            assert all(shape == (2, 12, SMALL.d_model) for shape in calls)
    finally:
        handle.remove()


def test_standard_depth_is_fixed_and_hook_fires_per_group():
    model = build_model("standard", SMALL, n_loops=3)
    calls = []
    handle = model.loop_out.register_forward_hook(lambda mod, inp, out: calls.append(1))
    model(tokens())
    handle.remove()
    assert len(calls) == 3
    with pytest.raises(ValueError, match="not looped"):
        model(tokens(), n_loops=5)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_loop_count_rejected(bad):
    with pytest.raises(ValueError, match="n_loops"):
        build_model("flt", SMALL)(tokens(), n_loops=bad)


def test_sequence_longer_than_config_rejected():
    with pytest.raises(ValueError, match="seq_len"):
        build_model("flt", SMALL)(tokens(seq_len=SMALL.seq_len + 1))


def replace_loop_output(model, loop_index: int, transform):
    """Forward hook that transforms x_L at one loop (0-based), as an intervention."""
    state = {"calls": 0}

    def hook(module, inputs, output):
        state["calls"] += 1
        return transform(output) if state["calls"] == loop_index + 1 else output

    return model.loop_out.register_forward_hook(hook)


def run_with(model, idx, loop_index, transform):
    handle = replace_loop_output(model, loop_index, transform)
    try:
        return model(idx)[0]
    finally:
        handle.remove()


def test_attention_injection_queries_come_from_previous_loop():
    model = build_model("flt", SMALL, n_loops=2)
    idx = tokens()
    plain = model(idx)[0]
    scaled = run_with(model, idx, 0, lambda x: 1000 * x)
    torch.testing.assert_close(scaled, plain, rtol=1e-4, atol=1e-4)
    rotated = run_with(model, idx, 0, lambda x: x.roll(1, dims=-1))
    assert not torch.allclose(rotated, plain, atol=1e-3)


def test_scaling_previous_loop_matters_without_a_norm():
    """The scale test above has teeth: it fails for a stream that is not normalised."""
    model = build_model("looped", SMALL, n_loops=2, inter_loop_norm=False)
    idx = tokens()
    assert not torch.allclose(run_with(model, idx, 0, lambda x: 1000 * x), model(idx)[0], atol=1e-3)


def reference_attention(attn, x_kv, x_q):
    """Attention written out with an explicit softmax, for comparison with SDPA."""
    batch, seq_len, d = x_kv.shape
    heads, head_dim = attn.n_heads, attn.head_dim
    q = (x_q @ attn.c_q.weight.T).view(batch, seq_len, heads, head_dim)
    k = (x_kv @ attn.c_k.weight.T).view(batch, seq_len, heads, head_dim)
    v = (x_kv @ attn.c_v.weight.T).view(batch, seq_len, heads, head_dim)
    q, k = norm(attn.rotary(q)), norm(attn.rotary(k))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq_len, d)
    return out @ attn.c_proj.weight.T


def reference_block(block, x, h_prev=None):
    query_source = norm(x) if h_prev is None else norm(h_prev)
    x = x + reference_attention(block.attn, norm(x), query_source)
    return x + block.mlp.c_proj(F.relu(block.mlp.c_fc(norm(x))).square())


def reference_forward(model, idx, n_loops):
    """docs/design.md §2 unrolled by hand for the looped and FLT families."""
    e = model.wte(idx)
    arch, h = model.arch, None
    for t in range(n_loops):
        if arch in ("flt", "flt-ai1", "flt-res") or t == 0:
            x = norm(e)
        else:
            x = norm(e + h) if arch == "looped-inject" else h
        for layer, block in enumerate(model.blocks):
            if arch == "flt-res" and h is not None:
                x = norm(x + h)
            injected = arch == "flt" or (arch == "flt-ai1" and layer == 0)
            x = reference_block(block, x, h if injected and h is not None else None)
        h = norm(x)
    logits = model.lm_head(norm(x))
    return 15.0 * torch.tanh(logits / 15.0)


@pytest.mark.parametrize("arch", ["looped", "looped-inject", "flt-res", "flt-ai1", "flt"])
@pytest.mark.parametrize("n_loops", [1, 3], ids=lambda k: f"K{k}")
def test_matches_hand_unrolled_equations(arch, n_loops):
    model = build_model(arch, SMALL, n_loops=n_loops)
    idx = tokens()
    torch.testing.assert_close(model(idx)[0], reference_forward(model, idx, n_loops), rtol=1e-4, atol=1e-4)


def test_looped_scaled_branches_scaled_by_lambda_over_k():
    cfg = SMALL.with_(residual_lambda=2.0, n_loops=4)
    model = build_model("looped-scaled", cfg)
    block = model.blocks[0]
    seen = []
    handle = block.register_forward_hook(lambda mod, inp, out: seen.append((inp[0], out)))
    model(tokens())
    handle.remove()
    assert len(seen) == 4  # one call per loop
    for block_input, block_output in seen:
        mid = block_input + 0.5 * block.attn(norm(block_input))
        torch.testing.assert_close(block_output, mid + 0.5 * block.mlp(norm(mid)))


def test_zero_init_makes_every_loop_an_identity_at_start():
    model = build_model("looped", SMALL.with_(zero_init_out=True))
    idx = tokens()
    torch.testing.assert_close(model(idx, n_loops=1)[0], model(idx, n_loops=7)[0])


def test_logit_softcap_bounds_logits():
    model = build_model("flt", SMALL.with_(logit_softcap=2.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)
    assert model(tokens())[0].abs().max() <= 2.0
    uncapped = build_model("flt", SMALL.with_(logit_softcap=None))
    uncapped.load_state_dict(model.state_dict())
    assert uncapped(tokens())[0].abs().max() > 2.0


def test_loss_on_every_loop_is_the_mean_of_per_loop_losses():
    model = build_model("flt", SMALL.with_(loss_on="all", n_loops=3))
    idx = tokens()
    outputs = []
    handle = model.loop_out.register_forward_hook(lambda mod, inp, out: outputs.append(out))
    _, loss = model(idx, targets=idx)
    handle.remove()
    per_loop = [F.cross_entropy(model.logits(x).flatten(0, 1), idx.flatten()) for x in outputs]
    torch.testing.assert_close(loss, torch.stack(per_loop).mean())
    last_only = build_model("flt", SMALL.with_(n_loops=3))
    last_only.load_state_dict(model.state_dict())
    torch.testing.assert_close(last_only(idx, targets=idx)[1], per_loop[-1])


def test_ignored_targets_do_not_count():
    model = build_model("flt", SMALL)
    idx = tokens()
    targets = idx.clone()
    targets[:, :6] = -1
    logits, loss = model(idx, targets=targets)
    expected = F.cross_entropy(logits[:, 6:].flatten(0, 1), idx[:, 6:].flatten())
    torch.testing.assert_close(loss, expected)


def test_recurrent_depth_truncated_backprop():
    model = build_model("recurrent-depth", SMALL.with_(backprop_loops=2, n_loops=5))
    states = []
    handle = model.loop_out.register_forward_hook(lambda mod, inp, out: states.append(out.requires_grad))
    _, loss = model(tokens(), targets=tokens())
    handle.remove()
    assert states == [False, False, False, True, True]
    loss.backward()
    assert model.prelude[0].attn.c_q.weight.grad is not None


def test_recurrent_depth_samples_loop_count_only_in_training():
    model = build_model("recurrent-depth", SMALL.with_(sample_loops=True, n_loops=4))
    counts = []
    handle = model.loop_out.register_forward_hook(lambda mod, inp, out: counts.append(1))
    torch.manual_seed(0)
    per_forward = []
    for _ in range(8):
        counts.clear()
        model(tokens())
        per_forward.append(len(counts))
    model.eval()
    counts.clear()
    model(tokens())
    handle.remove()
    assert len(set(per_forward)) > 1
    assert len(counts) == 4


@pytest.mark.parametrize(
    "field,value",
    [("d_model", 30), ("n_heads", 0), ("loss_on", "first"), ("logit_softcap", -1.0), ("backprop_loops", 0)],
)
def test_bad_config_rejected(field, value):
    with pytest.raises(ValueError, match=field if field != "d_model" else "divisible"):
        ModelConfig(**{"n_heads": 4, field: value})


def test_unknown_architecture_rejected():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("transformer-xl")
