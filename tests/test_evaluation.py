"""Test-time loop scaling from a run folder: the same weights at other loop counts."""

from __future__ import annotations

import pytest

from loopdiag.data import AdditionTask, PointerChasingTask, load_corpus
from loopdiag.evaluation import loop_scaling, parse_loops
from loopdiag.run.runner import RunSpec, run_one
from loopdiag.store import load_run
from loopdiag.train import TrainConfig
from run_files import tiny_model_config

TINY = tiny_model_config()
CONFIG = TrainConfig(steps=6, batch_size=4, eval_every=3)


def test_a_task_run_is_scored_by_loss_and_accuracy_at_every_k(tmp_path):
    run_dir = tmp_path / "run"
    run_one(RunSpec("flt", 2), TINY, CONFIG, AdditionTask(n_digits=2), run_dir)
    frame = loop_scaling(run_dir, [1, 2, 5], examples=40)
    assert frame.groupby("metric")["eval_loops"].apply(list).to_dict() == {
        "accuracy": [1, 2, 5], "val_loss": [1, 2, 5]}
    accuracy = frame[frame["metric"] == "accuracy"]["value"]
    assert accuracy.between(0, 1).all() and (accuracy * 40).round().eq(accuracy * 40).all()
    # at the trained K the checkpoint scores exactly the run's own last validation loss
    at_trained_k = frame[(frame["metric"] == "val_loss") & (frame["eval_loops"] == 2)]["value"].item()
    assert at_trained_k == pytest.approx(load_run(run_dir).steps["val_loss"].dropna().iloc[-1], rel=1e-6)
    assert set(frame["run_id"]) == {"run"} and (run_dir / "loop_scaling.csv").is_file()


def test_a_corpus_run_needs_the_same_text(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("weights tied across loops " * 2000)
    run_dir = tmp_path / "run"
    run_one(RunSpec("looped", 2), TINY, CONFIG, load_corpus(text), run_dir)
    assert loop_scaling(run_dir, [1, 3])["metric"].tolist() == ["val_loss", "val_loss"]
    text.write_text("different text entirely " * 2000)
    with pytest.raises(ValueError, match="differs from the one the run trained on"):
        loop_scaling(run_dir, [1])
    text.unlink()
    with pytest.raises(FileNotFoundError, match="is gone; pass the text again"):
        loop_scaling(run_dir, [1])


def test_a_model_of_fixed_depth_runs_at_its_own_depth_only(tmp_path):
    run_one(RunSpec("standard", 2), TINY, CONFIG, load_corpus(), tmp_path / "run")
    with pytest.raises(ValueError, match="standard is not looped"):
        loop_scaling(tmp_path / "run", [1, 2])
    assert loop_scaling(tmp_path / "run", [2])["eval_loops"].tolist() == [2]


def test_mixed_depth_pointer_chasing_is_scored_per_depth(tmp_path):
    run_dir = tmp_path / "run"
    task = PointerChasingTask(n_nodes=4, hops=[1, 2])
    run_one(RunSpec("flt", 2), TINY, CONFIG, task, run_dir)
    frame = loop_scaling(run_dir, [1, 3], examples=16)
    assert set(frame["metric"]) == {"val_loss", "accuracy", "accuracy_1hop", "accuracy_2hop"}
    assert frame.groupby("metric")["eval_loops"].apply(list).to_dict()["accuracy_2hop"] == [1, 3]


@pytest.mark.parametrize(("text", "loops"), [("1..4", [1, 2, 3, 4]), ("1,2,4,8", [1, 2, 4, 8]),
                                             ("1..3, 6 ,12", [1, 2, 3, 6, 12]), ("4,4,1", [1, 4])])
def test_loop_lists(text, loops):
    assert parse_loops(text) == loops


@pytest.mark.parametrize("text", ["", "0", "2..1", "a..b", "1..", "-1..2"])
def test_bad_loop_lists(text):
    with pytest.raises(ValueError):
        parse_loops(text)
