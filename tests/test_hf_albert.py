"""The ALBERT study: Hugging Face's weight-shared model in its own Trainer, recorded by the
callback, scored by the detection benchmark like any study."""

import json

import pytest
import torch
from benchmark_scripts import BENCHMARKS, loaded

from loopdiag.store import read_records

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_albert():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))  # it reads text as user_model.py does
        yield from loaded("hf_albert.py", "hf_albert")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_bytes(b"one layer group, shared by every layer of the model; " * 200)
    return path


@pytest.mark.parametrize("arch", ["standard", "looped"])
def test_every_layer_is_recorded_once_per_forward(hf_albert, arch):
    import loopdiag

    torch.manual_seed(0)
    model = hf_albert.albert(arch, 3, d_model=16, n_heads=2, seq_len=8)
    tokens = torch.randint(0, 256, (2, 8))
    with loopdiag.attach(model, hf_albert.loop_module(arch)) as recorder:
        recorder.begin_step(1)
        model(input_ids=tokens, labels=tokens).loss.backward()
        recorder.after_backward()
        record = recorder.end_step(1, loss=0.0, lr=1e-3)
    assert record["n_loops"] == 3
    assert len(record["token_corr"]) == len(record["act_grad_norm"]) == 3
    one_layer = sum(p.numel() for p in hf_albert.albert(arch, 1, d_model=16, n_heads=2, seq_len=8).parameters())
    assert (sum(p.numel() for p in model.parameters()) > one_layer) == (arch == "standard")  # looped reuses it


def test_a_batch_packed_by_the_flattening_collator_is_read_as_its_sequences(hf_albert):
    import transformers

    import loopdiag

    torch.manual_seed(0)
    model = hf_albert.albert("looped", 3, d_model=16, n_heads=2, seq_len=32)
    lengths = [5, 12, 2, 9]
    examples = [{"input_ids": torch.randint(0, 256, (n,)).tolist()} for n in lengths]
    packed = transformers.DataCollatorWithFlattening()(examples)  # ids, labels, position ids (1, 28)
    outputs = []
    group = model.get_submodule(hf_albert.loop_module("looped"))
    group.register_forward_hook(  # a tensor, or a tuple led by one, by the version of transformers
        lambda module, args, out: outputs.append((out if torch.is_tensor(out) else out[0]).detach()))
    with loopdiag.attach(model, group, loops=3) as recorder:
        model(**packed).loss.backward()
        recorder.after_backward()
        record = recorder.end_step(0)
    for loop, output in enumerate(outputs):
        # 1 − token_corr of each sequence, weighted by its pairs' T − 1
        unit = torch.nn.functional.normalize(output[0], dim=-1).split(lengths)
        spread = sum(((u - u.mean(0)).square().sum()) for u in unit)
        assert record["token_corr"][loop] == pytest.approx(1 - spread.item() / (sum(lengths) - len(lengths)),
                                                           rel=1e-5)


def test_each_position_sees_only_the_bytes_before_it(hf_albert, text):
    tokens, _ = hf_albert.ByteStudy((text,), 10_000, steps=1, batch_size=1, seq_len=8, d_model=16, n_heads=2).data()
    example = hf_albert.NextByteWindows(tokens, 8, count=4, seed=1)[0]
    assert torch.equal(example["input_ids"][1:], example["labels"][:-1])
    model = hf_albert.albert("looped", 2, d_model=16, n_heads=2, seq_len=8).eval()
    changed = example["input_ids"].clone()
    changed[5:] = (changed[5:] + 1) % 256
    logits = [model(input_ids=ids[None], attention_mask=example["attention_mask"][None]).logits
              for ids in (example["input_ids"], changed)]
    assert torch.equal(logits[0][0, :5], logits[1][0, :5])
    assert not torch.equal(logits[0][0, 5:], logits[1][0, 5:])


def test_the_study_trains_resumes_and_is_scored_as_a_study(hf_albert, text, tmp_path, capsys):
    from detection import score_study

    out = tmp_path / "study"
    argv = [str(text), "--out", str(out), "--loops", "1", "3", "--lrs", "3e-3", "--seeds", "5", "--steps", "12",
            "--d-model", "16", "--n-heads", "2", "--seq-len", "16", "--batch-size", "4", "--jobs", "1"]
    hf_albert.main(argv)
    assert (torch.tensor([1e-39]) * 2).item() > 0  # subnormals flushed during the runs only
    manifest = json.loads((out / "suite.json").read_text())
    assert [entry["run_id"] for entry in manifest["runs"]] == [
        "standard-k01-s5-lr0.003", "standard-k03-s5-lr0.003", "looped-k01-s5-lr0.003", "looped-k03-s5-lr0.003"]
    looped = out / "looped-k03-s5-lr0.003"
    config = json.loads((looped / "config.json").read_text())
    assert 0 < config["data"]["context_free_loss"] < 8
    records = read_records(looped)
    assert [record["step"] for record in records] == list(range(1, 13))
    assert all(record["n_loops"] == 3 for record in records)
    lrs = [record["lr"] for record in records]
    assert lrs[0] == pytest.approx(3e-3) and all(later < earlier for earlier, later in zip(lrs, lrs[1:]))
    assert json.loads((looped / "summary.json").read_text())["status"] in {"stable", "collapsed", "failed_to_train"}

    runs, healthy = score_study(out)
    assert {run.name for run in runs} == {entry["run_id"] for entry in manifest["runs"]}
    assert healthy.keys() == {5}

    capsys.readouterr()
    hf_albert.main(argv)  # every run finished: nothing trained again
    assert "4 of 4 runs already done; training 0" in capsys.readouterr().out


def test_bad_input_is_refused_before_any_run(hf_albert, text, tmp_path):
    out = tmp_path / "study"
    for argv in ([str(tmp_path / "missing.txt"), "--out", str(out)],
                 [str(text), "--out", str(out), "--d-model", "30", "--n-heads", "4"],
                 [str(text), "--out", str(out), "--steps", "0"],
                 [str(text), "--out", str(out), "--loops", "0"],
                 [str(text), "--out", str(out), "--seq-len", "100000"],
                 [str(text), "--out", str(out), "--archs", "flt"]):
        with pytest.raises(SystemExit):
            hf_albert.main(argv)
    assert not out.exists()
    with pytest.raises(ValueError, match="arch must be one of"):
        hf_albert.albert("flt", 2, d_model=16, n_heads=2, seq_len=8)
