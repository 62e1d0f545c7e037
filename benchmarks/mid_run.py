"""Verdicts read mid-run: every committed detection corpus scored as if each of its runs had
stopped after a fraction of its training steps, labelled from its loss up to there, beside
the whole run.

    python benchmarks/mid_run.py [--fractions 0.25 0.5] [--workers 2]
        [--out reports/detection/mid_run.md]

The corpora are those `missing_statistics.py` reads; the studies are not cut. At a cut
the labels are the benchmark's own, read from the records up to it: a run whose loss has
not yet shown its failure there is healthy at the cut. A run judged collapsed at the cut
while healthy there is counted by what its whole run did: failed (the verdict came before
the loss showed it) or healthy (it was wrong). The cut is of the records, not of the
schedule: a run trained for fewer steps decays its learning rate sooner. Nothing is trained.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from detection import (
    ALL_DEFAULTS,
    DETECTORS,
    MODES,
    PER_STEPS,
    fraction,
    markdown_table,
    recorded_corpus,
    score,
    score_corpus,
)
from missing_statistics import DetectionSet, committed_sets

from loopdiag.store.reference import context_free_loss

FRACTIONS = (0.25, 0.5)


@dataclass(frozen=True)
class Cut:
    set_name: str
    until: float | None  # None: the whole run
    labels: dict[str, str]  # run name → label kind at the cut
    statuses: dict[str, dict[str, str]]  # mode → run name → verdict status
    alarms: dict[str, int]  # run healthy at the cut → its warnings (no reference)
    steps: dict[str, int]  # run healthy at the cut → the steps judged
    unscored: str | None = None  # why the set could not be labelled at this cut


def cut(detection_set: DetectionSet, until: float | None) -> Cut:
    recorded = recorded_corpus(detection_set.seeds, detection_set.path)
    try:
        runs = score_corpus(detection_set.seeds, detection_set.path, context_free_loss(recorded),
                            until=until)
    except ValueError as error:  # a reference run whose loss had risen by then labels nothing
        return Cut(detection_set.name, until, {}, {mode: {} for mode in MODES}, {}, {}, str(error))
    everything = score(ALL_DEFAULTS, runs, set(DETECTORS))
    return Cut(detection_set.name, until, {run.name: run.label.kind for run in runs},
               {mode: {run.name: run.verdicts[mode]["status"] for run in runs} for mode in MODES},
               dict(everything.alarms_by_healthy_run),
               {run.name: run.steps for run in runs if not run.label.collapsed})


def share(until: float | None) -> str:
    return "the whole run" if until is None else f"{until:.0%} of its steps"


def rows(cuts: Sequence[Cut]) -> list[list[str]]:
    whole = {(c.set_name, name): kind for c in cuts if c.until is None for name, kind in c.labels.items()}
    table = []
    for until in sorted({c.until for c in cuts}, key=lambda value: 2.0 if value is None else value):
        mine = [c for c in cuts if c.until == until]
        failed = [(c, name) for c in mine for name, kind in c.labels.items() if kind != "healthy"]
        healthy = [(c, name) for c in mine for name, kind in c.labels.items() if kind == "healthy"]
        not_stable = {mode: sum(c.statuses[mode][name] != "stable" for c, name in failed)
                      for mode in MODES}
        def failed_later(c: Cut, name: str) -> bool:
            return whole.get((c.set_name, name), "healthy") != "healthy"

        early = [(c, name) for c, name in healthy if c.statuses[MODES[0]][name] == "collapsed"]
        went_on = sum(failed_later(c, name) for c, name in early)
        healthy_throughout = [(c, name) for c, name in healthy if not failed_later(c, name)]
        warnings = sum(c.alarms[name] for c, name in healthy_throughout)
        steps = sum(c.steps[name] for c, name in healthy_throughout)
        ahead = sum(c.alarms[name] for c, name in healthy if failed_later(c, name))
        table.append([
            share(until),
            fraction(not_stable[MODES[1]], len(failed)), fraction(not_stable[MODES[0]], len(failed)),
            f"{len(early)}/{len(healthy)}",
            "–" if until is None else f"{went_on} failed, {len(early) - went_on} healthy",
            f"{PER_STEPS * warnings / steps:.2f} ({warnings} in {steps:,})" if steps else "–",
            "–" if until is None else str(ahead)])
    return table


def report(cuts: Sequence[Cut], sets: Sequence[DetectionSet], command: str, seconds: float) -> str:
    header = ["runs stopped after", "failed there, judged not stable: with ref.", "… no ref.",
              "healthy there, judged collapsed (no ref.)", "… over the whole run",
              f"false warnings per {PER_STEPS // 1000}k healthy steps (no ref.; runs healthy there "
              "and over the whole run)", "warnings there on runs healthy there that failed later"]
    return "\n".join([
        "# Verdicts read mid-run",
        "",
        f"Produced by `{command}` in {seconds:.0f} s, from the committed records of "
        f"{len(sets)} detection corpora ({', '.join(s.name for s in sets)}), nothing trained. "
        "Each row scores every run as if it had stopped after that share of its training "
        "steps, labelled from its loss up to there (see [the detection benchmark](README.md)); "
        "the cut is of the records, not of the schedule. A run judged collapsed while its loss "
        "is still within the labels' 10 % is counted by what its whole run did.",
        "",
        markdown_table(header, rows(cuts)),
        "",
        *(f"Not scored at {share(c.until)}: {c.set_name} ({c.unscored})." for c in cuts if c.unscored),
        "",
    ])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("reports/detection/mid_run.md"))
    args = parser.parse_args(argv)
    if any(not 0 < value < 1 for value in args.fractions):
        parser.error("--fractions must lie in (0, 1): 1 is the whole run, scored anyway")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    sets = [s for s in committed_sets() if s.seeds is not None]
    jobs = [(s, until) for until in (None, *args.fractions) for s in sets]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        cuts = []
        for done, result in enumerate(pool.map(cut, *zip(*jobs)), 1):
            cuts.append(result)
            print(f"[{done}/{len(jobs)}] {result.set_name}: "
                  f"{'whole' if result.until is None else f'{result.until:.0%}'}", flush=True)
    command = shlex.join(["python", "benchmarks/mid_run.py", *(argv if argv is not None else sys.argv[1:])])
    args.out.write_text(report(cuts, sets, command, time.perf_counter() - start), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
