"""The detection benchmark's labelling and scoring, on synthetic records (no training)."""

import json
import math
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import loaded


@pytest.fixture(scope="module")
def bench():
    yield from loaded("detection.py", "detection_benchmark")


def records(losses):
    return [{"step": step, "loss": float(loss)} for step, loss in enumerate(losses, 1)]


STEPS = 300
LEARNING = 2.0 + 3.5 * np.exp(-np.arange(STEPS) / 40)  # 5.5 → 2.0, like the reference


def test_tracking_the_reference_is_healthy(bench):
    assert bench.label_run(records(LEARNING * 1.05), records(LEARNING)) == bench.Label("healthy", None)


def test_a_plateau_above_the_reference_failed_to_train(bench):
    plateau = np.maximum(LEARNING, 3.3)  # stuck where the reference keeps learning
    label = bench.label_run(records(plateau), records(LEARNING))
    assert label.kind == "failed to train"
    # The EMA lags: the onset comes a little after the reference falls below 3.0.
    below = int(np.argmax(LEARNING < 3.3 / 1.1)) + 1
    assert below <= label.onset <= below + 20


def test_a_rise_after_learning_uses_ground_truth_onset(bench):
    rising = LEARNING.copy()
    rising[200:] = 4.0
    label = bench.label_run(records(rising), records(LEARNING))
    assert label.kind == "rose" and 200 <= label.onset <= 215


def test_non_finite_tail_fails_against_the_reference(bench):
    losses = [3.0] * 10 + [math.nan] * 5
    onset = bench.failed_to_train_onset(list(range(1, 16)), losses, list(range(1, 16)), [3.0] * 15)
    assert onset == 11


def scored_run(bench, name, kind, onset, alarm_steps, detector="collapse_plateau", steps=STEPS,
               status="stable", first_warning=None, early_loss=3.0, reference_early_loss=3.0,
               final_loss=2.0, lowest_loss=None, context_free_loss=None, reference_alarm_steps=()):
    judged = {"status": status, "first_warning_step": first_warning, "step": None,
              "signal": None, "mechanism": None}
    return bench.ScoredRun(
        name=name, group="g", expected="–", seed=1, label=bench.Label(kind, onset), steps=steps,
        first_step=1,
        final_smoothed_loss=final_loss, early_smoothed_loss=early_loss,
        reference_early_smoothed_loss=reference_early_loss,
        lowest_smoothed_loss=final_loss if lowest_loss is None else lowest_loss,
        context_free_loss=context_free_loss,
        alarms=tuple({"step": s, "detector": detector, "severity": "warn", "message": ""}
                     for s in alarm_steps),
        reference_alarms=tuple({"step": s, "detector": "behind_reference", "severity": "warn",
                                "message": ""} for s in reference_alarm_steps),
        verdicts={mode: judged for mode in bench.MODES})


def test_verdict_scores_count_against_the_labels(bench):
    runs = [
        scored_run(bench, "caught-early", "failed to train", 100, [], status="collapsed",
                   first_warning=30),  # 30 <= 15 % of 300 steps
        scored_run(bench, "caught-late", "failed to train", 100, [], status="failed_to_train",
                   first_warning=200),
        scored_run(bench, "missed", "rose", 150, [], status="stable"),
        scored_run(bench, "rose-warned", "rose", 150, [], status="collapsed", first_warning=140),
        scored_run(bench, "healthy", "healthy", None, []),
        scored_run(bench, "false-collapse", "healthy", None, [], status="collapsed"),
    ]
    v = bench.score_verdicts(runs, bench.MODES[0])
    assert (v.failed, v.failed_not_stable, v.healthy, v.healthy_collapsed) == (4, 3, 2, 1)
    assert (v.never_trained, v.never_trained_early, v.rose, v.rose_before_onset) == (2, 1, 2, 1)
    assert v.failed_statuses == {"collapsed": 2, "failed_to_train": 1, "stable": 1}


def test_study_labels_against_the_healthy_one_loop_loss(bench):
    assert bench.study_label(records(LEARNING), 2.0).kind == "healthy"
    stuck = bench.study_label(records(np.maximum(LEARNING, 3.3)), 2.0)
    assert stuck.kind == "failed to train" and stuck.onset == 1
    rising = LEARNING.copy()
    rising[200:] = 4.0
    assert bench.study_label(records(rising), 2.0).kind == "rose"


def test_score_counts_recall_lead_and_false_alarms(bench):
    runs = [
        scored_run(bench, "early", "failed to train", 100, [60, 90]),  # lead 40
        scored_run(bench, "on-time", "rose", 150, [150]),  # lead 0
        scored_run(bench, "late", "rose", 150, [165]),  # within onset + 20 only
        scored_run(bench, "missed", "failed to train", 80, []),
        scored_run(bench, "quiet", "healthy", None, []),
        scored_run(bench, "noisy", "healthy", None, [10, 200]),
        scored_run(bench, "other-detector", "healthy", None, [50], detector="loss_spike"),
    ]
    result = bench.score("plateau", runs, {"collapse_plateau"})
    assert (result.collapses, result.caught_before, result.caught_within, result.caught_by_end) == (
        4, 2, 3, 3)
    assert result.median_lead == 20 and result.leads == {"early": 40, "on-time": 0}
    assert (result.healthy_runs, result.healthy_steps) == (3, 3 * STEPS)
    assert (result.false_alarms, result.alarmed_healthy_runs) == (2, 1)
    assert result.false_alarm_rate == pytest.approx(2 * 10_000 / (3 * STEPS))


