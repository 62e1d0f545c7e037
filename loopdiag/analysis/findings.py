"""Plain-language findings generated from a suite table: what held at the largest loop
count, where an FLT variant does or does not beat a baseline, how early the detectors
warned. Every sentence carries its numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from loopdiag.analysis.tables import compare, stable_lr_range
from loopdiag.detect.symptoms import CONTEXT_FREE_MARGIN, EMA_SPAN, behind_from, first_loss_weight, times

SIGNIFICANCE = 0.05  # a "beats" claim needs a lower mean final loss and p below this
# A looped model whose loss ends this much above the same model run with one loop was made
# worse by its loops: the paper's collapse, which a run can show without any alarm.
WORSE_WITH_LOOPS = 0.10


def findings(table: pd.DataFrame, context_free_loss: float | None = None) -> list[str]:
    """The report's findings; `context_free_loss` (the data's, when known) draws the line a
    loss is worse from when the one-loop model got under a tenth of it (`behind_from`)."""
    largest = int(table["n_loops"].max())
    at_largest = table[table["n_loops"] == largest]
    lines = [_stability_at(at_largest, largest)]
    lines += _worse_with_loops(table, largest, context_free_loss)
    lines += _without_reference(table, context_free_loss)
    lines += _flt_vs_baselines(at_largest, largest)
    lines += _oscillation(at_largest, largest)
    if table["lr"].nunique() > 1:
        lines.append(_stable_lrs(table, largest))
        lines += _slow_learning_rates(table, context_free_loss)
    lines += _warnings(table)
    lines += _stable_but_warned(table)
    lines += _few_records(table)
    recomputed = table[table["recomputed"].astype(bool)]
    if len(recomputed):
        where = ", ".join(run_id if pd.isna(step) else f"{run_id} (step {int(step)})"
                          for run_id, step in zip(recomputed["run_id"], recomputed["last_step"]))
        lines.append(f"{len(recomputed)} run(s) had no summary.json, so are still training or were stopped "
                     f"without one: {where}. Their verdicts were recomputed by replaying the detectors "
                     f"over the stored metrics, as of their last step.")
    return lines


def _stability_at(runs: pd.DataFrame, n_loops: int) -> str:
    held, failed = [], []
    for arch, group in runs.groupby("arch", sort=False):
        counts = group["status"].value_counts()
        if counts.get("stable", 0) == len(group):
            held.append(f"{arch} ({len(group)}/{len(group)})")
        else:
            what = ", ".join(f"{n} {status}" for status, n in counts.items() if status != "stable")
            failed.append(f"{arch} ({counts.get('stable', 0)}/{len(group)} stable; {what})")
    return (f"At the largest loop count, K={n_loops}: stable in every run: "
            f"{', '.join(held) or 'no architecture'}; not stable: {', '.join(failed) or 'none'}.")


def _worse_with_loops(table: pd.DataFrame, n_loops: int, context_free_loss: float | None) -> list[str]:
    """Architectures whose mean final loss at `n_loops` is ≥ 10% above their own at K=1
    (same learning rate; `behind_from`), however the detectors judged the runs."""
    if n_loops == 1 or 1 not in set(table["n_loops"]):
        return []
    means = table.groupby(["arch", "lr", "n_loops"], sort=False, dropna=False)["final_loss"].mean()
    worse, floored = [], False
    for (arch, lr, k), loss in means.items():
        one_loop = means.get((arch, lr, 1))
        if k != n_loops or one_loop is None or not (np.isfinite(one_loop) and np.isfinite(loss)):
            continue
        line = behind_from(one_loop, context_free_loss, WORSE_WITH_LOOPS, CONTEXT_FREE_MARGIN)
        if loss >= line:
            floored |= line > (1 + WORSE_WITH_LOOPS) * one_loop
            at_lr = f" at lr {lr:g}" if table["lr"].nunique() > 1 else ""
            worse.append(f"{arch}{at_lr} ({loss:.4g} vs {one_loop:.4g}, {_above(loss / one_loop)})")
    if not worse:
        return [f"No architecture ended K={n_loops} ≥ {WORSE_WITH_LOOPS:.0%} above its own K=1 loss."]
    tenth = (f" (or, where that is under {CONTEXT_FREE_MARGIN:.0%} of the data's context-free loss, "
             f"{context_free_loss:.4g}, ≥ {WORSE_WITH_LOOPS:.0%} above that {CONTEXT_FREE_MARGIN:.0%})"
             if floored else "")
    return [f"Worse with {n_loops} loops than with one, final train loss ≥ {WORSE_WITH_LOOPS:.0%} above "
            f"the same model at K=1{tenth}: {'; '.join(worse)}. A model its loops made worse failed to "
            f"train, whatever its verdict says."]


def _without_reference(table: pd.DataFrame, context_free_loss: float | None) -> list[str]:
    """For architectures the suite has no one-loop run of (their runs were judged without an
    expected loss): say so, and name the stable runs that ended behind the best seed of
    their cell (`behind_from` it, as `_worse_with_loops` reads K=1)."""
    unreferenced = [arch for arch, runs in table.groupby("arch", sort=False) if not (runs["n_loops"] == 1).any()]
    if not unreferenced:
        return []
    behind = []
    cells = table[table["arch"].isin(unreferenced) & np.isfinite(table["final_loss"])]
    for (arch, n_loops, _), cell in cells.groupby(["arch", "n_loops", "lr"], sort=False, dropna=False):
        best = cell.loc[cell["final_loss"].idxmin()]
        line = behind_from(best["final_loss"], context_free_loss, WORSE_WITH_LOOPS, CONTEXT_FREE_MARGIN)
        behind += [f"{arch} K={n_loops} seed {run.seed} ({run.final_loss:.4g}, "
                   f"{_above(run.final_loss / best['final_loss'])} seed {best['seed']}'s {best['final_loss']:.4g})"
                   for run in cell.itertuples() if run.status == "stable" and run.final_loss >= line]
    text = (f"Judged without a reference (the suite has no one-loop run of {', '.join(unreferenced)}): "
            f"a run that trained but ended behind what its model reaches reads as stable")
    if not behind:
        return [text + "."]
    return [text + f". Stable, but behind the best seed of the same cell (≥ {WORSE_WITH_LOOPS:.0%} above it, "
                   f"or, where it is under {CONTEXT_FREE_MARGIN:.0%} of the data's context-free loss, "
                   f"≥ {WORSE_WITH_LOOPS:.0%} above that {CONTEXT_FREE_MARGIN:.0%}): {'; '.join(behind)}."]


def _above(ratio: float) -> str:
    return f"+{ratio - 1:.0%}" if ratio < 2 else times(ratio)


def _flt_vs_baselines(runs: pd.DataFrame, n_loops: int) -> list[str]:
    archs = list(dict.fromkeys(runs["arch"]))
    flts = [a for a in archs if a.startswith("flt")]
    baselines = [a for a in archs if not a.startswith("flt")]
    lines = []
    for flt in flts:
        for baseline in baselines:
            lines.append(_versus(runs, flt, baseline, n_loops))
    return lines


def _versus(runs: pd.DataFrame, flt: str, baseline: str, n_loops: int) -> str:
    losses = {a: runs.loc[runs["arch"] == a, "final_loss"] for a in (flt, baseline)}
    finite = {a: s[np.isfinite(s)] for a, s in losses.items()}
    where = f"at K={n_loops}"
    if finite[baseline].empty and len(finite[flt]):
        return (f"{baseline} has no finite final loss {where} (every run diverged); {flt} "
                f"reached {finite[flt].mean():.4g}.")
    if finite[flt].empty:
        return (f"{flt} has no finite final loss {where} (every run diverged): it does NOT "
                f"beat {baseline}.")
    try:
        result = compare(runs, flt, baseline)
    except ValueError:
        a, b = finite[flt].mean(), finite[baseline].mean()
        # Without a test a lower mean is not a win: say which is lower, claim nothing more.
        lower = "lower" if a < b else "NOT lower"
        return (f"{flt}'s final loss is {lower} than {baseline}'s {where}: {a:.4g} vs {b:.4g} "
                f"(too few runs for a test, so no claim that either is better).")
    if result.difference < 0 and result.p_value < SIGNIFICANCE:
        verdict = f"{flt} beats {baseline} {where}"
    elif result.difference < 0:
        verdict = (f"{flt} does NOT clearly beat {baseline} {where} (lower on average, "
                   f"not significant at p < {SIGNIFICANCE})")
    else:
        verdict = f"{flt} does NOT beat {baseline} {where}"
    return f"{verdict}: {result.summary()}."


def _oscillation(runs: pd.DataFrame, n_loops: int) -> list[str]:
    means = runs.groupby("arch", sort=False)["oscillation"].mean().dropna()
    if len(means) < 2:
        return []
    return [f"Gradient oscillation index at K={n_loops}: highest {means.idxmax()} "
            f"({means.max():.3g}), lowest {means.idxmin()} ({means.min():.3g})."]


def _stable_lrs(table: pd.DataFrame, n_loops: int) -> str:
    ranges = stable_lr_range(table[table["n_loops"] == n_loops])
    parts = [f"{row.arch} {row.max_stable_lr:g}" if np.isfinite(row.max_stable_lr)
             else f"{row.arch} none of {row.lrs_tried} tried" for row in ranges.itertuples()]
    return (f"Largest learning rate at which every run stayed stable, K={n_loops}: "
            f"{', '.join(parts)}.")


def _slow_learning_rates(table: pd.DataFrame, context_free_loss: float | None) -> list[str]:
    """Learning rates at which an architecture's one-loop model ended ≥ 10% above the same
    model at a higher rate (means over seeds, `behind_from`). A run is judged against the
    one-loop run at the suite's gentlest rate no higher than its own (`store.reference`), so
    where that rate is such a one, a stable verdict says it trained as well as that slow run,
    not that it learned what its model can in these steps."""
    one_loop = table[(table["n_loops"] == 1) & np.isfinite(table["final_loss"])]
    means = one_loop.groupby(["arch", "lr"], sort=False)["final_loss"].mean()
    # Architectures whose one-loop models are the same model (a suite's looped families at
    # K = 1) share their numbers: one entry names them all.
    slow: dict[tuple[float, float, float, float], list[str]] = {}
    for arch, by_lr in means.groupby(level="arch", sort=False):
        by_lr = by_lr.droplevel("arch").sort_index()
        for lr, loss in by_lr.items():
            higher = by_lr[by_lr.index > lr]
            if not higher.empty and loss >= behind_from(higher.min(), context_free_loss,
                                                        WORSE_WITH_LOOPS, CONTEXT_FREE_MARGIN):
                slow.setdefault((lr, loss, higher.idxmin(), higher.min()), []).append(arch)
    entries = []
    for (lr, loss, best_lr, best), archs in slow.items():
        at_rate = table[table["arch"].isin(archs) & np.isclose(table["lr"], lr)]
        stable = int((at_rate["status"] == "stable").sum())
        entries.append(f"lr {lr:g} for {', '.join(archs)} ({loss:.4g} vs {best:.4g} at lr {best_lr:g}, "
                       f"{_above(loss / best)}; {stable} of their {len(at_rate)} runs at that rate stable)")
    if not entries:
        return []
    return [f"Learning rates too low for these steps, where the one-loop model ended ≥ {WORSE_WITH_LOOPS:.0%} "
            f"above the same model at a higher rate: {'; '.join(entries)}. A run is judged against the "
            f"one-loop run at the suite's gentlest rate no higher than its own, so where that rate is one "
            f"of these, a stable verdict says it trained as well as that slow run, not that it learned "
            f"what its model can in these steps."]


# Runs named one by one in a finding; a study's count beyond this is given as a number.
NAMED_RUNS = 8


def _stable_but_warned(table: pd.DataFrame) -> list[str]:
    """Stable runs a detector warned: a symptom the run had not turned into a collapse by its
    end (a short run may have stopped before it would)."""
    warned = table[(table["status"] == "stable") & table["first_warning_step"].notna()]
    if warned.empty:
        return []
    named = ", ".join(f"{row.run_id} (step {row.first_warning_step:.0f})"
                      for row in warned.head(NAMED_RUNS).itertuples())
    more = f" and {len(warned) - NAMED_RUNS} more" if len(warned) > NAMED_RUNS else ""
    return [f"{len(warned)} stable run(s) were warned, first at: {named}{more}. A warning is a "
            f"symptom that had not become a collapse by the run's end; its events say which, and "
            f"a longer run tells whether it would."]


def _few_records(table: pd.DataFrame) -> list[str]:
    """Stable runs judged from fewer losses than the loss is smoothed over: weak verdicts
    (the monitor's line, for the whole suite)."""
    records = pd.to_numeric(table["records"], errors="coerce")
    few = records[(table["status"] == "stable") & (records > 0) & (records < EMA_SPAN)]
    if few.empty:
        return []
    counts = f"{few.min():.0f}" if few.min() == few.max() else f"{few.min():.0f} to {few.max():.0f}"
    return [f"{len(few)} stable run(s) were judged from only {counts} records each, fewer than the "
            f"{EMA_SPAN} the loss is smoothed over: their final smoothed loss still gives the first "
            f"loss a weight of {first_loss_weight(int(few.max())):.0%} or more, which narrows the gap to "
            f"what the model should reach, so these verdicts are weak evidence. Record more often "
            f"(log_every) or train longer."]


def _warnings(table: pd.DataFrame) -> list[str]:
    failed = table[table["status"].isin(["collapsed", "diverged"])]
    n_not_trained = int((table["status"] == "failed_to_train").sum())
    # failed_to_train is judged at the end of a run, so it has no lead to report
    not_trained = f" {n_not_trained} run(s) failed to train (judged at their end)." if n_not_trained else ""
    if failed.empty:
        return ["No run collapsed or diverged." + not_trained]
    # `warning_lead` counts from the first warning (warn or critical), as the explanations
    # do; a lead of 0 is a verdict no warning came before, not a warning 0 steps ahead
    leads = failed["warning_lead"]
    leads = leads[leads > 0]
    counts = ", ".join(f"{n} {status}" for status, n in failed["status"].value_counts().items())
    line = f"{len(failed)} run(s) collapsed or diverged ({counts})."
    if len(leads) == 1:
        line += f" The first warning came {leads.iloc[0]:.0f} steps before the verdict."
    elif len(leads):
        line += (f" The first warning came a median of {leads.median():.0f} steps before "
                 f"the verdict (range {leads.min():.0f} to {leads.max():.0f}, {len(leads)} runs).")
    silent = len(failed) - len(leads)
    if silent:
        line += f" {silent} of them had no warning before the verdict's step."
    return [line + not_trained]
