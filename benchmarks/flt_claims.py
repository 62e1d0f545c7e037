"""Judge the FLT paper's stability claims (arXiv 2605.18797) from a study's run store.

    python benchmarks/flt_claims.py [--suite reports/flt-stability/runs]
        [--task-suite reports/flt-stability-task/runs] [--out reports/flt-stability/claims.md]

Each claim gets one verdict, "supported", "contradicted" or "cannot tell", by a rule fixed
before the runs (`RULES`, printed beside its verdict), with the evidence behind it: every
cell the rule reads, never a setting picked after the fact. The judging is pure functions
of the suite table (`suite_table`), its events and its loop-scaling rows. The task suite
(addition, `accuracy` rows) is used when its folder exists.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from loopdiag.analysis.document import Block, Bullets, Heading, Paragraph, Table, to_markdown
from loopdiag.analysis.tables import loop_scaling_table, suite_table
from loopdiag.store import RunStoreWarning, load_suite

DEFAULT_LR = 3e-3  # the suites' default learning rate
FAILED_TO_TRAIN_RATIO = 1.10
MOST_LOOPS = 12
# The verdicts the rules below were written against, fixed before the runs; a
# failed_to_train verdict is judged by the rules' own failed-to-train test instead.
FAILED = ("collapsed", "diverged")
FINISHED = ("stable", "recovered", *FAILED, "failed_to_train")
SUPPORTED, CONTRADICTED, CANNOT_TELL = "supported", "contradicted", "cannot tell"
DEFAULT_TASK_SUITE = Path("reports/flt-stability-task/runs")

DEFINITIONS = [
    "A run FAILED if its verdict is collapsed or diverged, or it failed to train: K ≥ 2 and its "
    "final_val_loss ≥ 1.10 × the final_val_loss of the same arch at K=1 with the same lr and seed. "
    "If that K=1 reference is missing, non-finite or itself collapsed/diverged, only the verdict "
    "counts; K=1 runs are judged by verdict only.",
    "A cell (arch, K, lr) is stable if none of its seeds FAILED; stable_lrs(arch, K) is the set of "
    "lrs whose cell is stable (a cell that was not run is in no set).",
    "Interrupted runs (no final verdict) are left out. DEFAULT_LR = 3e-3. Comparisons of stable_lrs "
    "between cells use the lrs run in all of them.",
]
RULES = {
    "C1": ("The plain looped transformer collapses at 12 loops",
           "Supported if looped at K=12 FAILED in ≥ half of its runs at DEFAULT_LR, or "
           "stable_lrs(looped, 12) is a strict subset of stable_lrs(looped, 1). Contradicted if "
           "looped K=12 is stable at every lr where looped K=1 is stable (and K=1 is stable at "
           "one lr at least). Else cannot tell."),
    "C2": ("…with early gradient oscillation and a residual norm that keeps climbing while the loss stalls",
           "Over the (lr, seed) pairs where looped K=12 FAILED and flt K=12 was run: supported if "
           "looped's resid_growth_steps > flt's in ≥ 75% of pairs AND looped's oscillation > flt's "
           "in ≥ 75% of pairs; contradicted if each is lower in ≥ 75% of pairs; else cannot tell "
           "(also with fewer than 2 pairs). The count of failed looped runs with a collapse_plateau "
           "event or that failed to train, and first warning vs failure step, are evidence only."),
    "C3": ("FLT trains stably to 12 loops",
           "Supported if stable_lrs(flt, 12) ⊇ stable_lrs(flt, 1) ∩ stable_lrs(looped, 1) (FLT at 12 "
           "loops keeps every lr at which the one-loop models train; cannot tell when there is no "
           "such lr). Contradicted if flt K=12 FAILED at DEFAULT_LR in any seed. Else cannot tell."),
    "C4": ("FLA alone (flt-res) still collapses",
           "Supported if for some K ≥ 4 flt-res has a failed run in a cell where flt's cell is "
           "stable. Contradicted if at every K ≥ 4 and every lr flt-res's cell is stable whenever "
           "flt's is, AND flt-res at K=12 is stable at DEFAULT_LR. Else cannot tell."),
    "C5": ("Where LT does not collapse, FLT is better",
           "Pair flt and looped runs on (K, lr, seed) for K ≥ 2 where neither FAILED; paired t-test "
           "of final_val_loss flt − looped. Supported if the mean difference < 0 and p < 0.05; "
           "contradicted if > 0 and p < 0.05; else cannot tell (also with fewer than 3 pairs)."),
    "C6": ("The loop count can change at inference",
           "For each flt run trained at 2 ≤ K < 12 with lr = DEFAULT_LR: ratio of val_loss at K'=12 "
           "to val_loss at K'=K. Supported if the median ratio ≤ 1.05; contradicted if > 1.10; else "
           "cannot tell (also without loop-scaling rows). Looped's median ratio, and task accuracy "
           "at K'=K and K'=12, are evidence only."),
}


@dataclass
class Judgement:
    verdict: str
    reason: str  # the condition that decided, with its numbers
    evidence: list[Block]


def verdict_of(supported: bool, contradicted: bool) -> str:
    """Each rule reads "supported if ...; contradicted if ...; else cannot tell", in that order."""
    return SUPPORTED if supported else CONTRADICTED if contradicted else CANNOT_TELL


def judge_runs(table: pd.DataFrame) -> pd.DataFrame:
    """The finished runs of `table` plus `failure` ("collapsed", "diverged", "failed to train"
    or None) and `failed`. An interrupted run has no final verdict (it may still be training)."""
    keys = ["arch", "lr", "seed"]
    table = table[table["status"].isin(FINISHED)]
    one_loop = table[(table["n_loops"] == 1) & ~table["status"].isin(FAILED)
                     & np.isfinite(table["final_val_loss"].astype(float))]
    reference = one_loop[keys + ["final_val_loss"]].drop_duplicates(keys)
    judged = table.merge(reference.rename(columns={"final_val_loss": "reference_val_loss"}),
                         on=keys, how="left")
    worse = (judged["n_loops"] > 1) & (judged["final_val_loss"].astype(float)
                                       >= FAILED_TO_TRAIN_RATIO * judged["reference_val_loss"])
    failure = judged["status"].where(judged["status"].isin(FAILED))
    judged["failure"] = failure.mask(failure.isna() & worse, "failed to train")
    judged["failed"] = judged["failure"].notna()
    return judged


def runs_of(judged: pd.DataFrame, arch: str, n_loops: int, lr: float | None = None) -> pd.DataFrame:
    chosen = judged[(judged["arch"] == arch) & (judged["n_loops"] == n_loops)]
    return chosen if lr is None else chosen[np.isclose(chosen["lr"].astype(float), lr)]


def runs_of_arch(judged: pd.DataFrame, arch: str) -> pd.DataFrame:
    return judged[judged["arch"] == arch]


def tried_lrs(judged: pd.DataFrame, arch: str, n_loops: int) -> frozenset[float]:
    return frozenset(runs_of(judged, arch, n_loops)["lr"])


def stable_lrs(judged: pd.DataFrame, arch: str, n_loops: int) -> frozenset[float]:
    failed_any = runs_of(judged, arch, n_loops).groupby("lr")["failed"].any()
    return frozenset(failed_any.index[~failed_any])


def lr_text(lr: float) -> str:
    exponent = math.floor(math.log10(lr))
    return f"{lr / 10 ** exponent:g}e{exponent}"


def lrs_text(lrs: frozenset[float]) -> str:
    return ", ".join(lr_text(lr) for lr in sorted(lrs)) or "none"


def cell_status(judged: pd.DataFrame, arch: str, n_loops: int, lr: float) -> str:
    runs = runs_of(judged, arch, n_loops, lr)
    failed = runs[runs["failed"]]
    if runs.empty:
        return "not run"
    if failed.empty:
        return f"stable ({len(runs)} seed{'s' * (len(runs) > 1)})"
    steps = [f" at step {step:.0f}" if np.isfinite(step) else "" for step in failed["failure_step"]]
    listed = "; ".join(f"s{seed} {failure}{step}" for seed, failure, step in zip(failed["seed"], failed["failure"], steps))
    return f"{listed} ({len(failed)}/{len(runs)} failed)"


def cell_grid(judged: pd.DataFrame, cells: list[tuple[str, int]]) -> pd.DataFrame:
    """One row per lr, one column per (arch, K): each cell's status."""
    lrs = sorted(set(judged["lr"]))
    return pd.DataFrame({"lr": [lr_text(lr) for lr in lrs],
                         **{f"{arch} K={k}": [cell_status(judged, arch, k, lr) for lr in lrs]
                            for arch, k in cells}})


