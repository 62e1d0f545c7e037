"""The mid-run benchmark: committed corpora scored as if their runs had stopped early (no
training)."""

import pytest
from benchmark_scripts import BENCHMARKS, loaded


@pytest.fixture(scope="module")
def mid_run():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))  # it imports the detection benchmark
        yield from loaded("mid_run.py", "mid_run")


@pytest.fixture(scope="module")
def tz(mid_run):
    from missing_statistics import ROOT, DetectionSet

    return DetectionSet("tz", ROOT / "reports/detection/tz/runs", (67,))


def test_a_cut_keeps_each_run_up_to_its_share_of_the_steps_and_labels_it_there(mid_run, tz):
    from detection import records_until, recorded_statistics

    run = tz.path / "looped-k04-lr3e-3-s67"
    records = recorded_statistics(run)
    assert records_until(records, run, None) is records
    half = records_until(records, run, 0.5)
    assert half and half[-1]["step"] == 200 and half == records[:len(half)]  # 400 steps

    whole, early = mid_run.cut(tz, None), mid_run.cut(tz, 0.25)
    assert whole.labels.keys() == early.labels.keys()
    both = early.steps.keys() & whole.steps.keys()
    assert both and all(early.steps[name] < whole.steps[name] for name in both)
    # at a quarter of the steps fewer failures have shown in the loss
    assert (sum(kind != "healthy" for kind in early.labels.values())
            < sum(kind != "healthy" for kind in whole.labels.values()))


def test_the_table_counts_early_collapse_verdicts_by_what_the_whole_run_did(mid_run):
    modes = ("no reference", "with reference")

    def made(until, labels, statuses, alarms):
        healthy = [name for name, kind in labels.items() if kind == "healthy"]
        return mid_run.Cut("set", until, labels, {mode: statuses for mode in modes},
                           {name: alarms.get(name, 0) for name in healthy},
                           {name: 2500 for name in healthy})

    whole = made(None, {"a": "failed to train", "b": "healthy", "c": "healthy"},
                 {"a": "collapsed", "b": "stable", "c": "stable"}, {"c": 1})
    early = made(0.25, {"a": "healthy", "b": "healthy", "c": "healthy"},
                 {"a": "collapsed", "b": "collapsed", "c": "stable"}, {"a": 2, "b": 1})
    rows = {row[0]: row for row in mid_run.rows([early, whole])}
    # "a" failed over its whole run: judged early, its warnings counted apart
    assert rows["25% of its steps"][3:] == ["2/3", "1 failed, 1 healthy", "2.00 (1 in 5,000)", "2"]
    assert rows["the whole run"][1:] == ["1/1 (100%)", "1/1 (100%)", "0/2", "–", "2.00 (1 in 5,000)", "–"]
    # a set whose reference had risen by the cut labels nothing there, and says so
    unscored = mid_run.Cut("other", 0.25, {}, {mode: {} for mode in modes}, {}, {}, "its reason")
    assert mid_run.rows([early, whole, unscored]) == mid_run.rows([early, whole])
    text = mid_run.report([early, whole, unscored], [], "python benchmarks/mid_run.py", 1.0)
    assert "Not scored at 25% of its steps: other (its reason)." in text


def test_fractions_outside_a_run_are_refused(mid_run, capsys):
    for bad in (["--fractions", "1"], ["--fractions", "0"], ["--workers", "0"]):
        with pytest.raises(SystemExit):
            mid_run.main(bad)
    assert "--fractions must lie in (0, 1)" in capsys.readouterr().err