def detector_score(bench, leads, alarms=(), caught=None, warnable=10, healthy=8):
    """A detector set's score over 10 failures and `healthy` healthy runs (10k steps):
    `leads` by failure caught before onset, `alarms` on healthy runs h0, h1, ... (the rest
    none), `caught` the failures alarmed at any step (default: those of `leads`)."""
    per_run = {f"h{i}": (list(alarms) + [0] * healthy)[i] for i in range(healthy)}
    caught = frozenset(leads if caught is None else caught)
    return bench.Score("x", collapses=10, caught_within=len(leads), warnable=warnable, leads=leads,
                       healthy_steps=10_000, caught_runs=caught, alarms_by_healthy_run=per_run)


NINE = "abcdefghi"


def test_compare_needs_a_better_axis_and_no_worse_one(bench):
    ours = detector_score(bench, {name: 30 for name in NINE})
    noisy = detector_score(bench, {"a": 5}, alarms=[3] * 8)
    # 8 failures only ours caught, 8 healthy runs only theirs alarmed on: both p = 0.008;
    # the one failure both caught says nothing about lead
    assert bench.compare(ours, noisy) == (["recall before onset", "false-alarm rate"], [])
    assert bench.compare(detector_score(bench, {name: 30 for name in NINE}, alarms=[1] * 8),
                         detector_score(bench, {"a": 5})) == (["recall before onset"], ["false-alarm rate"])
    assert bench.compare(detector_score(bench, {}), detector_score(bench, {})) == ([], [])


def test_a_difference_on_a_few_runs_is_no_difference(bench):
    # 5 failures caught by ours only (p = 0.06), one healthy run alarmed by theirs only
    ours = detector_score(bench, {name: 30 for name in "abcde"})
    theirs = detector_score(bench, {}, alarms=[7])
    assert bench.compare(ours, theirs) == ([], [])
    (recall, unit), (alarms, _) = bench.paired_axes(ours, theirs)
    assert (recall.wins, recall.losses, alarms.wins, alarms.losses) == (5, 0, 1, 0)
    assert recall.p == pytest.approx(0.0625) and recall.outcome == "no difference"
    assert recall.text(unit) == ("recall before onset (failures caught by one only: ours on 5, "
                                 "theirs on 0, p = 0.062)")


def test_where_no_failure_can_be_warned_before_onset_recall_is_compared_by_the_end(bench):
    def result(caught, alarms=()):
        return detector_score(bench, {}, alarms, caught=caught, warnable=0)

    by_end = "recall by the end of the run"
    assert bench.compare(result("abcdefgh"), result("")) == ([by_end], [])
    # a rule that alarms on every run catches more failures too: worse recall, better rate
    assert bench.compare(result("a"), result("abcdefghij", alarms=[5] * 8)) == (
        ["false-alarm rate"], [by_end])
    assert bench.compare(result(""), result("")) == ([], [])


def test_score_counts_the_failures_that_can_be_warned_before_onset(bench):
    runs = [scored_run(bench, "stuck", "failed to train", 1, [50]),
            scored_run(bench, "rose", "rose", 150, [140]),
            scored_run(bench, "healthy", "healthy", None, [])]
    result = bench.score("plateau", runs, {"collapse_plateau"})
    assert (result.warnable, result.caught_before, result.caught_by_end) == (1, 1, 2)


def test_lead_is_compared_run_by_run_on_the_failures_both_caught(bench):
    ours = detector_score(bench, {"a": 0, "b": 0, **{name: 50 for name in "cdefghi"}})
    # their median (93) beats ours (50), over other runs: compared on the 7 both caught
    assert detector_score(bench, {"c": 93}).median_lead == 93 and ours.median_lead == 50
    # ours earlier on 7 of the 9 both caught, later on 2: p = 0.18, no difference
    assert bench.compare(ours, detector_score(bench, {name: 20 for name in "abcdefghi"})) == ([], [])
    later = detector_score(bench, {name: 93 for name in "cdefghi"})  # later on all 7: p = 0.016
    assert bench.compare(ours, later) == ([], [bench.LEAD_AXIS])
    assert bench.compare(later, ours) == ([bench.LEAD_AXIS], [])
    # a failure only they caught: no lead to compare, the recall axis counts it
    assert [paired.axis for paired, _ in bench.paired_axes(ours, detector_score(bench, {"j": 93}))] == [
        "recall before onset", "false-alarm rate"]

    assert bench.common_leads(ours, detector_score(bench, {"c": 93})) == (1, 50, 93)
    assert bench.common_leads(ours, detector_score(bench, {"j": 93})) is None