def looped_collapses(judged: pd.DataFrame) -> Judgement:
    evidence: list[Block] = [Table(cell_grid(judged, [("looped", 1), ("looped", MOST_LOOPS)]))]
    common = tried_lrs(judged, "looped", 1) & tried_lrs(judged, "looped", MOST_LOOPS)
    if not common:
        return Judgement(CANNOT_TELL, "looped was not run at K=1 and K=12 with a common lr", evidence)
    at_default = runs_of(judged, "looped", MOST_LOOPS, DEFAULT_LR)
    n_failed = int(at_default["failed"].sum())
    one, most = stable_lrs(judged, "looped", 1) & common, stable_lrs(judged, "looped", MOST_LOOPS) & common
    facts = (f"looped K=12 failed in {n_failed}/{len(at_default)} runs at lr 3e-3; stable lrs "
             f"K=1: {lrs_text(one)}, K=12: {lrs_text(most)}")
    half_failed, narrower = len(at_default) > 0 and 2 * n_failed >= len(at_default), most < one
    which = [text for text, holds in (("≥ half of the K=12 runs at lr 3e-3 failed", half_failed),
                                      ("stable_lrs(looped, 12) ⊂ stable_lrs(looped, 1)", narrower)) if holds]
    return Judgement(verdict_of(half_failed or narrower, bool(one) and one <= most), "; ".join([*which, facts]),
                     evidence)


