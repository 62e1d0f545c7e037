"""The user-model study: a decoder of PyTorch's own layers, recorded through the public API,
scored by the detection benchmark like any study."""

import json
import math

import pytest
import torch
from benchmark_scripts import BENCHMARKS, loaded

from loopdiag.store import read_records


@pytest.fixture(scope="module")
def user_model():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))  # the test scores with the detection benchmark
        yield from loaded("user_model.py", "user_model")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_bytes(b"the loops of a looped model reuse one block; " * 200)
    return path


@pytest.mark.parametrize("arch", ["standard", "looped", "looped-postln", "looped-inject"])
def test_every_loop_is_recorded_once_per_forward(user_model, arch):
    import loopdiag

    torch.manual_seed(0)
    model = user_model.UserLoopedLM(arch, 3, d_model=16, n_heads=2, seq_len=8)
    tokens = torch.randint(0, 256, (2, 8))
    with loopdiag.attach(model, model.loop_module) as recorder:
        recorder.begin_step(1)
        torch.nn.functional.cross_entropy(model(tokens).reshape(-1, 256), tokens.reshape(-1)).backward()
        recorder.after_backward()
        record = recorder.end_step(1, loss=0.0, lr=1e-3)
    assert record["n_loops"] == 3
    assert len(record["token_corr"]) == len(record["act_grad_norm"]) == 3
    one_layer = sum(p.numel() for p in user_model.UserLoopedLM(arch, 1, d_model=16, n_heads=2, seq_len=8)
                    .parameters())
    assert (sum(p.numel() for p in model.parameters()) > one_layer) == (arch == "standard")  # the rest reuse it


def test_the_study_trains_resumes_and_is_scored_as_a_study(user_model, text, tmp_path, capsys):
    from detection import score_study

    out = tmp_path / "study"
    argv = [str(text), "--out", str(out), "--archs", "standard", "looped-postln", "--loops", "1", "3",
            "--lrs", "3e-3", "--seeds", "5", "--steps", "12", "--d-model", "16", "--n-heads", "2",
            "--seq-len", "16", "--batch-size", "4", "--jobs", "1"]
    user_model.main(argv)
    manifest = json.loads((out / "suite.json").read_text())
    assert [entry["run_id"] for entry in manifest["runs"]] == [
        "standard-k01-s5-lr0.003", "standard-k03-s5-lr0.003",
        "looped-postln-k01-s5-lr0.003", "looped-postln-k03-s5-lr0.003"]
    looped = out / "looped-postln-k03-s5-lr0.003"
    config = json.loads((looped / "config.json").read_text())
    assert 0 < config["data"]["context_free_loss"] < 8  # ln 256 ≈ 5.5 is the most a byte's can be
    records = read_records(looped)
    assert [record["step"] for record in records] == list(range(1, 13))
    assert all(record["n_loops"] == 3 for record in records)
    assert json.loads((looped / "summary.json").read_text())["status"] in {"stable", "collapsed", "failed_to_train"}

    runs, healthy = score_study(out)
    assert {run.name for run in runs} == {entry["run_id"] for entry in manifest["runs"]}
    assert healthy.keys() == {5}

    capsys.readouterr()
    user_model.main(argv)  # every run finished: nothing trained again
    assert "4 of 4 runs already done; training 0" in capsys.readouterr().out