def test_target_lines_give_the_leads_they_compared_and_the_runs_behind_each_axis(bench):
    anchors = len(bench.anchor_detectors())
    ours = detector_score(bench, {"a": 0, "b": 4, "c": 50})
    lines = bench.target_lines("set", [ours] + [detector_score(bench, {"b": 30, "c": 40})] * anchors, [])
    assert lines[1].endswith("Median lead on the 2 failures both caught before onset: 27 steps "
                             "against 35.")
    assert "**not met** (better: none; worse: none)" in lines[1]
    assert ("Run by run: recall before onset (failures caught by one only: ours on 1, theirs on 0, "
            "p = 1); false-alarm rate (healthy runs with fewer alarms: ours on 0, theirs on 0, p = 1); "
            "lead on the failures both caught before onset (failures warned earlier: ours on 1, "
            "theirs on 1, p = 1).") in lines[1]
    lines = bench.target_lines("set", [ours] + [detector_score(bench, {"d": 9})] * anchors, [])
    assert "Median lead" not in lines[1]


def test_false_warnings_with_a_reference_add_what_only_its_curve_gives_on_healthy_runs(bench):
    runs = [scored_run(bench, "healthy", "healthy", None, [10], reference_alarm_steps=[50, 90]),
            scored_run(bench, "failed", "failed to train", 40, [], reference_alarm_steps=[45])]
    anchors = len(bench.anchor_detectors())
    ours = bench.score(bench.ALL_DEFAULTS, runs, {"collapse_plateau"})
    (line, *_) = bench.target_lines("set", [ours] * (1 + anchors), runs)
    assert f"(1 in {STEPS} steps" in line
    assert "with a reference, **not met** (3, " in line and "2 more from `behind_reference`" in line
    rows = bench.false_alarm_rows(runs)
    assert [row[:4] for row in rows] == [["healthy", "behind_reference (with reference)", 2, 50],
                                         ["healthy", "collapse_plateau", 1, 10]]


def test_misses_say_how_many_healthy_runs_were_as_high_where_the_warning_was_due(bench):
    runs = [
        scored_run(bench, "late", "failed to train", 1, [], status="failed_to_train",
                   first_warning=200, early_loss=3.5, reference_early_loss=3.4),  # due by step 45
        scored_run(bench, "behind", "failed to train", 1, [], status="failed_to_train",
                   first_warning=200, early_loss=3.5, reference_early_loss=3.0),
        scored_run(bench, "early", "failed to train", 1, [], status="collapsed",
                   first_warning=40, early_loss=3.9),
        scored_run(bench, "slow", "healthy", None, [], early_loss=3.6),
        scored_run(bench, "fast", "healthy", None, [], early_loss=3.4),
    ]
    (line,) = bench.miss_lines(runs)
    assert line.startswith("- 2 runs that never trained were not warned within 15% of their steps")
    assert "`late` (3.5; 3.4; 1)" in line and "`behind` (3.5; 3; 1)" in line
    assert "`early`" not in line
    # 3.5 is 3 % above 3.4 and 17 % above 3.0
    assert line.endswith("1 of the 2 were 10% (the labels' gap) or more above that healthy model "
                         "there. 2 of them trained on data whose context-free loss is unknown, "
                         "so whether they trained at all is unknown too.")


def test_runs_not_warned_early_are_told_apart_by_whether_they_trained(bench):
    def late(name, lowest, floor=3.2):
        return scored_run(bench, name, "failed to train", 1, [], status="failed_to_train",
                          first_warning=200, lowest_loss=lowest, context_free_loss=floor)
    never, behind = bench.miss_lines([late("learned", 1.6), late("learned-less", 2.56),
                                      late("stuck", 3.1), late("unknown-data", 1.0, floor=None)])
    # 3.1 is within 10 % of 3.2; with the floor unknown, whether a run trained is too
    assert never.startswith("- 2 runs that never trained were not warned")
    assert "`stuck`" in never and "`unknown-data`" in never and "`learned`" not in never
    assert never.endswith(" 1 of them trained on data whose context-free loss is unknown, so "
                          "whether they trained at all is unknown too.")
    # 1.6 and 2.56 are 0.50 and 0.80 of 3.2
    assert behind.startswith("- 2 runs that trained but ended behind were not warned")
    assert behind.endswith(" At their lowest they were 0.50–0.80 of the context-free loss (what "
                           "the data's token frequencies alone give): they trained, less far "
                           "than that healthy model.")
    (line,) = bench.miss_lines([late("stuck", 3.1)])
    assert line.startswith("- 1 run that never trained was not warned")
    assert line.endswith("None of them got 10% below the context-free loss (what the data's token "
                         "frequencies alone give): they never trained.")