def looped_symptoms(judged: pd.DataFrame, events: pd.DataFrame) -> Judgement:
    looped = runs_of(judged, "looped", MOST_LOOPS)
    flt = runs_of(judged, "flt", MOST_LOOPS)[["lr", "seed", "resid_growth_steps", "oscillation"]]
    failed = looped[looped["failed"]].merge(flt, on=["lr", "seed"], how="left",
                                            suffixes=("", "_flt"), indicator=True)
    plateau = failed["run_id"].isin(events.loc[events["detector"] == "collapse_plateau", "run_id"])
    shown = pd.DataFrame({
        "lr": failed["lr"].map(lr_text), "seed": failed["seed"], "failure": failed["failure"],
        "failure step": failed["failure_step"], "first warning step": failed["first_warning_step"],
        "collapse_plateau event": plateau.map({True: "yes", False: "no"}),
        "resid growth looped": failed["resid_growth_steps"], "resid growth flt": failed["resid_growth_steps_flt"],
        "oscillation looped": failed["oscillation"], "oscillation flt": failed["oscillation_flt"]})
    stalled = int((plateau | (failed["failure"] == "failed to train")).sum())
    dated = failed[np.isfinite(failed["failure_step"].astype(float))]
    early = int((dated["first_warning_step"] < dated["failure_step"]).sum())
    evidence: list[Block] = [Paragraph(
        f"{len(failed)} of {len(looped)} looped K=12 runs FAILED; {stalled} of them had a "
        f"collapse_plateau event or failed to train. Of the {len(dated)} with a failure step, "
        f"{early} had a first warning before it (early).")] + ([Table(shown)] if len(shown) else [])
    pairs = failed[failed["_merge"] == "both"]
    if len(pairs) < 2:
        return Judgement(CANNOT_TELL, f"{len(pairs)} failed looped K=12 run(s) with an flt K=12 partner; "
                         "2 needed", evidence)
    share = {name: ((pairs[column] > pairs[f"{column}_flt"]).mean(), (pairs[column] < pairs[f"{column}_flt"]).mean())
             for name, column in (("residual growth", "resid_growth_steps"), ("oscillation", "oscillation"))}
    facts = "; ".join(f"{name}: looped higher in {higher:.0%}, lower in {lower:.0%}"
                      for name, (higher, lower) in share.items()) + f" of {len(pairs)} pairs"
    return Judgement(verdict_of(all(higher >= 0.75 for higher, _ in share.values()),
                                all(lower >= 0.75 for _, lower in share.values())), facts, evidence)


