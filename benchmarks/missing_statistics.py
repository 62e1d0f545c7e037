"""What each recorded statistic buys the verdicts: every committed detection set replayed as a
model that records less would give it, side by side with everything the probes record.

    python benchmarks/missing_statistics.py [--sets corpus size ...] [--workers 2]
        [--out reports/detection/statistics.md]

The records, as `ABLATIONS` keeps them: every statistic; all but the token correlation (a
model whose positions are not tokens); what any training loop logs (the loss, the learning
rate, the gradient norm); the loss alone. A set is a committed detection report
(`reports/detection/README.md` and each `reports/detection/*/README.md`), scored from the
records and seeds its first line's command names, or a study of `detection.STUDIES`.
Labels come from the loss, so they are the same in every row; a detector whose statistic
is missing is not judged (a run's `not_judged`) and the others judge as on a user's model.
Nothing is trained and nothing is fitted: the detectors' defaults throughout.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from detection import (
    ALL_DEFAULTS,
    DETECTORS,
    EARLY_FRACTION,
    MODES,
    PER_STEPS,
    STUDIES,
    SUITE_FILE,
    VerdictScore,
    fraction,
    markdown_table,
    parse_args as corpus_args,
    recorded_corpus,
    score,
    score_corpus,
    score_study,
    reference_alarms_on_healthy,
    score_verdicts,
    study_name,
)
from loopdiag.store.reference import context_free_loss

ROOT = Path(__file__).resolve().parent.parent
REPORTS = Path("reports/detection")
# What a training loop logs anyway, besides the step and the loss; the rest is the probes'.
TRAINING_LOOP_LOGS = ("lr", "n_loops", "grad_norm")


def no_token_correlation(key: str) -> bool:
    return key != "token_corr"


def training_loop_logs(key: str) -> bool:
    return key in TRAINING_LOOP_LOGS


def loss_alone(key: str) -> bool:
    return False  # the step and the loss are always kept


# None keeps the records as they are.
ABLATIONS: dict[str, Callable[[str], bool] | None] = {
    "every statistic": None,
    "no token correlation": no_token_correlation,
    "loss, learning rate, gradient norm": training_loop_logs,
    "loss alone": loss_alone,
}


@dataclass(frozen=True)
class DetectionSet:
    name: str
    path: Path  # a corpus's run folders, or a study's run store
    seeds: tuple[int, ...] | None  # None: a study


@dataclass(frozen=True)
class Result:
    ablation: str
    set_name: str
    verdicts: dict[str, VerdictScore]  # by mode
    false_warnings: int
    # with a reference, the alarms only its loss curve gives besides (`REFERENCE_ONLY`)
    reference_false_warnings: int
    healthy_steps: int


def committed_sets(root: Path = ROOT) -> list[DetectionSet]:
    """Every committed detection report's corpus, by the command that produced it, then every
    study of `detection.STUDIES` that is present."""
    sets = []
    for report in [root / REPORTS / "README.md", *sorted((root / REPORTS).glob("*/README.md"))]:
        command = re.search(r"Produced by `python benchmarks/detection\.py([^`]*)`",
                            report.read_text(encoding="utf-8"))
        if command is None:
            continue
        args, seeds, _ = corpus_args(shlex.split(command[1]), read_data=False)
        name = "corpus" if report.parent == root / REPORTS else report.parent.name
        sets.append(DetectionSet(name, root / args.cache, tuple(seeds)))
    sets += [DetectionSet(study_name(root / path), root / path, None)
             for path in STUDIES if (root / path / SUITE_FILE).is_file()]
    return sets


def chosen(sets: Sequence[DetectionSet], names: Sequence[str] | None) -> list[DetectionSet]:
    """The sets named (all without names); ValueError naming any that is not committed."""
    unknown = sorted(set(names or ()) - {s.name for s in sets})
    if unknown:
        raise ValueError(f"no committed detection set {', '.join(unknown)}; "
                         f"there are: {', '.join(s.name for s in sets)}")
    return [s for s in sets if not names or s.name in names]


def scored(ablation: str, detection_set: DetectionSet) -> Result:
    """One set replayed from the statistics `ablation` keeps."""
    kept = ABLATIONS[ablation]
    if detection_set.seeds is None:
        runs, _ = score_study(detection_set.path, kept)
    else:
        recorded = recorded_corpus(detection_set.seeds, detection_set.path)
        runs = score_corpus(detection_set.seeds, detection_set.path, context_free_loss(recorded), kept)
    everything = score(ALL_DEFAULTS, runs, set(DETECTORS))
    return Result(ablation, detection_set.name, {mode: score_verdicts(runs, mode) for mode in MODES},
                  everything.false_alarms, reference_alarms_on_healthy(runs), everything.healthy_steps)


def pooled_rows(results: Sequence[Result]) -> list[list[str]]:
    rows = []
    for ablation in ABLATIONS:
        mine = [result for result in results if result.ablation == ablation]
        no_ref = [result.verdicts[MODES[0]] for result in mine]
        with_ref = [result.verdicts[MODES[1]] for result in mine]
        failed = sum(v.failed for v in no_ref)
        collapsed = sum(v.failed_statuses.get("collapsed", 0) for v in no_ref)
        warnings, steps = (sum(r.false_warnings for r in mine), sum(r.healthy_steps for r in mine))
        with_reference = warnings + sum(r.reference_false_warnings for r in mine)
        never = sum(v.never_trained for v in no_ref)
        rows.append([
            ablation,
            fraction(sum(v.failed_not_stable for v in with_ref), failed),
            fraction(sum(v.failed_not_stable for v in no_ref), failed),
            fraction(collapsed, failed),
            fraction(sum(v.never_trained_early for v in no_ref), never),
            fraction(sum(v.never_trained_early for v in with_ref), never),
            fraction(sum(v.rose_before_onset for v in no_ref), sum(v.rose for v in no_ref)),
            fraction(sum(v.healthy_collapsed for v in no_ref), sum(v.healthy for v in no_ref)),
            per_steps(warnings, steps), per_steps(with_reference, steps)])
    return rows


def per_steps(warnings: int, steps: int) -> str:
    return f"{PER_STEPS * warnings / steps:.2f} ({warnings} in {steps:,})" if steps else "–"


def per_set_rows(results: Sequence[Result], sets: Sequence[DetectionSet]) -> list[list[str]]:
    by_key = {(result.set_name, result.ablation): result.verdicts[MODES[0]] for result in results}
    rows = []
    for detection_set in sets:
        cells = []
        for ablation in ABLATIONS:
            v = by_key[(detection_set.name, ablation)]
            parts = [f"{v.never_trained_early}/{v.never_trained}"]
            if v.rose:
                parts.append(f"{v.rose_before_onset}/{v.rose}")
            cells.append(" · ".join(parts))
        rows.append([detection_set.name, *cells])
    return rows


def report(results: Sequence[Result], sets: Sequence[DetectionSet], command: str, seconds: float) -> str:
    pooled_header = ["records", "failed runs judged not stable, with ref.", "… no ref.",
                     "failed runs judged collapsed (a mechanism named), no ref.",
                     f"never trained, warned within {EARLY_FRACTION:.0%} of steps",
                     "… with ref.", "late collapses warned by onset", "healthy runs judged collapsed",
                     f"false warnings per {PER_STEPS // 1000}k healthy steps", "… with ref."]
    runs = sum(result.verdicts[MODES[0]].failed + result.verdicts[MODES[0]].healthy
               for result in results if result.ablation == next(iter(ABLATIONS)))
    return "\n".join([
        "# What each recorded statistic buys",
        "",
        f"Produced by `{command}` in {seconds:.0f} s, from the committed records of "
        f"{len(sets)} detection sets ({runs} runs: {', '.join(s.name for s in sets)}), "
        "nothing trained. Each row replays the default detectors over the records as a model "
        "that records only that much would give them; the labels come from the loss and are "
        "the same in every row (see [the detection benchmark](README.md)). Without a "
        "reference unless a column says so.",
        "",
        markdown_table(pooled_header, pooled_rows(results)),
        "",
        f"By set, without a reference: runs that never trained warned within "
        f"{EARLY_FRACTION:.0%} of their steps · late collapses warned by onset (where the set "
        "has them).",
        "",
        markdown_table(["set", *ABLATIONS], per_set_rows(results, sets)),
        ""])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=None, metavar="NAME",
                        help="score these sets only (default: every committed one)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPORTS / "statistics.md")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    return args


def main() -> None:
    args = parse_args()
    try:
        sets = chosen(committed_sets(), args.sets)
    except ValueError as err:
        sys.exit(f"error: {err}")
    start = time.perf_counter()
    jobs = [(ablation, detection_set) for ablation in ABLATIONS for detection_set in sets]
    with ProcessPoolExecutor(args.workers) as pool:
        results = []
        for done, result in enumerate(pool.map(scored, *zip(*jobs)), 1):
            results.append(result)
            print(f"[{done}/{len(jobs)}] {result.set_name}: {result.ablation}", flush=True)
    command = shlex.join(["python", "benchmarks/missing_statistics.py", *sys.argv[1:]])
    text = report(results, sets, command, time.perf_counter() - start)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