def test_a_subword_vocabulary_is_trained_on_the_text_and_recorded(user_model, tmp_path):
    rng = torch.Generator().manual_seed(0)
    words = ["".join(chr(97 + c) for c in torch.randint(26, (n,), generator=rng).tolist())
             for n in torch.randint(2, 8, (200,), generator=rng).tolist()]
    text = tmp_path / "words.txt"
    text.write_text(" ".join(words[i] for i in torch.randint(len(words), (3000,), generator=rng).tolist()))
    out = tmp_path / "study"
    user_model.main([str(text), "--out", str(out), "--archs", "looped", "--loops", "2", "--lrs", "1e-2",
                     "--seeds", "5", "--steps", "4", "--vocab", "300", "--d-model", "16", "--n-heads", "2",
                     "--seq-len", "16", "--batch-size", "4", "--jobs", "1"])
    data = json.loads((out / "looped-k02-s5-lr0.01" / "config.json").read_text())["data"]
    assert (data["vocab_size"], data["n_tokens"]) == (300, len(user_model.bpe_tokens((text,), 500_000, 16, 300)[0]))
    assert data["n_tokens"] < data["n_bytes"]  # merged: fewer tokens than bytes
    assert 0 < data["context_free_loss"] < math.log(300)
    records = read_records(out / "looped-k02-s5-lr0.01")
    assert len(records) == 4 and records[0]["loss"] == pytest.approx(math.log(300), abs=0.3)  # near chance over 300
    user_model.bpe_tokens.cache_clear()
    tokens, again = user_model.bpe_tokens((text,), 500_000, 16, 300)
    assert again["tokens_sha256"] == data["tokens_sha256"]  # the tokenizer trains the same ids every time
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 300


def test_bad_input_is_refused_before_any_run(user_model, text, tmp_path):
    out = tmp_path / "study"
    for argv in ([str(tmp_path / "missing.txt"), "--out", str(out)],
                 [str(text), "--out", str(out), "--steps", "10", "--warmup-steps", "10"],
                 [str(text), "--out", str(out), "--d-model", "30", "--n-heads", "4"],
                 [str(text), "--out", str(out), "--steps", "0"],
                 [str(text), "--out", str(out), "--seq-len", "100000"],
                 [str(text), "--out", str(out), "--dropout", "1"],
                 [str(text), "--out", str(out), "--activation", "tanh"],
                 [str(text), "--out", str(out), "--vocab", "100"],
                 [str(text), "--out", str(out), "--vocab", "5000"]):  # one phrase holds too few pieces
        with pytest.raises(SystemExit):
            user_model.main(argv)
    assert not out.exists()
    with pytest.raises(ValueError, match="arch must be one of"):
        user_model.UserLoopedLM("flt", 2, d_model=16, n_heads=2, seq_len=8)


def test_the_recorded_learning_rate_follows_the_warm_up_and_the_cosine(user_model, text, tmp_path):
    out = tmp_path / "study"
    user_model.main([str(text), "--out", str(out), "--archs", "looped", "--loops", "2", "--lrs", "1e-2",
                     "--seeds", "5", "--steps", "12", "--schedule", "cosine", "--warmup-steps", "4",
                     "--d-model", "16", "--n-heads", "2", "--seq-len", "16", "--batch-size", "4", "--jobs", "1"])
    lrs = [record["lr"] for record in read_records(out / "looped-k02-s5-lr0.01")]
    assert lrs[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert all(later < earlier for earlier, later in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == pytest.approx(0.001)  # the cosine ends at a tenth of the peak
    config = json.loads((out / "looped-k02-s5-lr0.01" / "config.json").read_text())
    assert (config["train"]["schedule"], config["train"]["warmup_steps"]) == ("cosine", 4)


def test_the_layers_own_defaults_dropout_and_relu_are_trained_and_recorded(user_model, text, tmp_path):
    out = tmp_path / "study"
    user_model.main([str(text), "--out", str(out), "--archs", "looped", "--loops", "2", "--lrs", "1e-2",
                     "--seeds", "5", "--steps", "6", "--dropout", "0.1", "--activation", "relu",
                     "--d-model", "16", "--n-heads", "2", "--seq-len", "16", "--batch-size", "4", "--jobs", "1"])
    config = json.loads((out / "looped-k02-s5-lr0.01" / "config.json").read_text())
    assert (config["model"]["dropout"], config["model"]["activation"]) == (0.1, "relu")
    assert len(read_records(out / "looped-k02-s5-lr0.01")) == 6
    model = user_model.UserLoopedLM("looped", 2, d_model=16, n_heads=2, seq_len=8, dropout=0.5)
    tokens = torch.randint(0, 256, (2, 8))
    assert not torch.equal(model(tokens), model(tokens))  # training mode: dropout draws anew
    model.eval()
    assert torch.equal(model(tokens), model(tokens))