def flt_stable(judged: pd.DataFrame) -> Judgement:
    loops = sorted(set(runs_of_arch(judged, "flt")["n_loops"]))
    per_k = pd.DataFrame([{f"K={k}": lrs_text(stable_lrs(judged, "flt", k)) for k in loops}])
    evidence: list[Block] = [Table(cell_grid(judged, [("flt", 1), ("looped", 1), ("flt", MOST_LOOPS)])),
                             Paragraph("stable_lrs(flt, K) for every K:"), Table(per_k)]
    common = tried_lrs(judged, "flt", 1) & tried_lrs(judged, "looped", 1) & tried_lrs(judged, "flt", MOST_LOOPS)
    kept = stable_lrs(judged, "flt", 1) & stable_lrs(judged, "looped", 1) & common
    most = stable_lrs(judged, "flt", MOST_LOOPS)
    at_default = runs_of(judged, "flt", MOST_LOOPS, DEFAULT_LR)
    if not common:
        return Judgement(CANNOT_TELL, "flt K=12, flt K=1 and looped K=1 were not run at a common lr", evidence)
    facts = (f"one-loop models stable at {lrs_text(kept)}; flt K=12 stable at {lrs_text(most & common)}; "
             f"flt K=12 failed in {int(at_default['failed'].sum())}/{len(at_default)} runs at lr 3e-3")
    return Judgement(verdict_of(bool(kept) and kept <= most, at_default["failed"].any()), facts, evidence)


def ablation_collapses(judged: pd.DataFrame) -> Judgement:
    loops = sorted(k for k in set(runs_of_arch(judged, "flt")["n_loops"]) if k >= 4)
    evidence: list[Block] = [Table(cell_grid(judged, [(arch, k) for k in loops for arch in ("flt-res", "flt")]))]
    offending, unknown = [], []
    for k in loops:
        for lr in sorted(stable_lrs(judged, "flt", k)):
            ablation = runs_of(judged, "flt-res", k, lr)
            if ablation["failed"].any():
                offending.append(f"K={k}, lr {lr_text(lr)}")
            elif ablation.empty:
                unknown.append(f"K={k}, lr {lr_text(lr)}")
    if not loops:
        return Judgement(CANNOT_TELL, "flt was not run at K ≥ 4", evidence)
    at_default = runs_of(judged, "flt-res", MOST_LOOPS, DEFAULT_LR)
    facts = (f"flt-res K=12 failed in {int(at_default['failed'].sum())}/{len(at_default)} runs at lr 3e-3; "
             f"flt-res not run in {len(unknown)} cell(s) where flt is stable")
    if offending:
        facts = f"flt-res failed where flt is stable: {', '.join(offending)}; {facts}"
    contradicted = not unknown and len(at_default) and not at_default["failed"].any()
    return Judgement(verdict_of(bool(offending), bool(contradicted)), facts, evidence)