def test_only_runs_that_never_trained_have_the_early_warning_target(bench):
    def failed(name, lowest, first_warning):
        return scored_run(bench, name, "failed to train", 1, [], status="failed_to_train",
                          first_warning=first_warning, lowest_loss=lowest, context_free_loss=3.2)
    runs = [failed("stuck-warned", 3.2, 30), failed("stuck-late", 3.0, 200),
            failed("behind-warned", 2.0, 10), failed("behind-late", 2.0, 200),
            failed("behind-late-2", 2.85, 290)]  # 2.85 is 11 % below 3.2
    v = bench.score_verdicts(runs, bench.MODES[1])
    assert (v.never_trained, v.never_trained_early, v.fell_behind, v.fell_behind_early) == (2, 1, 3, 1)
    (line,) = bench.verdict_target_lines("set", [v])
    assert "never trained warned within 15% of their steps: **not met** (1/2 (50%); of those " \
           "that trained but ended behind, no target, 1/3 (33%))" in line
    assert ("judged not stable ≥ 99%: **met** (5/5 (100%): never trained 2/2, trained but ended "
            "behind 3/3)") in line


def test_misses_without_a_reference_say_how_many_a_healthy_run_ended_as_high_as(bench):
    runs = [scored_run(bench, "hidden", "failed to train", 1, [], final_loss=2.4),
            scored_run(bench, "plain", "failed to train", 1, [], final_loss=3.1),
            scored_run(bench, "caught", "failed to train", 1, [], status="collapsed", final_loss=3.2),
            scored_run(bench, "slow", "healthy", None, [], final_loss=2.5),
            scored_run(bench, "fast", "healthy", None, [], final_loss=2.1)]
    listed, bound, _ = bench.miss_lines(runs)[:3]
    assert listed.startswith("- no reference: 2 failed runs judged stable: `hidden`")
    assert bound.startswith("  1 of the 2 ended no higher than one of the set's 2 healthy runs "
                            "(the highest of those ended at 2.5)")


def test_misses_name_the_late_collapses_warned_at_or_after_their_onset(bench):
    runs = [scored_run(bench, "ahead", "rose", 100, [], status="collapsed", first_warning=80),
            scored_run(bench, "at", "rose", 100, [], status="collapsed", first_warning=100),
            scored_run(bench, "after", "rose", 100, [], status="collapsed", first_warning=107),
            scored_run(bench, "silent", "rose", 100, [], status="stable")]
    at, after = bench.miss_lines(runs)[-2:]
    assert at.startswith("- 1 of the 4 late collapses was first warned (without a reference) at "
                         "their onset step") and "`at`" in at
    assert after == ("- 2 of the 4 late collapses were not warned by their onset (without a "
                     "reference): `after` (onset 100, "
                     "first warning 107), `silent` (onset 100, first warning none).")


