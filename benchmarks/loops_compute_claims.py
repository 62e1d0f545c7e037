"""Judge the loops-compute study's claims from its run store: do the loops compute?

    python benchmarks/loops_compute_claims.py [--suite reports/loops-compute/runs]
        [--out reports/loops-compute/claims.md] [--corpus reports/flt-stability/runs]

The rules (`RULES`) were written and committed before the study's runs; each claim gets
"supported", "contradicted" or "cannot tell", with the numbers that decided and every cell
the rule reads. Accuracy is the mean over seeds of the per-depth exact-match accuracy
(`accuracy_<h>hop` loop-scaling rows) on held-out examples. `--corpus` adds the corpus
control: the same question on text, read from a corpus study's store (evidence, not a claim).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from loopdiag.analysis.depth import (
    IDLE_UPDATE,
    USEFUL_GAIN,
    depth_accuracy,
    depth_rows,
    loop_states,
    matched_seeds,
    useful_loops,
)
from loopdiag.analysis.document import Block, Bullets, Heading, Paragraph, Table, to_markdown
from loopdiag.analysis.tables import loop_scaling_table, suite_table
from loopdiag.store import RunStoreWarning, SuiteData, load_suite

SOLVES = 0.8  # mean accuracy at which a model solves a depth
FAILS = 0.5  # ... and below which it does not (between the two: neither)
HOLDS = 0.05  # accuracy change at K' > K within which a model holds its accuracy
# On text, more loops that lower the validation loss by < 1 % buy nothing: the 1 % that
# `idle_loops` asks of the stream, taken for the loss; set after the runs (evidence only).
CORPUS_GAIN = 0.01
LOOPED = ("looped", "looped-inject", "flt-res", "flt-ai1", "flt")
BASELINES = ("looped", "looped-inject")
SUPPORTED, CONTRADICTED, CANNOT_TELL = "supported", "contradicted", "cannot tell"

DEFINITIONS = [
    f"acc(arch, K, h, K′): mean over seeds of the exact-match accuracy on h-hop examples of "
    f"the model trained at K, run at K′ loops; acc(arch, K, h) is at K′ = K. A model SOLVES h "
    f"if acc ≥ {SOLVES}, FAILS h if acc < {FAILS}.",
    "min_K(arch, h): the smallest trained K whose model solves h (none if no K does).",
    f"useful(arch, K): the smallest K′ ≤ K after which no further loop raises the mean "
    f"accuracy over depths by ≥ {USEFUL_GAIN}; idle(arch, K): the first loop from which every "
    f"loop moves the stream by < {IDLE_UPDATE:.0%} (relative update, median over the last "
    f"10 % of records, the latest over seeds; none if the last loop still moves it).",
    "Precondition of every claim: the one-loop models solve 1 hop (mean of acc(arch, 1, 1) "
    f"over the looped architectures ≥ {SOLVES}); if not, the study was too short or too "
    "small and every claim is cannot tell.",
    "A shard (some of the suite's runs) is judged on the runs found, and a rule never reads "
    "absence as failure: (a) judges an architecture only with runs at K = 1 and at a K ≥ the "
    "deepest hop count, and contradicts only if at least 3 are judged; (b) says flt FAILS "
    "a depth only if flt was trained at a K ≥ the baselines' min_K for it. Its means over seeds "
    "take, per architecture, only the seeds trained at every K it was trained at (those left "
    "out are named), so that they compare loop counts rather than seeds.",
]
RULES = {
    "a": ("A looped model with enough loops solves depths that fewer loops cannot",
          "For each looped architecture, it SEPARATES if some h ≥ 2 has min_K(arch, h) > 1 "
          "and every trained K < min_K FAILS h. Supported if ≥ 3 of the 5 looped architectures "
          "separate and, for each of them, min_K does not fall as h grows. Contradicted if "
          "none separates. Else cannot tell. The depth-matched `standard` model is evidence."),
    "b": ("FLT keeps that ability",
          "Over the depths h that a plain baseline (looped or looped-inject) solves at some K: "
          "supported if flt solves every such h, at a min_K no more than one step of the K grid "
          "above the baselines' smallest; contradicted if flt FAILS some such h at every K. "
          "Else cannot tell. idle(flt, K) per K (where its fixed point sets in) is evidence."),
    "c": ("A model trained at K runs at K′ > K without losing accuracy",
          f"Per looped architecture and trained K < the largest K′ evaluated: change = mean "
          f"over h of acc(arch, K, h, min(2K, largest K′)) − acc(arch, K, h, K). The "
          f"architecture extrapolates if every change ≥ +{HOLDS}, holds if every change > "
          f"−{HOLDS}, else degrades. Supported for flt if it holds or extrapolates at every "
          f"K; contradicted if it degrades at any K ≥ 2. Every architecture's class is "
          f"evidence."),
    "d": ("Loops stop adding accuracy where they stop moving the stream",
          "At each looped architecture's largest K: supported if useful(arch, K) and "
          "idle(arch, K) are both defined and within one loop of each other for ≥ 3 of the 5; "
          "contradicted if they differ by more than one loop for ≥ 3 of the 5 (an idle "
          "loop that still adds accuracy, or a moving loop that adds none). Else cannot "
          "tell. A stable model with useful < K is reported as stable whose loops beyond "
          "useful do not compute."),
}


@dataclass
class Judgement:
    verdict: str
    reason: str
    evidence: list[Block]


def verdict_of(supported: bool, contradicted: bool) -> str:
    return SUPPORTED if supported else CONTRADICTED if contradicted else CANNOT_TELL


def read_accuracy(suite: SuiteData) -> tuple[pd.DataFrame, list[str]]:
    """acc over the seeds each architecture was trained with at every K, and a line per set
    of seeds left out (`matched_seeds`)."""
    rows = loop_scaling_table(suite)
    if rows.empty:
        return pd.DataFrame(columns=["arch", "train_loops", "hops", "eval_loops", "accuracy"]), []
    matched, left_out = matched_seeds(depth_rows(rows))
    return depth_accuracy(matched), left_out


def acc(accuracy: pd.DataFrame, arch: str, k: int, hops: int, eval_loops: int | None = None
        ) -> float | None:
    rows = accuracy[(accuracy["arch"] == arch) & (accuracy["train_loops"] == k)
                    & (accuracy["hops"] == hops)
                    & (accuracy["eval_loops"] == (k if eval_loops is None else eval_loops))]
    return None if rows.empty else float(rows["accuracy"].iloc[0])


def trained_ks(accuracy: pd.DataFrame, arch: str) -> list[int]:
    return sorted(accuracy.loc[accuracy["arch"] == arch, "train_loops"].unique().tolist())


def min_k(accuracy: pd.DataFrame, arch: str, hops: int) -> int | None:
    return next((k for k in trained_ks(accuracy, arch)
                 if (a := acc(accuracy, arch, k, hops)) is not None and a >= SOLVES), None)


def separates(accuracy: pd.DataFrame, arch: str, hops: int) -> bool:
    solving = min_k(accuracy, arch, hops)
    if solving is None or solving == 1:
        return False
    below = [acc(accuracy, arch, k, hops) for k in trained_ks(accuracy, arch) if k < solving]
    return all(a is not None and a < FAILS for a in below)


def depth_table(accuracy: pd.DataFrame, archs: list[str], hops: list[int]) -> pd.DataFrame:
    rows = []
    for arch in archs:
        for k in trained_ks(accuracy, arch):
            row = {"arch": arch, "K": k}
            for h in hops:
                a = acc(accuracy, arch, k, h)
                row[f"{h} hop{'s' if h > 1 else ''}"] = "–" if a is None else f"{a:.2f}"
            rows.append(row)
    return pd.DataFrame(rows)


def judge_a(accuracy: pd.DataFrame, hops: list[int]) -> Judgement:
    deep = [h for h in hops if h >= 2]
    judged = [arch for arch in LOOPED if (ks := trained_ks(accuracy, arch))
              and 1 in ks and deep and max(ks) >= max(deep)]
    separating = []
    for arch in judged:
        if any(separates(accuracy, arch, h) for h in deep):
            solved = [min_k(accuracy, arch, h) for h in hops if min_k(accuracy, arch, h)]
            separating.append((arch, solved == sorted(solved)))
    monotone = [arch for arch, ok in separating if ok]
    verdict = verdict_of(len(monotone) >= 3 and len(monotone) == len(separating),
                         not separating and len(judged) >= 3)
    reason = (f"{len(separating)} of {len(LOOPED)} looped architectures separate "
              f"({', '.join(a for a, _ in separating) or 'none'}; {len(judged)} with the runs "
              f"to tell); min_K rises with h in {len(monotone)}")
    min_ks = pd.DataFrame([{"arch": arch, **{f"min_K at {h} hop{'s' if h > 1 else ''}":
                                             min_k(accuracy, arch, h) or "–" for h in hops}}
                           for arch in dict.fromkeys(accuracy["arch"])])
    return Judgement(verdict, reason, [Table(min_ks), Table(depth_table(
        accuracy, list(dict.fromkeys(accuracy["arch"])), hops))])


def judge_b(accuracy: pd.DataFrame, hops: list[int], idle: dict[tuple[str, int], int | None]
            ) -> Judgement:
    targets = {h: min(k for arch in BASELINES if (k := min_k(accuracy, arch, h)))
               for h in hops if any(min_k(accuracy, arch, h) for arch in BASELINES)}
    grid = trained_ks(accuracy, "flt")
    kept, lost = [], []
    for h, baseline_k in targets.items():
        flt_k = min_k(accuracy, "flt", h)
        if flt_k is not None and baseline_k in grid and grid.index(flt_k) <= grid.index(baseline_k) + 1:
            kept.append(h)
        elif (grid and max(grid) >= baseline_k
              and all((a := acc(accuracy, "flt", k, h)) is None or a < FAILS for k in grid)):
            lost.append(h)
    verdict = verdict_of(bool(targets) and len(kept) == len(targets), bool(lost))
    reason = (f"depths a baseline solves: {sorted(targets) or 'none'}; flt keeps "
              f"{kept or 'none'}, fails at every K on {lost or 'none'}")
    fixed = ", ".join(f"K={k}: {'none' if idle.get(('flt', k)) is None else 'loop ' + str(idle[('flt', k)])}"
                      for k in grid)
    return Judgement(verdict, reason, [Paragraph(f"idle(flt, K), where its fixed point sets in: {fixed}.")])


def judge_c(accuracy: pd.DataFrame, hops: list[int]) -> Judgement:
    largest_eval = int(accuracy["eval_loops"].max()) if len(accuracy) else 0
    rows, classes, flt_changes = [], {}, []
    for arch in LOOPED:
        changes = []
        for k in trained_ks(accuracy, arch):
            if k >= largest_eval:
                continue
            target = min(2 * k, largest_eval)
            diffs = [b - a for h in hops
                     if (a := acc(accuracy, arch, k, h)) is not None
                     and (b := acc(accuracy, arch, k, h, target)) is not None]
            if diffs:
                change = sum(diffs) / len(diffs)
                changes.append((k, change))
                rows.append({"arch": arch, "K": k, "K′": target, "accuracy change": f"{change:+.3f}"})
        if changes:
            classes[arch] = ("extrapolates" if all(c >= HOLDS for _, c in changes)
                             else "holds" if all(c > -HOLDS for _, c in changes) else "degrades")
        if arch == "flt":
            flt_changes = changes
    verdict = verdict_of(classes.get("flt") in ("extrapolates", "holds"),
                         any(k >= 2 and c <= -HOLDS for k, c in flt_changes))
    reason = "; ".join(f"{arch} {cls}" for arch, cls in classes.items()) or "no loop-scaling rows"
    return Judgement(verdict, reason, [Table(pd.DataFrame(rows))] if rows else [])


def judge_d(accuracy: pd.DataFrame, idle: dict[tuple[str, int], int | None],
            stable: dict[tuple[str, int], bool]) -> Judgement:
    rows, close, far = [], 0, 0
    for arch in LOOPED:
        ks = trained_ks(accuracy, arch)
        if not ks:
            continue
        k = ks[-1]
        useful, idle_loop = useful_loops(accuracy, arch, k), idle.get((arch, k))
        if useful is not None and idle_loop is not None:
            close += abs(useful - idle_loop) <= 1
            far += abs(useful - idle_loop) > 1
        note = ("stable; loops beyond " + str(useful) + " do not compute"
                if stable.get((arch, k)) and useful is not None and useful < k else "")
        rows.append({"arch": arch, "K": k, "useful": useful or "–",
                     "idle from": "none" if idle_loop is None else idle_loop, "note": note})
    verdict = verdict_of(close >= 3, far >= 3)
    return Judgement(verdict, f"within one loop for {close}, further apart for {far} of "
                              f"{len(LOOPED)}", [Table(pd.DataFrame(rows))] if rows else [])


def judge_claims(suite: SuiteData) -> tuple[dict[str, Judgement], str]:
    table = suite_table(suite)
    accuracy, left_out = read_accuracy(suite)
    hops = sorted(accuracy["hops"].unique().tolist())
    states = loop_states(suite, table)
    idle, stable = states.idle, states.stable
    one_hop = [a for arch in LOOPED if (a := acc(accuracy, arch, 1, 1)) is not None]
    precondition = bool(one_hop) and sum(one_hop) / len(one_hop) >= SOLVES
    status = (f"Precondition: the one-loop looped models reach a mean 1-hop accuracy of "
              f"{sum(one_hop) / len(one_hop):.2f}" if one_hop else
              "Precondition: no one-loop looped model was evaluated")
    status += " (met)." if precondition else f" (not met: < {SOLVES}); every claim is cannot tell."
    status += "".join(f" {line}" for line in left_out)
    judgements = {"a": judge_a(accuracy, hops), "b": judge_b(accuracy, hops, idle),
                  "c": judge_c(accuracy, hops), "d": judge_d(accuracy, idle, stable)}
    if not precondition:
        for judgement in judgements.values():
            judgement.verdict = CANNOT_TELL
    return judgements, status


def corpus_control(loop_scaling: pd.DataFrame, lr: float) -> list[Block]:
    """The same question on text, from a corpus study's loop-scaling rows: validation loss at
    K′ = K per architecture and trained K (mean over seeds, at `lr`), and the largest K whose
    loss is ≥ `CORPUS_GAIN` below every smaller K's: past it, loops buy nothing on text."""
    rows = loop_scaling if loop_scaling.empty else loop_scaling[
        (loop_scaling["metric"] == "val_loss")
        & (loop_scaling["eval_loops"] == loop_scaling["train_loops"])
        & np.isclose(loop_scaling["lr"].astype(float), lr)]
    if rows.empty:
        return [Paragraph(f"The corpus store has no validation loss at K′ = K for lr {lr:g}.")]
    loss = rows.groupby(["arch", "train_loops"])["value"].mean().unstack()
    table = []
    for arch, by_k in loss.iterrows():
        by_k = by_k.dropna()
        best, gains_to = by_k.iloc[0], by_k.index[0]
        for k, value in by_k.iloc[1:].items():
            if value <= best * (1 - CORPUS_GAIN):
                gains_to = k
            best = min(best, value)
        table.append({"arch": arch, **{f"K={k}": f"{v:.3f}" for k, v in by_k.items()},
                      "gains up to K": int(gains_to)})
    return [Paragraph(f"Validation loss at K′ = K (mean over seeds, lr {lr:g}); \"gains up to "
                      f"K\": the largest K whose loss is ≥ {CORPUS_GAIN:.0%} below every smaller "
                      f"K's. Evidence beside the claims, not a claim: it was added after the runs."),
            Table(pd.DataFrame(table).fillna("–"))]