def flt_better(judged: pd.DataFrame) -> Judgement:
    healthy = judged[~judged["failed"] & (judged["n_loops"] >= 2)]
    pairs = runs_of_arch(healthy, "flt").merge(runs_of_arch(healthy, "looped"), on=["n_loops", "lr", "seed"],
                                               suffixes=("_flt", "_looped"))
    flt, looped = pairs["final_val_loss_flt"].astype(float), pairs["final_val_loss_looped"].astype(float)
    finite = np.isfinite(flt) & np.isfinite(looped)
    difference = (flt - looped)[finite]
    per_k = difference.groupby(pairs.loc[finite, "n_loops"]).agg(["size", "mean"]).reset_index()
    evidence: list[Block] = [Table(per_k.set_axis(["K", "pairs", "mean flt − looped"], axis=1))]
    if len(difference) < 3:
        return Judgement(CANNOT_TELL, f"{len(difference)} pair(s) with finite losses; 3 needed", evidence)
    result = stats.ttest_rel(flt[finite], looped[finite])
    interval = result.confidence_interval(confidence_level=0.95)
    facts = (f"n = {len(difference)} pairs ({int((~finite).sum())} left out for a non-finite loss), mean "
             f"flt − looped {difference.mean():+.4g}, 95% CI [{interval.low:+.4g}, {interval.high:+.4g}], "
             f"p = {result.pvalue:.3g}")
    significant = result.pvalue < 0.05
    return Judgement(verdict_of(significant and difference.mean() < 0, significant and difference.mean() > 0),
                     facts, evidence)


def loop_ratios(scaling: pd.DataFrame, metric: str = "val_loss") -> pd.DataFrame:
    """Per run (looped, flt; 2 ≤ K < 12; DEFAULT_LR): the metric at K'=K and at K'=12, and their ratio."""
    keys = ["arch", "train_loops", "seed"]
    rows = scaling[(scaling["metric"] == metric) & scaling["arch"].isin(["looped", "flt"])
                   & scaling["train_loops"].between(2, MOST_LOOPS - 1)
                   & np.isclose(scaling["lr"].astype(float), DEFAULT_LR)]
    return _ratios(rows, keys)