def test_a_ramp_setting_raises_the_learning_rate_over_the_whole_run(bench):
    from loopdiag.train import TrainConfig
    from loopdiag.train.optim import lr_multiplier

    ramp = next(setting for setting in bench.SETTINGS if setting.lr_ramp)
    config = TrainConfig(**ramp.train_config(STEPS))
    multipliers = [lr_multiplier(step, config) for step in range(STEPS)]
    assert multipliers[0] < 0.01 and multipliers[-1] == pytest.approx(1.0)
    assert all(later >= earlier for earlier, later in zip(multipliers, multipliers[1:]))
    assert multipliers[STEPS // 2] == pytest.approx(0.5, abs=0.01)
    plain = next(setting for setting in bench.SETTINGS if not setting.lr_ramp)
    assert lr_multiplier(0, TrainConfig(**plain.train_config(STEPS))) == 1.0


def test_key_value_overrides_parse_literals_and_refuse_malformed_pairs(bench):
    assert bench.key_value_overrides(["d_model=64", "logit_softcap=None", "loss_on=last"]) == [
        ("d_model", 64), ("logit_softcap", None), ("loss_on", "last")]
    for bad in ("d_model", "=64"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            bench.key_value_overrides([bad])


def test_a_cached_run_of_other_data_or_size_is_not_reused(bench, tmp_path):
    setting = bench.SETTINGS[0]
    tiny = bench.CorpusSpec(300)
    config = {"train": tiny.train_config(setting), "data": {"source": "/elsewhere/argparse.py", "sha256": "ab12"},
              "model": tiny.model_config(setting), "probes": {"log_every": 1}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert not bench.is_finished(tmp_path, setting, tiny, "ab12")  # no summary: it did not finish
    (tmp_path / "summary.json").write_text("{}")
    # the same text read from another path (another machine's standard library) is reused
    assert bench.is_finished(tmp_path, setting, tiny, "ab12")
    assert not bench.is_finished(tmp_path, setting, tiny, "cd34")  # other text
    assert not bench.is_finished(tmp_path, setting, bench.CorpusSpec(200), "ab12")
    assert not bench.is_finished(tmp_path, setting, bench.CorpusSpec(300, model=(("d_model", 64),)), "ab12")
    assert not bench.is_finished(tmp_path, setting, bench.CorpusSpec(300, train=(("batch_size", 8),)), "ab12")
    assert not bench.is_finished(tmp_path, setting, bench.CorpusSpec(300, log_every=4), "ab12")


def test_a_recipe_trains_every_setting_but_leaves_a_ramp_its_schedule(bench):
    recipe = bench.CorpusSpec(400, train=(("schedule", "cosine"), ("warmup_steps", 40),
                                          ("min_lr_ratio", 0.1), ("batch_size", 8)))
    plain = next(s for s in bench.SETTINGS if not s.lr_ramp)
    ramp = next(s for s in bench.SETTINGS if s.lr_ramp)
    assert recipe.train_config(plain) == {"schedule": "cosine", "warmup_steps": 40, "min_lr_ratio": 0.1,
                                          "batch_size": 8, "steps": 400, "grad_clip": plain.grad_clip}
    ramped = recipe.train_config(ramp)
    assert (ramped["schedule"], ramped["warmup_steps"], ramped["min_lr_ratio"]) == ("cosine", 399, 1.0)
    assert ramped["batch_size"] == 8


def test_steps_are_training_steps_when_only_every_nth_is_logged(bench):
    every_20th = [{"step": 20 * i, "loss": float(loss)} for i, loss in
                  enumerate(np.linspace(5.0, 2.0, 150), 1)]  # steps 20..3000
    reference = [{"step": 20 * i, "loss": float(loss)} for i, loss in
                 enumerate(np.linspace(4.0, 1.0, 150), 1)]
    run = bench.judged_run("sparse", "g", "–", 1, every_20th, bench.Label("healthy", None), None, None,
                           [reference])
    assert (run.first_step, run.steps) == (20, 3000)
    # the early loss is read at 15 % of the 3,000 steps (step 440), not of the 150 records,
    # and the healthy reference's at the same step
    smoothed = bench.smoothed_losses([r["loss"] for r in every_20th])
    assert run.early_smoothed_loss == smoothed[21]
    assert run.reference_early_smoothed_loss == bench.smoothed_losses([r["loss"] for r in reference])[21]


@pytest.mark.parametrize("args, message", [
    (["--model", "d_model=30", "n_heads=4"], "--model: ModelConfig.d_model (30) must be divisible"),
    (["--model", "depth=3"], "--model: ModelConfig.__init__() got an unexpected keyword"),
    (["--data", "no-such-notes.txt"], "--data: no such file: no-such-notes.txt"),
    (["--seeds", "3"], "only seeds >= 11 are scored"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--log-every", "0"], "--log-every must be >= 1, got 0"),
    (["--rescore", "--log-every", "4"], "without training: drop --log-every"),
    (["--rescore", "--steps", "300", "--reuse"], "--rescore scores the runs as they were recorded, "
                                                 "without training: drop --steps, --reuse"),
    (["--rescore", "--train", "batch_size=8"], "without training: drop --train"),
    (["--train", "lr=0.1", "batch_size=8"], "--train: lr belong to each setting, not to the recipe"),
    (["--train", "schedule=linear"], "--train: TrainConfig.schedule must be one of"),
    (["--train", "warmup_steps=300"], "--train: TrainConfig.warmup_steps must be an int in [0, steps=300)"),
    (["--train", "momentum=0.9"], "--train: TrainConfig.__init__() got an unexpected keyword"),
])
def test_bad_arguments_are_refused_with_a_usage_error(bench, args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_arguments_make_the_corpus_spec(bench, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("some text")
    args, seeds, spec = bench.parse_args(["--seeds", "13", "11", "13", "--data", str(notes),
                                          "--model", "d_model=64", "n_heads=4", "--out", "r/x"])
    assert seeds == [11, 13]
    assert spec == bench.CorpusSpec(300, (str(notes),), (("d_model", 64), ("n_heads", 4)))
    _, _, spec = bench.parse_args(["--seeds", "11", "--train", "schedule=cosine", "warmup_steps=40"])
    assert spec.train == (("schedule", "cosine"), ("warmup_steps", 40))
    assert spec.log_every == 1
    _, _, spec = bench.parse_args(["--seeds", "11", "--log-every", "4"])
    assert spec.log_every == 4
    assert args.cache == Path("r/x/runs")  # the records live beside the report that scores them


def test_rescoring_needs_every_run_finished_on_one_text(bench, tmp_path):
    def finish(name, sha="ab12", steps=300):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(
            {"train": {"steps": steps}, "data": {"sha256": sha, "context_free_loss": 3.2}}))
        (tmp_path / name / "summary.json").write_text("{}")
    names = [bench.run_name(setting, 11) for setting in bench.SETTINGS]
    for name in names[1:]:
        finish(name)
    with pytest.raises(ValueError, match=f"holds no finished run {names[0]}, "
                                         f"{bench.REFERENCE}-s0: train them first"):
        bench.recorded_corpus([11], tmp_path)
    finish(names[0])
    finish(f"{bench.REFERENCE}-s0", steps=400)
    with pytest.raises(ValueError, match="trained on 2 different texts or lengths"):
        bench.recorded_corpus([11], tmp_path)
    (tmp_path / f"{bench.REFERENCE}-s0" / "config.json").write_text(json.dumps(
        {"train": {"steps": 300}, "data": {"sha256": "ab12", "context_free_loss": 3.2}}))
    assert bench.recorded_corpus([11], tmp_path)["data"]["context_free_loss"] == 3.2


def test_a_committed_corpus_is_rescored_without_its_text(tmp_path):
    """The prose corpus was trained on a file this machine need not have: its records alone
    give the report."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "benchmarks/detection.py", "--seeds", "28", "--rescore", "--study",
         "--cache", "reports/detection/prose/runs", "--out", str(tmp_path)],
        cwd=root, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "(no training in this invocation; trained by `python benchmarks/detection.py --seeds 28 29 30 " \
           "--steps 400 --data" in report  # the command the cache's manifest keeps
    assert "13 runs: 13 settings × seeds 28" in report and "400 steps each" in report
    assert "| corpus | with reference |" in report


def write_study(root, finals_by_run):
    """A suite's run store of loss-only runs, each falling to its final loss."""
    runs = []
    for run_id, (arch, n_loops, seed, final) in finals_by_run.items():
        run_dir = root / run_id
        run_dir.mkdir(parents=True)
        losses = final + 3.0 * np.exp(-np.arange(STEPS) / 20)
        (run_dir / "config.json").write_text(json.dumps({}))
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps(r) + "\n" for r in records(losses)))
        (run_dir / "summary.json").write_text(json.dumps({"status": "stable"}))
        runs.append({"run_id": run_id, "cell": {"arch": arch, "n_loops": n_loops, "seed": seed,
                                                "lr": 3e-3}})
    (root / "suite.json").write_text(json.dumps({"name": "s", "runs": runs}))


def test_study_runs_are_labelled_against_the_one_loop_model_of_their_seed(bench, tmp_path, capsys):
    # seed 1's one-loop model ends far below seed 0's: a cross-seed median would call seed
    # 0's runs, its one-loop model included, failed
    write_study(tmp_path, {"standard-k01-s0": ("standard", 1, 0, 1.4),
                           "looped-k04-s0": ("looped", 4, 0, 1.45),
                           "standard-k01-s1": ("standard", 1, 1, 0.8),
                           "looped-k04-s1": ("looped", 4, 1, 1.45),
                           "looped-k04-s2": ("looped", 4, 2, 1.0)})  # no reference: left out
    runs, healthy = bench.score_study(tmp_path)
    assert healthy == pytest.approx({0: 1.4, 1: 0.8}, abs=1e-3)
    labels = {run.name: run.label.kind for run in runs}
    assert labels == {"standard-k01-s0": "healthy", "looped-k04-s0": "healthy",
                      "standard-k01-s1": "healthy", "looped-k04-s1": "failed to train"}
    assert "the runs of seed(s) 2 are left out" in capsys.readouterr().out


def test_a_study_run_is_judged_against_the_gentlest_rate_that_did_not_diverge(bench, tmp_path):
    """As a suite sets it (`store.reference`): the one-loop run at the gentlest rate is the
    bar, unless it went non-finite; then its last finite loss, near its first, is no bar."""
    runs = []
    for run_id, n_loops, lr, final, diverged in (("standard-k01-lr0.001", 1, 1e-3, 1.3, True),
                                                   ("standard-k01-lr0.003", 1, 3e-3, 1.4, False),
                                                   ("standard-k04-lr0.01", 4, 1e-2, 2.0, False)):
        losses = final + 3.0 * np.exp(-np.arange(STEPS) / 20)
        if diverged:
            losses[5:] = np.nan
        (tmp_path / run_id).mkdir()
        (tmp_path / run_id / "config.json").write_text(json.dumps({}))
        (tmp_path / run_id / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(losses)))
        (tmp_path / run_id / "summary.json").write_text(json.dumps({"status": "diverged" if diverged else "stable"}))
        runs.append({"run_id": run_id, "cell": {"arch": "standard", "n_loops": n_loops, "seed": 0, "lr": lr}})
    (tmp_path / "suite.json").write_text(json.dumps({"name": "s", "runs": runs}))
    scored = {run.name: run for run in bench.score_study(tmp_path)[0]}
    # 2.0 is 43 % behind the run at 3e-3; the diverged run's last smoothed loss is above 4
    assert scored["standard-k04-lr0.01"].verdicts["with reference"]["status"] == "failed_to_train"
    assert scored["standard-k04-lr0.01"].verdicts["no reference"]["status"] == "stable"


def test_the_reported_command_runs_elsewhere_with_standard_library_data(bench, tmp_path):
    """A report names the data as another machine can find it: the standard library by a
    variable the command sets, never this machine's path to it."""
    stdlib_file = str(Path(sysconfig.get_path("stdlib")) / "argparse.py")
    line = bench.shared_command(["test", "-f", stdlib_file])
    assert stdlib_file not in line and '"$STDLIB/argparse.py"' in line
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    assert subprocess.run(["bash", "-c", line], env=env).returncode == 0
    assert bench.shared_path(str(tmp_path / "mine.txt")) == str(tmp_path / "mine.txt")


def test_a_studys_report_says_when_its_text_was_read_as_a_tokenizers_ids(bench):
    text = {"source": "/data/notes.txt", "n_bytes": 700_000, "sha256": "ab" * 32, "vocab_size": 256}  # bytes
    assert bench.data_text({"data": text}) == "text `/data/notes.txt` (700,000 bytes, sha256 abababababab…)"
    bpe = {**text, "tokenizer": "byte-level BPE", "vocab_size": 2048, "n_tokens": 237_828}
    assert bench.data_text({"data": bpe}).endswith("as 237,828 ids of a byte-level BPE of 2,048 tokens")
    many = {**text, "source": ", ".join(f"/data/{name}.txt" for name in "abcde")}  # a glob's files
    assert bench.data_text({"data": many}).startswith("text `/data/a.txt` to `/data/e.txt`, 5 files (700,000")


def test_a_corpus_report_names_the_model_choices_its_runs_were_trained_with():
    """The corpus line reads the stored config, so an override such as the loss on every
    loop or no QK-norm is there to read, not only in the training command."""
    for name, choices in (("deepsup", "the loss on every loop"),
                          ("noqknorm", "no QK-norm, output projections initialised as GPT-2's"),
                          ("tz", "d_model 24, 2 heads, 1 layer, seq_len 48, an MLP 4× the width")):
        text = (REPO / "reports/detection" / name / "README.md").read_text(encoding="utf-8")
        corpus = text.split("## The corpus", 1)[1].split("\n\n", 2)[1]
        assert choices in " ".join(corpus.split()), name


# --- the README's and docs/verdicts.md's summary of the committed reports --------------------

REPO = Path(__file__).resolve().parent.parent
SET_BY_SET = REPO / "docs/verdicts.md"  # each set's row and every miss; the README has the pooled table
FRACTION = r"(\d+)/(\d+)"


def fractions(cell):
    """The a/b counts in a table cell, in order (commas in counts dropped)."""
    return [(int(a), int(b)) for a, b in re.findall(FRACTION, cell.replace(",", ""))]


def table_rows(text, header_start):
    """The cells of each body row of the markdown table whose header row starts so."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def report_claims(report, runs):
    """What a committed detection report says of one set of runs: its verdict rows by mode
    and its false warnings (count, healthy steps)."""
    text = report.read_text(encoding="utf-8")
    verdicts = {row[1]: row for row in table_rows(text, "| runs | mode |") if row[0] == runs}
    warnings = re.search(rf"^- {re.escape(runs)}: ≤ 1 false warning per 10k healthy steps: "
                         rf"\*\*(?:not )?met\*\* \((\d+) in (\d+) steps", text, re.MULTILINE)
    return verdicts, (int(warnings[1]), int(warnings[2]))


def test_the_set_by_set_table_summarises_the_committed_detection_reports_as_they_stand():
    """Each row of the set-by-set trust table against the report it links (a study's, in the
    corpus report): the counts a reader is given are the counts the records give."""
    readme = SET_BY_SET.read_text(encoding="utf-8")
    rows = table_rows(readme, "| set (runs) |")
    assert len(rows) >= 3
    for name, not_stable, never, behind, rose, collapsed, warnings in rows:
        link = re.match(r"\[[^]]+\]\(([^)]+)\)", name)
        study = re.match(r"study `([^`]+)`", name)
        report = SET_BY_SET.parent / link[1] if link else REPO / "reports/detection/README.md"
        verdicts, (false_warnings, healthy_steps) = report_claims(report, study[1] if study else "corpus")
        no_ref, with_ref = verdicts["no reference"], verdicts["with reference"]
        failed, healthy = fractions(with_ref[2])[0][1], fractions(with_ref[4])[0][1]
        assert f"({failed + healthy})" in name, name
        assert fractions(not_stable)[:2] == [fractions(with_ref[2])[0], fractions(no_ref[2])[0]], name
        for cell, column in ((never, 6), (behind, 7), (rose, 8)):
            expected = fractions(no_ref[column])[:1]
            assert fractions(cell)[:1] == expected, (name, cell, no_ref[column])
        both = [fractions(with_ref[4])[0], fractions(no_ref[4])[0]]
        in_cell = fractions(collapsed)  # where the modes differ, with ref. / no ref.
        assert in_cell[:2] == both if both[0] != both[1] else in_cell[0] == both[0], name
        given = re.match(r"(\d+) in ([\d,]+) steps", warnings)
        assert given, warnings
        assert (int(given[1]), int(given[2].replace(",", ""))) == (false_warnings, healthy_steps), name


def test_the_late_collapse_total_is_the_sum_of_its_sets():
    readme = SET_BY_SET.read_text(encoding="utf-8")
    warned = total = 0
    for row in table_rows(readme, "| set (runs) |"):
        if fractions(row[4]):
            count, of = fractions(row[4])[0]
            warned, total = warned + count, total + of
    claim = re.search(r"\*\*Late collapses\*\*: (\d+) of (\d+) warned by onset", readme)
    assert claim and (int(claim[1]), int(claim[2])) == (warned, total)


def test_the_reference_studys_readme_gives_the_counts_its_records_give():
    text = (REPO / "reports/flt-stability/README.md").read_text(encoding="utf-8")
    verdicts, (false_warnings, healthy_steps) = report_claims(
        REPO / "reports/detection/README.md", "flt-stability")
    no_ref, with_ref = verdicts["no reference"], verdicts["with reference"]

    def claimed(pattern):
        found = re.search(pattern, text)
        assert found, pattern
        return int(found[1]), int(found[2].replace(",", ""))

    assert claimed(r"judged not stable\*\* \((\d+)/(\d+)\)") == fractions(with_ref[2])[0]
    assert claimed(r"Without that reference (\d+)/(\d+)") == fractions(no_ref[2])[0]
    assert claimed(r"judged collapsed\*\* \((\d+)/(\d+)\)") == fractions(with_ref[4])[0]
    assert claimed(r"\((\d+) in ([\d,]+) healthy steps") == (false_warnings, healthy_steps)


def test_the_count_of_healthy_runs_the_z_score_rule_alarms_is_every_reports():
    alarmed = healthy = 0
    for report in [REPO / "reports/detection/README.md", *(REPO / "reports/detection").glob("*/README.md")]:
        for row in re.finditer(r"^\| zscore_3sigma_30 \|.*\| (\d+)/(\d+) \|$",
                               report.read_text(encoding="utf-8"), re.MULTILINE):
            alarmed, healthy = alarmed + int(row[1]), healthy + int(row[2])
    claim = re.search(r"it alarms on (\d+) of the (\d+) healthy runs",
                      SET_BY_SET.read_text(encoding="utf-8"))
    assert claim and (int(claim[1]), int(claim[2])) == (alarmed, healthy)


def summed_over_reports(pattern: str, flags: int = 0) -> list[int]:
    """Each group of `pattern`, summed over its matches in every committed detection report."""
    totals = [0] * re.compile(pattern).groups
    for report in [REPO / "reports/detection/README.md", *(REPO / "reports/detection").glob("*/README.md")]:
        for match in re.finditer(pattern, report.read_text(encoding="utf-8"), flags):
            totals = [total + int(group) for total, group in zip(totals, match.groups())]
    return totals


def test_the_count_of_runs_that_fell_behind_unwarned_is_every_reports():
    """The count of runs that trained, ended behind and were not warned within 15 %,
    and of those already 10 % behind there, summed from every report's miss line."""
    ahead, late = summed_over_reports(r"(\d+) of the (\d+) (?:was|were) 10% \(the labels' gap\) or more "
                                      r"above that healthy model there\. At their lowest")
    claim = re.search(r"at 15 % of their steps (\d+) of the (\d+) were less than 10 % above",
                      SET_BY_SET.read_text(encoding="utf-8"))
    assert claim and (int(claim[1]), int(claim[2])) == (late - ahead, late)


def test_the_readmes_count_of_never_trained_runs_warned_late_is_every_reports():
    """The pooled summary's runs that never trained and were warned after 15 % (with a
    reference), and of those within the labels' gap of their healthy model there."""
    ahead, late = summed_over_reports(r"that never trained w(?:as|ere) not warned within 15% of their steps "
                                      r"\(with reference\).*? (\d+) of the (\d+) w(?:as|ere) 10% "
                                      r"\(the labels' gap\)")
    claim = re.search(r"(\d+) runs that never trained are warned after 15 % of their steps, (\d+) of them "
                      r"then within 10 % of their healthy model",
                      " ".join((REPO / "README.md").read_text(encoding="utf-8").split()))
    assert late and claim and (int(claim[1]), int(claim[2])) == (late, late - ahead)


def test_the_count_of_late_collapses_warned_at_onset_is_every_reports():
    at_onset, = summed_over_reports(r"^- (\d+) of the \d+ late collapses w(?:as|ere) first warned "
                                    r"\(without a reference\) at their onset step itself", re.MULTILINE)
    claim = re.search(r"\*\*Late collapses\*\*: \d+ of \d+ warned by onset across the [a-z-]+ "
                      r"sets that have them, (\d+) of them at", SET_BY_SET.read_text(encoding="utf-8"))
    assert claim and int(claim[1]) == at_onset


def test_the_count_of_healthy_runs_judged_failed_to_train_with_a_reference_is_every_reports():
    judged = 0
    for report in [REPO / "reports/detection/README.md", *(REPO / "reports/detection").glob("*/README.md")]:
        for line in re.finditer(r"^- with reference: \d+ healthy runs? judged not stable"
                                r"(?: \(([^)]*)\))?: (.*)$",
                                report.read_text(encoding="utf-8"), re.MULTILINE):
            if line[1] is None:
                judged += line[2].count("(failed_to_train by ")
            else:  # a list cut at 12 runs gives the count of each verdict before it
                failed = re.search(r"(\d+) failed_to_train", line[1])
                judged += int(failed[1]) if failed else 0
    claim = re.search(r"with a reference, (\d+) healthy runs are judged failed to train",
                      " ".join(SET_BY_SET.read_text(encoding="utf-8").split()))
    assert claim and int(claim[1]) == judged
