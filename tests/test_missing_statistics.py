"""The missing-statistics benchmark: detection sets replayed from fewer statistics, on the
committed records (no training)."""

import re

import pytest
from benchmark_scripts import BENCHMARKS, loaded


@pytest.fixture(scope="module")
def ablation():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))  # it imports the detection benchmark
        yield from loaded("missing_statistics.py", "missing_statistics")


def test_every_committed_report_is_found_with_the_seeds_its_command_scored(ablation):
    sets = {s.name: s for s in ablation.committed_sets()}
    assert sets["corpus"].seeds == tuple(range(11, 22))
    assert sets["changelog"].seeds == (55, 56)  # trained on 55-57, scored on two
    assert sets["changelog"].path == ablation.ROOT / "reports/detection/changelog/runs"
    assert sets["flt-stability"].seeds is None  # a study


def test_a_report_is_found_though_the_text_it_trained_on_is_not_on_this_machine(ablation, tmp_path):
    report = tmp_path / "reports/detection/elsewhere/README.md"
    report.parent.mkdir(parents=True)
    (tmp_path / "reports/detection/README.md").write_text("# Detection quality\n")
    report.write_text("Produced by `python benchmarks/detection.py --seeds 30 31 --data "
                      f"{tmp_path / 'gone.txt'} --out reports/detection/elsewhere`; training took 9 s.\n")
    (found,) = [s for s in ablation.committed_sets(tmp_path) if s.name == "elsewhere"]
    assert found.seeds == (30, 31) and found.path == tmp_path / "reports/detection/elsewhere/runs"


def test_records_keep_the_step_and_the_loss_whatever_else_is_dropped(ablation):
    from detection import recorded_statistics  # the module missing_statistics reads through

    run = ablation.ROOT / "reports/detection/tz/runs/looped-k04-lr3e-3-s67"
    full = recorded_statistics(run)
    bare = recorded_statistics(run, ablation.loss_alone)
    assert len(bare) == len(full) and "token_corr" in full[-1]
    assert all(set(record) <= {"step", "loss"} for record in bare)
    assert [record["loss"] for record in bare] == [record.get("loss") for record in full if "loss" in record]


def test_without_token_correlation_the_representation_detector_is_not_judged(ablation):
    """A model without token correlations gets the detectors that apply, each run saying what
    was not judged, and loses early warnings rather than verdicts."""
    tz = ablation.DetectionSet("tz", ablation.ROOT / "reports/detection/tz/runs", (67,))
    full = ablation.scored("every statistic", tz)
    bare = ablation.scored("no token correlation", tz)
    for result in (full, bare):
        assert result.verdicts["no reference"].failed == 9
        assert result.verdicts["no reference"].healthy_collapsed == 0
    assert bare.verdicts["no reference"].never_trained_early < full.verdicts["no reference"].never_trained_early
    context_free = ablation.context_free_loss(ablation.recorded_corpus((67,), tz.path))
    runs = ablation.score_corpus((67,), tz.path, context_free, ablation.no_token_correlation)
    assert all("representation_collapse" in run.verdicts["no reference"]["not_judged"] for run in runs)
    assert not any(run.verdicts["no reference"]["mechanism"] == "representation" for run in runs)


def test_an_unknown_set_or_bad_worker_count_is_refused(ablation, capsys):
    sets = ablation.committed_sets()
    with pytest.raises(ValueError, match="no committed detection set nosuch; there are: corpus"):
        ablation.chosen(sets, ["tz", "nosuch"])
    assert [s.name for s in ablation.chosen(sets, ["tz"])] == ["tz"]
    with pytest.raises(SystemExit):
        ablation.parse_args(["--workers", "0"])
    assert "--workers must be >= 1" in capsys.readouterr().err