def _ratios(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    own = rows[rows["eval_loops"] == rows["train_loops"]].set_index(keys)["value"].rename("at K")
    most = rows[rows["eval_loops"] == MOST_LOOPS].set_index(keys)["value"].rename("at 12")
    joined = pd.concat([own, most], axis=1, join="inner").reset_index()
    return joined.assign(ratio=joined["at 12"] / joined["at K"])


def loops_at_inference(scaling: pd.DataFrame, task_scaling: pd.DataFrame | None) -> Judgement:
    ratios = loop_ratios(scaling) if len(scaling) else pd.DataFrame(columns=["arch", "train_loops", "ratio"])
    ratios = ratios[np.isfinite(ratios["ratio"].astype(float))]
    medians = ratios.groupby("arch")["ratio"].median()
    evidence: list[Block] = [Table(ratios.groupby(["arch", "train_loops"])["ratio"].agg(["size", "median"])
                                   .reset_index().set_axis(["arch", "trained K", "runs", "median ratio"], axis=1))]
    if task_scaling is not None and len(task_scaling):
        # The task suite has its own architectures and learning rate: every run of it counts.
        accuracy = (task_scaling[task_scaling["metric"] == "accuracy"]
                    .pivot_table(index=["arch", "train_loops"], columns="eval_loops", values="value",
                                 aggfunc="mean", sort=False))
        evidence += [Paragraph("Task suite: exact-match accuracy at each inference loop count K' "
                               "(columns), mean over seeds, per architecture and trained K:"),
                     Table(accuracy.reset_index().rename(columns={"train_loops": "trained K"}))]
    looped = f"looped median {medians['looped']:.4g}" if "looped" in medians else "no looped ratios"
    if "flt" not in medians:
        return Judgement(CANNOT_TELL, f"no flt loop-scaling rows at 2 ≤ K < 12, lr 3e-3; {looped}", evidence)
    facts = (f"flt median val_loss(K'=12) / val_loss(K'=K) {medians['flt']:.4g} over "
             f"{(ratios['arch'] == 'flt').sum()} runs; {looped}")
    return Judgement(verdict_of(medians["flt"] <= 1.05, medians["flt"] > 1.10), facts, evidence)


def judge_claims(judged: pd.DataFrame, events: pd.DataFrame, scaling: pd.DataFrame,
                 task_scaling: pd.DataFrame | None = None) -> dict[str, Judgement]:
    return {"C1": looped_collapses(judged), "C2": looped_symptoms(judged, events),
            "C3": flt_stable(judged), "C4": ablation_collapses(judged), "C5": flt_better(judged),
            "C6": loops_at_inference(scaling, task_scaling)}


def stable_lr_table(judged: pd.DataFrame) -> pd.DataFrame:
    """Arch rows × K columns: the stable lrs of each (arch, K), "none", or "not run"."""
    loops = sorted(set(judged["n_loops"]))
    return pd.DataFrame([{"arch": arch, **{f"K={k}": lrs_text(stable_lrs(judged, arch, k))
                                           if len(runs_of(judged, arch, k)) else "not run" for k in loops}}
                         for arch in dict.fromkeys(judged["arch"])])


def scale_text(spec: dict | None, table: pd.DataFrame) -> str:
    finished = int(table["status"].isin(FINISHED).sum())
    found = (f"Runs found: {len(table)}, {finished} finished ({len(table) - finished} interrupted, left out); "
             f"architectures {', '.join(dict.fromkeys(table['arch']))}; K in {sorted(set(table['n_loops']))}; "
             f"lrs {lrs_text(frozenset(table['lr']))}; seeds {sorted(set(table['seed']))}.")
    if not spec:
        return f"The suite has no suite.json, so its model and training settings are unknown. {found}"
    model, train = spec.get("model", {}), spec.get("train", {})
    planned = math.prod(len(spec.get(key, [])) for key in ("archs", "loops", "lrs", "seeds"))
    data = ", ".join(f"{key} {value}" for key, value in spec.get("data", {}).items()) or "unknown"
    return (f"Scale: d_model {model.get('d_model')}, {model.get('n_heads')} heads, {model.get('n_layers')} "
            f"blocks per loop, vocabulary {model.get('vocab_size')}; {spec.get('steps')} steps of batch "
            f"{train.get('batch_size')} × {model.get('seq_len')} tokens, {train.get('optimizer')}, schedule "
            f"{train.get('schedule')}, grad clip {train.get('grad_clip')}; data: {data}. The grid plans "
            f"{planned} runs. {found}")


def claims_markdown(judgements: dict[str, Judgement], judged: pd.DataFrame, scale: str, command: str) -> str:
    blocks: list[Block] = [Heading("The FLT paper's stability claims, judged at CPU scale", 1), Paragraph(scale),
                           Heading("Definitions"), Bullets(DEFINITIONS)]
    for key, judgement in judgements.items():
        claim, rule = RULES[key]
        blocks += [Heading(f"{key}. {claim}"), Paragraph(f"Rule (fixed before the runs): {rule}"),
                   Paragraph(f"**Verdict: {judgement.verdict}.** {judgement.reason}."), *judgement.evidence]
    blocks += [Heading("Stable learning rates per architecture and K"), Table(stable_lr_table(judged)),
               Paragraph(f"Regenerate this file with `{command}`.")]
    return to_markdown(blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", type=Path, default=Path("reports/flt-stability/runs"))
    parser.add_argument("--task-suite", type=Path, default=None,
                        help=f"suite trained on a task (default: {DEFAULT_TASK_SUITE} when it exists)")
    parser.add_argument("--out", type=Path, default=Path("reports/flt-stability/claims.md"))
    args = parser.parse_args()
    task_dir = args.task_suite or (DEFAULT_TASK_SUITE if DEFAULT_TASK_SUITE.is_dir() else None)
    try:
        with warnings.catch_warnings():  # runs not started yet: the scale line counts what was found
            warnings.simplefilter("ignore", RunStoreWarning)
            suite = load_suite(args.suite)
            task_scaling = None if task_dir is None else loop_scaling_table(load_suite(task_dir))
    except FileNotFoundError as error:
        parser.error(str(error))
    table = suite_table(suite)
    judged = judge_runs(table)
    judgements = judge_claims(judged, suite.events, loop_scaling_table(suite), task_scaling)
    command = shlex.join(["python", "benchmarks/flt_claims.py", *sys.argv[1:]])
    scale = scale_text(suite.spec, table)
    print(scale)
    for key, judgement in judgements.items():
        print(f"{key} {judgement.verdict}: {RULES[key][0]} — {judgement.reason}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(claims_markdown(judgements, judged, scale, command), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
