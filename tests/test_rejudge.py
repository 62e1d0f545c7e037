"""Judging a stored suite again: today's detectors replayed over its records, each looped run
against its one-loop reference, through the library and `loopdiag report --rejudge`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loopdiag.analysis.rejudge import rejudge_suite
from loopdiag.cli import app
from loopdiag.store import RunWriter, write_suite_manifest
from loopdiag.store.reference import chosen_reference, reference_record, reference_run

pytestmark = pytest.mark.torchless  # also run on Python 3.12 / 3.13 without torch

STEPS = 150
LOOPS = 4


def records(collapsed: bool) -> list[dict]:
    out = []
    for step in range(1, STEPS + 1):
        wobble = 1 + 0.02 * math.sin(step)
        if collapsed:  # positions identical from step 3, the loss stuck at the unigram level
            loss, corr = (3.3 + 2.2 * math.exp(-step / 3)) * wobble, 1.0 if step >= 3 else 0.5
        else:
            loss, corr = (2.2 + 3.3 * math.exp(-step / 30)) * wobble, 0.5
        out.append({"step": step, "loss": loss, "token_corr": [corr] * LOOPS,
                    "rel_update": [math.nan, *[0.1] * (LOOPS - 1)], "resid_norm": [8.0] * LOOPS})
    return out


def write_suite(suite_dir: Path) -> None:
    cells = {}
    for n_loops, collapsed in ((1, False), (LOOPS, True)):
        run_id = f"looped-k{n_loops:02d}-s0"
        cells[run_id] = {"arch": "looped", "n_loops": n_loops, "seed": 0, "lr": 3e-3}
        with RunWriter(suite_dir / run_id, {"cell": cells[run_id], "train": {"steps": STEPS},
                                            "detectors": {}}) as run:
            for record in records(collapsed):
                run.log(record)
            # judged by an older detector set that saw nothing
            run.close({"status": "stable", "step": None, "signal": None})
    write_suite_manifest(suite_dir, {"name": "tiny"}, cells)


def test_rejudge_rewrites_verdicts_with_the_one_loop_reference(tmp_path: Path):
    write_suite(tmp_path)
    changes = []
    statuses = rejudge_suite(tmp_path, on_run=lambda *change: changes.append(change))
    assert statuses == {"looped-k01-s0": "stable", "looped-k04-s0": "collapsed"}
    assert ("looped-k01-s0", "stable", "stable") in changes
    summary = json.loads((tmp_path / "looped-k04-s0" / "summary.json").read_text())
    assert summary["mechanism"] == "representation" and summary["rejudged_from"] == "stable"
    assert summary["reference"]["run"] == "looped-k01-s0"
    assert summary["reference"]["expected_loss"] == reference_run(tmp_path, {
        "arch": "looped", "n_loops": LOOPS, "seed": 0, "lr": 3e-3})[1]
    # the one-loop run has no other one-loop run to be judged against
    assert json.loads((tmp_path / "looped-k01-s0" / "summary.json").read_text())["reference"] is None
    assert "vanishing_gradient" in summary["not_judged"]  # no act_grad_norm was recorded
    events = [json.loads(line) for line in (tmp_path / "looped-k04-s0" / "events.jsonl").open()]
    assert events[0]["detector"] == "representation_collapse" and events[0]["step"] == 7


def test_rejudge_reads_the_context_free_loss_the_config_records(tmp_path: Path):
    """A one-loop run, no reference to judge it by, that settled at what the data's token
    frequencies alone give: failed to train once its config says what that is."""
    plateau = [{"step": s, "loss": (3.25 + 2.0 * math.exp(-s / 5)) * (1 + 0.01 * math.sin(s))}
               for s in range(1, STEPS + 1)]
    for name, data in (("told", {"context_free_loss": 3.26}), ("untold", {})):
        cell = {"arch": "looped", "n_loops": 1, "seed": 0, "lr": 3e-3}
        with RunWriter(tmp_path / name / "run", {"cell": cell, "train": {"steps": STEPS},
                                                 "detectors": {}, "data": data}) as run:
            for record in plateau:
                run.log(record)
            run.close({"status": "stable", "step": None, "signal": None})
        write_suite_manifest(tmp_path / name, {"name": name}, {"run": cell})
    assert rejudge_suite(tmp_path / "told") == {"run": "failed_to_train"}
    assert rejudge_suite(tmp_path / "untold") == {"run": "stable"}


def test_report_rejudge_prints_what_changed_and_reports_it(tmp_path: Path):
    write_suite(tmp_path / "runs")
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--rejudge", "--jobs", "1"])
    assert result.exit_code == 0, result.output
    assert "1 verdicts changed" in result.output and "looped-k04-s0: stable -> collapsed" in result.output
    report = (tmp_path / "report.md").read_text()
    assert "collapsed (representation)" in report


def test_rejudge_refuses_a_folder_without_a_suite(tmp_path: Path):
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--rejudge"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_a_run_is_judged_against_the_one_loop_run_at_the_gentlest_learning_rate(tmp_path: Path):
    """A higher learning rate is held to what the gentlest one reached, not to what the best
    rate between reached; a lower one is not held to what a higher one reaches in the same
    steps."""
    finals = {("looped", 0, 3e-3): 2.2, ("looped", 0, 1e-2): 1.9, ("looped", 0, 1e-1): 2.6,
              ("looped", 1, 1e-3): 1.0, ("flt", 0, 1e-3): 1.0}  # another seed, another arch
    cells = {}
    for (arch, seed, lr), loss in finals.items():
        run_id = f"{arch}-k01-s{seed}-lr{lr:g}"
        cells[run_id] = {"arch": arch, "n_loops": 1, "seed": seed, "lr": lr}
        with RunWriter(tmp_path / run_id, {"cell": cells[run_id]}) as run:
            run.log({"step": 1, "loss": loss})
            run.close({"status": "stable", "final_smoothed_loss": loss})
    write_suite_manifest(tmp_path, {"name": "sweep"}, cells)

    def reference(n_loops: int, lr: float) -> tuple[str, float] | None:
        return reference_run(tmp_path, {"arch": "looped", "n_loops": n_loops, "seed": 0, "lr": lr})

    assert reference(4, 3e-3) == reference(4, 1e-2) == reference(4, 1e-1) == ("looped-k01-s0-lr0.003", 2.2)
    assert reference(1, 1e-1) == reference(1, 1e-2) == ("looped-k01-s0-lr0.003", 2.2)
    assert reference(1, 3e-3) is None  # nothing gentler but itself
    assert reference(4, 1e-3) is None


def test_the_reference_passes_over_an_unfinished_gentlest_run_and_orders_nothing_it_cannot(tmp_path: Path):
    cells = {}
    for lr, loss, status in ((5e-4, 1.4, "diverged"), (1e-3, 1.5, "interrupted"), (3e-3, 2.2, "collapsed"),
                             (1e-2, 1.9, "stable")):
        run_id = f"looped-k01-lr{lr:g}"
        cells[run_id] = {"arch": "looped", "n_loops": 1, "seed": 0, "lr": lr}
        with RunWriter(tmp_path / run_id, {"cell": cells[run_id]}) as run:
            run.log({"step": 1, "loss": loss})
            run.close({"status": status, "final_smoothed_loss": loss})
    write_suite_manifest(tmp_path, {"name": "sweep"}, cells)
    # an interrupted or diverged run gives no bar; a collapsed one at the gentlest finished rate still does
    assert reference_run(tmp_path, {"arch": "looped", "n_loops": 4, "seed": 0, "lr": 1e-2}) == (
        "looped-k01-lr0.003", 2.2)

    at = {"arch": "looped", "n_loops": 1, "seed": 0}
    assert chosen_reference([({**at, "lr": 1e-2}, 1.9, "b"), ({**at, "lr": 3e-3}, 2.4, "c"),
                             ({**at, "lr": 3e-3, "warmup": 10}, 2.2, "a")]) == ("a", 2.2)
    for unordered in (None, math.nan):
        for candidates in ([({**at, "lr": 1e-2}, 1.9, "b"), ({**at, "lr": unordered}, 2.2, "a")],
                           [({**at, "lr": unordered}, 2.2, "a"), ({**at, "lr": 1e-2}, 1.9, "b")]):
            assert chosen_reference(candidates) == ("b", 1.9)
    assert chosen_reference([]) is None


def test_a_stable_verdict_against_a_slow_gentlest_rate_says_what_the_model_got_to_elsewhere(tmp_path: Path):
    """The gentlest rate's one-loop model learned past the token frequencies and stopped 25 %
    above the same model at a faster rate: a looped run as far along is stable against it,
    and its explanation says what the model reached elsewhere; a run whose reference is not
    that far behind is told nothing more."""
    floor = 3.8

    def trained(level: float) -> list[dict]:
        return [{"step": s, "loss": (level + 2.0 * math.exp(-s / 10)) * (1 + 0.005 * math.sin(s))}
                for s in range(1, STEPS + 1)]

    ends = {(1, 1e-3): 2.5, (1, 3e-3): 2.0, (LOOPS, 3e-3): 2.45, (LOOPS, 1e-3): 2.5}
    cells = {}
    for (n_loops, lr), level in ends.items():
        run_id = f"looped-k{n_loops:02d}-lr{lr:g}"
        cells[run_id] = {"arch": "looped", "n_loops": n_loops, "seed": 0, "lr": lr}
        with RunWriter(tmp_path / run_id, {"cell": cells[run_id], "train": {"steps": STEPS}, "detectors": {},
                                           "data": {"context_free_loss": floor}}) as run:
            for record in trained(level):
                run.log(record)
            run.close({"status": "stable", "step": None, "signal": None})
    write_suite_manifest(tmp_path, {"name": "sweep"}, cells)
    assert set(rejudge_suite(tmp_path).values()) == {"stable"}

    def explained(run_id: str) -> str:
        result = CliRunner().invoke(app, ["analyze", str(tmp_path / run_id)])
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    text = explained("looped-k04-lr0.003")
    assert "(the final smoothed loss of run looped-k01-lr0.001)" in text
    assert ("The same model got to 2 with one loop at another learning rate (run looped-k01-lr0.003), "
            "20 % lower") in text
    # at the slow rate itself too: the same model got further at a faster one
    assert "The same model got to" in explained("looped-k04-lr0.001")
    assert "The same model got to" not in explained("looped-k01-lr0.003")  # a one-loop run: no best known


def test_a_slow_reference_at_the_token_frequencies_is_overruled_by_a_faster_one_loop_run(tmp_path: Path):
    """A learning rate too low for the budget: the one-loop model at 2e-4 stalls just under
    what token frequencies give, as on data that holds nothing more, and a looped run beside
    it is no further behind it. The one-loop model at 3e-3 shows the data holds more: the
    looped run is judged by the context-free line then, as its one-loop model is."""
    floor = 3.8

    def plateau(level: float, fall: float) -> list[dict]:
        return [{"step": s, "loss": (level + 2.0 * math.exp(-s / fall)) * (1 + 0.005 * math.sin(s))}
                for s in range(1, STEPS + 1)]

    runs = {("looped", 1, 2e-4): plateau(0.957 * floor, 5), ("looped", LOOPS, 2e-4): plateau(0.96 * floor, 5),
            ("looped", 1, 3e-3): plateau(0.40 * floor, 10)}
    for name, kept in (("sweep", runs), ("slow-only", {cell: r for cell, r in runs.items() if cell[2] < 1e-3})):
        cells = {}
        for (arch, n_loops, lr), curve in kept.items():
            run_id = f"{arch}-k{n_loops:02d}-lr{lr:g}"
            cells[run_id] = {"arch": arch, "n_loops": n_loops, "seed": 0, "lr": lr}
            with RunWriter(tmp_path / name / run_id, {"cell": cells[run_id], "train": {"steps": STEPS},
                                                      "detectors": {}, "data": {"context_free_loss": floor}}) as run:
                for record in curve:
                    run.log(record)
                run.close({"status": "stable", "step": None, "signal": None})
        write_suite_manifest(tmp_path / name, {"name": name}, cells)

    statuses = rejudge_suite(tmp_path / "sweep")
    assert statuses["looped-k04-lr0.0002"] == statuses["looped-k01-lr0.0002"] == "failed_to_train"
    assert statuses["looped-k01-lr0.003"] == "stable"
    reference = json.loads((tmp_path / "sweep" / "looped-k04-lr0.0002" / "summary.json").read_text())["reference"]
    assert reference["run"] == "looped-k01-lr0.0002" and reference["best_known_run"] == "looped-k01-lr0.003"
    assert reference == reference_record(tmp_path / "sweep", {"arch": "looped", "n_loops": LOOPS, "seed": 0,
                                                              "lr": 2e-4})
    # a one-loop run's reference is a gentler one-loop run only, and a best known loss no lower is not recorded
    assert "best_known_run" not in reference_record(tmp_path / "sweep", {"arch": "looped", "n_loops": 1,
                                                                         "seed": 0, "lr": 3e-3})
    # a looped run at the faster rate is held to the gentlest rate too, told what the faster one got
    faster = {"arch": "looped", "n_loops": LOOPS, "seed": 0, "lr": 3e-3}
    assert reference_record(tmp_path / "sweep", faster) == reference
    assert rejudge_suite(tmp_path / "slow-only") == {"looped-k01-lr0.0002": "failed_to_train",
                                                     "looped-k04-lr0.0002": "stable"}


def test_a_run_stuck_at_token_statistics_is_warned_against_its_reference_s_curve(tmp_path: Path):
    """Positions distinct, gradients alive, the loss stalled where token frequencies put it
    while the one-loop run of the suite had left that level: warned mid-run, by the step the
    reference had got there, in the rejudged events and in `analyze --reference`."""
    from loopdiag.analysis.analyzer import replayed_verdict
    from loopdiag.store import load_run

    cells = {}
    for n_loops, stalled in ((1, False), (LOOPS, True)):
        run_id = f"looped-k{n_loops:02d}-s0"
        cells[run_id] = {"arch": "looped", "n_loops": n_loops, "seed": 0, "lr": 3e-3}
        with RunWriter(tmp_path / run_id, {"cell": cells[run_id], "train": {"steps": STEPS},
                                           "detectors": {}, "data": {"context_free_loss": 3.3}}) as run:
            for step in range(1, STEPS + 1):
                level = 3.3 + 2.2 * math.exp(-step / 3)
                if not stalled:
                    level -= 1.1 * (1 - math.exp(-max(0, step - 15) / 20))
                run.log({"step": step, "loss": level * (1 + 0.02 * math.sin(step)),
                         "token_corr": [0.5] * n_loops})
            run.close({"status": "stable", "step": None, "signal": None})
    write_suite_manifest(tmp_path, {"name": "tiny"}, cells)
    assert rejudge_suite(tmp_path)["looped-k04-s0"] == "failed_to_train"
    events = [json.loads(line) for line in (tmp_path / "looped-k04-s0" / "events.jsonl").open()]
    (behind,) = [event for event in events if event["detector"] == "behind_reference"]
    assert behind["severity"] == "warn" and behind["step"] < STEPS / 2
    assert f"by step {behind['evidence']['reference_step']}" in behind["message"]
    summary = json.loads((tmp_path / "looped-k04-s0" / "summary.json").read_text())
    assert summary["first_warning_step"] == behind["step"]

    run = load_run(tmp_path / "looped-k04-s0")
    reference = {"expected_loss": summary["reference"]["expected_loss"]}
    replayed = replayed_verdict(run, reference, tmp_path / "looped-k01-s0")
    assert [e for e in replayed["events"] if e["detector"] == "behind_reference"] == [behind]
    # a loss alone, with no curve behind it, warns only at the end
    replayed = replayed_verdict(run, reference)
    assert not [e for e in replayed["events"] if e["detector"] == "behind_reference"]