def claims_markdown(judgements: dict[str, Judgement], scale: str, status: str, command: str,
                    corpus: list[Block] | None = None) -> str:
    blocks: list[Block] = [Heading("Do the loops compute? The loops-compute study's claims", 1),
                           Paragraph(scale), Paragraph(status),
                           Paragraph(f"Judged by `{command}`."),
                           Heading("Definitions"), Bullets(DEFINITIONS)]
    for key, (claim, rule) in RULES.items():
        judgement = judgements[key]
        blocks += [Heading(f"({key}) {claim}"), Paragraph(f"Rule (fixed before the runs): {rule}"),
                   Paragraph(f"**Verdict: {judgement.verdict}.** {judgement.reason}."),
                   *judgement.evidence]
    if corpus:
        blocks += [Heading("Corpus control: do the loops compute on text?"), *corpus]
    return to_markdown(blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", type=Path, default=Path("reports/loops-compute/runs"))
    parser.add_argument("--out", type=Path, default=Path("reports/loops-compute/claims.md"))
    parser.add_argument("--corpus", type=Path, default=None,
                        help="a corpus study's run store, for the corpus control "
                             "(e.g. reports/flt-stability/runs)")
    parser.add_argument("--corpus-lr", type=float, default=3e-3,
                        help="the corpus runs' learning rate to read (the study's is 3e-3)")
    args = parser.parse_args()
    try:
        with warnings.catch_warnings():  # a shard: runs not trained yet are counted, not fatal
            warnings.simplefilter("ignore", RunStoreWarning)
            suite = load_suite(args.suite)
    except FileNotFoundError as error:
        parser.error(str(error))
    planned = len((suite.manifest or {}).get("runs", []))
    scale = (f"Runs found: {len(suite.runs)} of the {planned} the suite plans"
             + (" (a shard: claims read only the runs found)." if len(suite.runs) < planned else "."))
    judgements, status = judge_claims(suite)
    corpus = None
    if args.corpus is not None:
        try:
            corpus = corpus_control(loop_scaling_table(load_suite(args.corpus)), args.corpus_lr)
        except FileNotFoundError as error:
            parser.error(str(error))
    command = shlex.join(["python", "benchmarks/loops_compute_claims.py", *sys.argv[1:]])
    print(scale, status)
    for key, judgement in judgements.items():
        print(f"({key}) {judgement.verdict}: {RULES[key][0]} — {judgement.reason}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(claims_markdown(judgements, scale, status, command, corpus), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