def test_the_set_by_set_page_gives_the_pooled_counts_the_committed_report_gives(ablation):
    report = (ablation.ROOT / "reports/detection/statistics.md").read_text(encoding="utf-8")
    readme = (ablation.ROOT / "docs/verdicts.md").read_text(encoding="utf-8")
    bullet = re.search(r"^- \*\*A model that records less\*\*.*?(?=\n(?!  )|\Z)", readme,
                       re.MULTILINE | re.DOTALL)
    claimed = set(re.findall(r"\b(\d+)/(\d+)\b", bullet[0]))
    pooled = set(re.findall(r"\b(\d+)/(\d+) \(", report.split("By set")[0]))
    assert len(claimed) >= 6 and claimed <= pooled, sorted(claimed - pooled)
    # false warnings without and with a reference: every statistic, no token correlation, loss alone
    rows = {row[0]: re.findall(r"\((\d+) in ([\d,]+)\)", row[1])
            for row in re.findall(r"^\| ([a-z ,]+) \|(.*)$", report, re.MULTILINE)}
    kept = [rows[name] for name in ("every statistic", "no token correlation", "loss alone")]
    text = " ".join(bullet[0].split())
    assert (f"False warnings fall with them, {kept[0][0][0]}, {kept[1][0][0]} and {kept[2][0][0]} "
            f"in {kept[0][0][1]} healthy steps") in text
    assert f"False warnings with it {kept[0][1][0]}, {kept[1][1][0]} and {kept[2][1][0]}." in text


def test_with_a_reference_s_curve_a_model_that_logs_only_its_loss_is_warned_mid_run(ablation):
    """A run that never trained looks, by its loss alone, like any run in its first steps,
    and is judged only at its end; beside its reference's curve it is stuck at token
    statistics long after the reference left them, and is warned then."""
    from detection import score_corpus

    path = ablation.ROOT / "reports/detection/clinic/runs"
    context_free = ablation.context_free_loss(ablation.recorded_corpus((133,), path))
    runs = [run for run in score_corpus((133,), path, context_free, ablation.loss_alone)
            if run.never_trained]
    assert len(runs) == 3
    for run in runs:
        assert run.verdicts["no reference"]["first_warning_step"] == run.steps
        warned = run.verdicts["with reference"]["first_warning_step"]
        assert warned < run.steps / 2
        assert [alarm["step"] for alarm in run.reference_alarms][:1] == [warned]


def test_the_readmes_pooled_targets_are_the_reports(ablation):
    """The README's pooled table against the statistics report's every-statistic row, and the
    healthy runs judged collapsed with a reference against every set's report."""
    report = (ablation.ROOT / "reports/detection/statistics.md").read_text(encoding="utf-8")
    readme = (ablation.ROOT / "README.md").read_text(encoding="utf-8")
    sets, runs = re.search(r"records of (\d+) detection sets \((\d+) runs", report).groups()
    header = re.search(r"^\| records \|(.*)\|$", report, re.MULTILINE)[1].split("|")
    row = re.search(r"^\| every statistic \|(.*)\|$", report, re.MULTILINE)[1].split("|")
    assert [name.strip() for name in header] == [
        "failed runs judged not stable, with ref.", "… no ref.",
        "failed runs judged collapsed (a mechanism named), no ref.",
        "never trained, warned within 15% of steps", "… with ref.", "late collapses warned by onset",
        "healthy runs judged collapsed", "false warnings per 10k healthy steps", "… with ref."]
    counts = [re.search(r"\d+/\d+", cell)[0] for cell in row[:7]]
    warnings = ["{} in {} steps".format(*re.search(r"\((\d+) in ([\d,]+)\)", cell).groups())
                for cell in row[7:]]
    judged = [line for path in [ablation.ROOT / "reports/detection/README.md",
                                *(ablation.ROOT / "reports/detection").glob("*/README.md")]
              for line in re.finditer(r"^- [\w-]+, with reference: .*?no healthy run judged collapsed: "
                                      r"\*\*(?:not )?met\*\* \((\d+)/(\d+)\)",
                                      path.read_text(encoding="utf-8"), re.MULTILINE)]
    assert len(judged) == int(sets)  # one line a set
    healthy_collapsed = [sum(int(line[1]) for line in judged), sum(int(line[2]) for line in judged)]

    section = readme.split("### How far the verdicts can be trusted")[1]
    assert f"({runs} runs, every statistic recorded" in section
    table = {cells[0]: [re.sub(r" \(\d+ %\)$| \([\d.]+ per 10k\)$", "", cell) for cell in cells[1:]]
             for cells in ([cell.strip() for cell in line.split("|")[1:-1]]
                           for line in section.split("\n\n")[2].splitlines()[2:])}
    assert table == {
        "failed runs judged not stable (≥ 99 %)": [counts[0], counts[1]],
        "runs that never trained, warned within 15 % of their steps (all)": [counts[4], counts[3]],
        "late collapses warned by their onset (≥ 95 %)": ["–", counts[5]],
        "healthy runs judged collapsed (none)": ["{}/{}".format(*healthy_collapsed), counts[6]],
        "false warnings on healthy runs (≤ 1 per 10k steps)": [warnings[1], warnings[0]],
    }
