"""Probe suite files: what a valid one resolves to, and every way a bad one is refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loopdiag.cli import app
from loopdiag.data import DataError, PointerChasingTask
from loopdiag.run.probe_suite import SuiteError, apply_overrides, load_probe_suite

PROBES = Path(__file__).resolve().parents[1] / "probes"

FULL = """
name = "sweep"
description = "two archs, a learning-rate sweep"
archs = ["looped", "flt"]
loops = [1, 3]
lrs = [1e-3, 1e-2]
seeds = [0, 7]
steps = 20
log_every = 2
stop_on_collapse = true

[model]
preset = "tiny"
d_model = 48
n_heads = 4
logit_softcap = false

[train]
batch_size = 4
grad_clip = false
optimizer = "muon"

[data]
task = "pointer-chasing"
n_nodes = 6
hops = 2

[detectors.loss_spike]
z = 8

[eval]
loops = [1, 2, 4]
examples = 32
"""


def write(tmp_path: Path, text: str, name: str = "suite.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_full_suite_file_resolves_every_section(tmp_path):
    suite = load_probe_suite(write(tmp_path, FULL))
    assert suite.name == "sweep" and suite.stop_on_collapse and suite.log_every == 2
    assert len(suite.cells()) == 2 * 2 * 2 * 2
    assert {cell.run_id for cell in suite.cells()} >= {"looped-k01-s0-lr0.001", "flt-k03-s7-lr0.01"}
    assert suite.model.d_model == 48 and suite.model.seq_len == 32 and suite.model.logit_softcap is None
    assert suite.train.steps == 20 and suite.train.grad_clip is None and suite.train.optimizer == "muon"
    assert suite.train.eval_every == 5  # a quarter of the steps unless given
    assert suite.data.load() == PointerChasingTask(n_nodes=6, hops=2)
    assert suite.thresholds == {"loss_spike": {"z": 8}}
    assert suite.eval_loops == (1, 2, 4) and suite.eval_examples == 32
    recorded = suite.to_dict()
    assert recorded["data"] == {"task": "pointer-chasing", "n_nodes": 6, "hops": 2}
    assert recorded["lrs"] == [1e-3, 1e-2] and recorded["train"]["grad_clip"] is None


def test_one_learning_rate_keeps_it_out_of_the_run_ids(tmp_path):
    suite = load_probe_suite(write(tmp_path, 'archs = ["flt"]\nloops = [2]\nlrs = [0.01]\n'))
    assert [cell.run_id for cell in suite.cells()] == ["flt-k02-s0"] and suite.train.lr == 0.01
    assert suite.name == "suite"  # the file's stem when the file names none


def test_corpus_files_are_relative_to_the_suite_file(tmp_path):
    (tmp_path / "text.txt").write_text("looped transformers " * 2000)
    suite = load_probe_suite(write(tmp_path, '[data]\nfiles = ["text.txt"]\n'))
    assert suite.data.files == (str(tmp_path / "text.txt"),)
    assert suite.data.load().n_bytes == 40_000


def test_a_glob_in_the_corpus_files_takes_the_files_it_matches_in_name_order(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for name in ("b.md", "a.md", "notes.txt"):
        (texts / name).write_text(f"{name} " * 2000)
    (texts / "c.md").mkdir()  # a folder the glob matches is not a file to read
    suite = load_probe_suite(write(tmp_path, '[data]\nfiles = ["texts/*.md", "texts/notes.txt"]\n'))
    assert suite.data.files == tuple(str(texts / name) for name in ("a.md", "b.md", "notes.txt"))
    assert suite.to_dict()["data"]["files"] == list(suite.data.files)  # the run records the list
    assert suite.data.describe() == ", ".join(suite.data.files)
    for name in ("d.md", "e.md"):
        (texts / name).write_text(f"{name} " * 2000)
    many = load_probe_suite(write(tmp_path, '[data]\nfiles = ["texts/*.md"]\n'))
    assert many.data.describe() == f"4 files, {texts / 'a.md'} to {texts / 'e.md'}"  # the banner's one line


@pytest.mark.parametrize("name", ["loops-compute", "flt-stability-task", "addition-references"])
def test_a_task_suite_trains_on_text_given_with_data(tmp_path, name):
    text = tmp_path / "notes.txt"
    text.write_text("the loop returns to the same weights. " * 2000)
    suite = apply_overrides(load_probe_suite(PROBES / f"{name}.toml"), data=[text])
    assert suite.data.task is None and suite.data.files == (str(text),)
    assert suite.eval_loops  # the loop-scaling evaluation stays, on the text's validation batches


def test_the_readmes_suite_example_is_a_valid_suite(tmp_path):
    readme = (PROBES.parent / "README.md").read_text(encoding="utf-8")
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "mine.toml").write_text(example)
    suite = load_probe_suite(tmp_path / "mine.toml")
    assert (suite.name, suite.data.task, suite.eval_examples) == ("mine", "addition", 512)


@pytest.mark.parametrize("path", sorted(PROBES.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_suites_are_valid(path):
    suite = load_probe_suite(path)
    assert suite.name == path.stem and suite.cells()


BAD = [
    ("colour = 1", "colour: unknown key"),
    ('archs = ["lopped"]', "archs: unknown architecture 'lopped'"),
    ("archs = []", "archs: must be a non-empty list"),
    ('archs = "flt"', "archs: must be a non-empty list"),
    ("loops = [0, 2]", "loops: loop counts must be >= 1"),
    ("loops = [2, 2]", "loops: has duplicates"),
    ("loops = [1.5]", "loops: 1.5 is not a int"),
    ("lrs = [-0.1]", "lrs: learning rates must be > 0"),
    ('lrs = ["fast"]', "lrs: 'fast' is not a number"),
    ("seeds = 0", "seeds: a count must be >= 1"),
    ("steps = 0", "steps: must be an int >= 1"),
    ("log_every = 0", "log_every: must be an int >= 1"),
    ('stop_on_collapse = "yes"', "stop_on_collapse: must be true or false"),
    ('name = "a/b"', "name: must be a plain folder name"),
    ("model = 3", "model: must be a table"),
    ("[model]\nd_modle = 64", "model.d_modle: unknown key"),
    ("[model]\nn_loops = 4", "model.n_loops: unknown key"),
    ("[model]\nd_model = 30", "model: ModelConfig.d_model (30) must be divisible by n_heads"),
    ('[model]\npreset = "huge"', "model: unknown model preset 'huge'"),
    ("[train]\nsteps = 10", "train.steps: unknown key"),
    ("[train]\nbatch_size = 0", "train: TrainConfig.batch_size must be an int >= 1"),
    ('[train]\noptimizer = "sgd"', "train: TrainConfig.optimizer must be one of"),
    ("[train]\ngrad_accum_steps = 0", "train: TrainConfig.grad_accum_steps must be an int >= 1"),
    ("[train]\nbatch_size = 6\ngrad_accum_steps = 4", "train: TrainConfig.batch_size must be a multiple of"),
    ('[train]\nprecision = "fp16"', "train: TrainConfig.precision must be one of"),
    ('[train]\nparallel = "zero3"', "train: TrainConfig.parallel must be one of"),
    ('[data]\ntask = "sorting"', "data.task: unknown task 'sorting'"),
    ('[data]\ntask = "addition"\nhops = 3', "data.hops: unknown key"),
    ('[data]\ntask = "addition"\nn_digits = "x"', "data: n_digits must be an int >= 1, got 'x'"),
    ('[data]\ntask = "pointer-chasing"\nhops = 2.5', "data: hops must be an int >= 1 or a list of them, got 2.5"),
    ('[data]\ntask = "pointer-chasing"\nn_nodes = 26',
     "data.task: pointer-chasing examples are 81 tokens, longer than model.seq_len=64"),
    ('[data]\nfile = "x.txt"', "data.file: unknown key"),
    ('[data]\nfiles = ["texts/*.txt"]', "data.files: '"),
    ("[detectors.loss_spiky]\nz = 3", "detectors: unknown detector(s) 'loss_spiky'"),
    ("[detectors.loss_spike]\nzz = 3", "detectors: loss_spike: unknown threshold(s) 'zz'"),
    ("[eval]\nloops = [0]", "eval.loops: loop counts must be >= 1"),
    ("[eval]\nk = [1]", "eval.k: unknown key"),
    ("[eval]\nexamples = 0", "eval.examples: must be an int >= 1"),
    ("[eval]\nexamples = 64", "eval.examples: counts a task's examples for exact-match accuracy; text is"),
    ("archs = [", "not valid TOML"),
    # Types the dataclasses take without a word: a string switch is on, `true` is the number 1.
    ('[model]\nqk_norm = "false"', "model.qk_norm: must be true or false, got 'false'"),
    ("[model]\nlogit_softcap = true", "model.logit_softcap: must be a finite number or false, got True"),
    ("[model]\nn_prelude = 1.5", "model.n_prelude: must be an integer, got 1.5"),
    ("[model]\nresidual_lambda = nan", "model.residual_lambda: must be a finite number, got nan"),
    ('[model]\npreset = ["tiny"]', "model.preset: must be a preset's name, got ['tiny']"),
    ("[model]\nvocab_size = 100", "model.vocab_size: must be >= 256 (the tokens are bytes), got 100"),
    ("[train]\nmuon_lr = inf", "train.muon_lr: must be a finite number, got inf"),
    ("lrs = [inf]", "lrs: learning rates must be > 0 and finite, got [inf]"),
    ('[data]\ntask = ["addition"]', "data.task: unknown task ['addition']"),
    ('[data]\ntask = "pointer-chasing"\nhops = [1, 1, 2]', "data.hops: has duplicates: [1, 1, 2]"),
    ("[data]\nfiles = []", "data.files: must be a non-empty list, got []"),
    ('name = "a\\u0000b"', "name: must be a plain folder name, got 'a\\x00b'"),
    # A key written below a [table] header lands in that table: say where it belongs.
    ('[model]\npreset = "tiny"\nsteps = 3', "model.steps: unknown key here; `steps` is a top-level key"),
    ("batch_size = 4", "batch_size: unknown key here; `batch_size` belongs in [train]"),
    ("[detectors.loss_spike]\nz = 8\nseeds = 2", "detectors.loss_spike.seeds: unknown key here; `seeds` is a top-level"),
]


@pytest.mark.parametrize(("text", "reason"), BAD, ids=[reason.split(":")[0] + f"-{i}" for i, (_, reason) in enumerate(BAD)])
def test_bad_suite_files_name_the_file_the_key_and_why(tmp_path, text, reason):
    path = write(tmp_path, text)
    with pytest.raises(SuiteError) as raised:
        load_probe_suite(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and reason in message


def test_data_files_are_recorded_absolute_whatever_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "suites").mkdir()
    (tmp_path / "text.txt").write_text("looped transformers " * 2000)
    write(tmp_path / "suites", '[data]\nfiles = ["../text.txt"]\n')
    monkeypatch.chdir(tmp_path)  # the suite named by a relative path, as `loopdiag run suites/suite.toml`
    suite = load_probe_suite(Path("suites/suite.toml"))
    assert suite.data.files == (str((tmp_path / "text.txt").resolve()),)  # so `--resume` elsewhere matches
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_probe_suite(write(tmp_path, '[data]\nfiles = ["~/text.txt"]\n')).data.files == suite.data.files


def test_a_data_file_named_twice_is_refused(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.md").write_text("alpha " * 3000)
    path = write(tmp_path, '[data]\nfiles = ["texts/*.md", "texts/a.md"]\n')
    with pytest.raises(SuiteError, match=r"data.files: names .*a.md more than once"):
        load_probe_suite(path)


def test_an_unreadable_data_file_names_the_suite_and_key_or_the_option(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    path = write(tmp_path, '[data]\nfiles = ["empty.txt"]\n')
    suite = load_probe_suite(path)
    for loaded in (suite, apply_overrides(suite, steps=3)):  # options other than --data keep the file's name
        with pytest.raises(DataError) as raised:
            loaded.data.load()
        assert str(raised.value) == f"{path}: data.files: {tmp_path / 'empty.txt'}: file is empty"
    with pytest.raises(DataError, match=r"^--data: .*absent.txt: no such file"):
        apply_overrides(suite, data=[tmp_path / "absent.txt"]).data.load()


def test_the_default_eval_every_follows_the_steps_an_option_gives(tmp_path):
    suite = load_probe_suite(write(tmp_path, "steps = 400\n[train]\nbatch_size = 8\n"))
    assert suite.train.eval_every == 100
    assert apply_overrides(suite, steps=8).train.eval_every == 2  # not the file's 100, past the last step
    assert apply_overrides(suite, quick=True).train.eval_every == 10


@pytest.mark.parametrize(("only", "message"), [
    (["loops=1,3"], "--only loops=3 matches none of the suite's runs (its loops values: 1, 4)"),
    (["arch=flt,Looped"], "--only arch=Looped matches none of the suite's runs (its arch values: flt, looped)"),
    (["loops=1", "loops=4"], "--only loops is given twice; list its values in one: --only loops=V1,V2"),
])
def test_only_values_outside_the_suite_are_refused_before_training(tmp_path, only, message):
    suite = write(tmp_path, 'archs = ["flt", "looped"]\nloops = [1, 4]\nsteps = 3\n[model]\npreset = "tiny"\n')
    options = [word for condition in only for word in ("--only", condition)]
    result = CliRunner().invoke(app, ["run", str(suite), *options, "--wandb", "off", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output.replace("\n", "")
    assert not (tmp_path / "out").exists()


def test_a_missing_suite_file_is_named(tmp_path):
    with pytest.raises(SuiteError, match="no such suite file"):
        load_probe_suite(tmp_path / "absent.toml")


def test_command_line_options_override_the_file(tmp_path):
    suite = load_probe_suite(write(tmp_path, FULL))
    changed = apply_overrides(suite, loops=2, archs=["standard"], steps=8, lrs=[0.5], seeds=3,
                              size="default", optimizer="adamw", log_every=1, stop_on_collapse=False,
                              grad_accum_steps=2, precision="bf16", parallel="fsdp")
    assert changed.loops == (1, 2) and changed.archs == ("standard",) and changed.train.steps == 8
    assert changed.lrs == (0.5,) and changed.seeds == (0, 1, 2) and changed.model.d_model == 48
    assert changed.train.optimizer == "adamw" and not changed.stop_on_collapse
    assert (changed.train.grad_accum_steps, changed.train.precision, changed.train.parallel) == (2, "bf16", "fsdp")
    assert changed.data == suite.data and changed.thresholds == suite.thresholds
    assert changed.source == (f"{suite.source}, with options --loops, --arch, --steps, --lr, --seeds, --size, "
                               "--optimizer, --log-every, --grad-accum-steps, --precision, --parallel, "
                               "--stop-on-collapse")


def test_options_that_leave_the_file_as_it_is_leave_its_source_alone():
    suite = load_probe_suite(PROBES / "default.toml")
    assert apply_overrides(suite, loops=max(suite.loops), steps=suite.train.steps).source == suite.source


def test_a_name_given_renames_the_suite_quick_or_not():
    suite = load_probe_suite(PROBES / "default.toml")
    assert apply_overrides(suite, name="default-locales").name == "default-locales"
    assert apply_overrides(suite, name="default-locales", quick=True).name == "default-locales"


def test_quick_shrinks_the_suite_and_renames_it(tmp_path):
    suite = load_probe_suite(PROBES / "default.toml")
    quick = apply_overrides(suite, quick=True)
    assert quick.name == "default-quick" and quick.model.d_model == 32
    assert quick.loops == (1, 12) and quick.train.steps <= 40 and quick.archs == suite.archs


def test_a_size_or_step_count_given_with_quick_wins_and_is_checked():
    suite = load_probe_suite(PROBES / "default.toml")
    quick = apply_overrides(suite, quick=True, size="small", steps=100)
    assert quick.name == "default-quick" and quick.loops == (1, 12)
    assert quick.model == apply_overrides(suite, size="small").model and quick.train.steps == 100
    with pytest.raises(SuiteError, match="unknown model preset 'huge'"):
        apply_overrides(suite, quick=True, size="huge")


@pytest.mark.parametrize(("options", "reason"), [
    ({"steps": 0}, "--steps must be >= 1"),
    ({"loops": 0}, "--loops must be >= 1"),
    ({"seeds": 0}, "--seeds must be >= 1"),
    ({"name": ".."}, "name: must be a plain folder name, got '..'"),
    ({"archs": ["nope"]}, "archs: unknown architecture 'nope'"),
    ({"lrs": [0.0]}, "lrs: learning rates must be > 0"),
    ({"lrs": [math.inf]}, "lrs: learning rates must be > 0 and finite"),
    ({"size": "huge"}, "unknown model preset 'huge'"),
    ({"optimizer": "sgd"}, "--optimizer must be one of adamw, muon, got 'sgd'"),
    ({"grad_accum_steps": 0}, "--grad-accum-steps must be >= 1, got 0"),
    ({"precision": "fp8"}, "--precision must be one of fp32, bf16, got 'fp8'"),
    ({"parallel": "tp"}, "--parallel must be one of ddp, fsdp, got 'tp'"),
    ({"schedule": "linear"}, "--schedule must be one of constant-decay, cosine, got 'linear'"),
])
def test_bad_options_are_refused_with_the_reason(options, reason):
    suite = load_probe_suite(PROBES / "default.toml")
    with pytest.raises(SuiteError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(suite, **options)
