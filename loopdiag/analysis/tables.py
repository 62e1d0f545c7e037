"""A suite as tables: one row per run, seeds aggregated per cell, the stable-LR range, and
a statistical comparison of two architectures' final losses."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from loopdiag.analysis.analyzer import (
    CELL_KEYS,
    EXPLAINED,
    LOSS_COLUMNS,
    best_loss,
    collapsed_before_interrupt,
    final_loss,
    final_val_loss,
    first_warning_step,
    loss_records,
    oscillation_index,
    residual_growth,
    run_cell,
    run_verdict,
)
from loopdiag.detect.verdict import RARE_STATUSES, STATUSES
from loopdiag.store import RunData, SuiteData, load_run
from loopdiag.store._files import LOOP_SCALING_FILE

TABLE_COLUMNS = (
    "run_id", "arch", "n_loops", "lr", "seed", "status", "mechanism", "failure_step", "signal",
    "final_loss", "best_loss", "final_val_loss", "resid_growth_steps", "resid_ratio_loops",
    "oscillation", "first_warning_step", "warning_lead", "last_step", "records", "recomputed",
)


def suite_table(suite: SuiteData) -> pd.DataFrame:
    """One row per run (columns `TABLE_COLUMNS`, defined in `loopdiag.analysis.analyzer`).

    `failure_step` is the verdict's step for a failed run, and for a recovered one, or
    one interrupted after a collapse, the step of that collapse; `warning_lead`
    is how many steps the first warning (a warn or critical event) came before it.
    """
    if not suite.runs:
        raise ValueError(f"suite {suite.suite_dir} has no runs to analyse")
    listed = suite.run_table.set_index("run_id")
    rows = [_row(run_id, run, _cell(listed.loc[run_id], run))
            for run_id, run in suite.runs.items()]
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    arch_order = {arch: i for i, arch in enumerate(dict.fromkeys(table["arch"]))}
    table = table.sort_values(["arch", "n_loops", "lr", "seed"], kind="stable",
                              key=lambda c: c.map(arch_order) if c.name == "arch" else c)
    return table.reset_index(drop=True)


def loop_scaling_table(suite: SuiteData) -> pd.DataFrame:
    """Every run's `loop_scaling.csv` (`loopdiag eval`) in one frame; empty when none has one."""
    frames = [pd.read_csv(path) for run in suite.runs.values()
              if (path := run.run_dir / LOOP_SCALING_FILE).is_file()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def run_table(run_dir: str | Path) -> pd.DataFrame:
    """`suite_table`'s row for one run folder."""
    run = load_run(run_dir)
    cell = run_cell(run)
    cell["lr"] = math.nan if cell["lr"] is None else float(cell["lr"])
    return pd.DataFrame([_row(run.run_id, run, cell)], columns=list(TABLE_COLUMNS))


STEP_COLUMNS = (*LOSS_COLUMNS, "val_loss", "grad_cos")  # what a row reads from `steps`


def _row(run_id: str, run: RunData, cell: dict[str, object]) -> dict[str, object]:
    judged = run_verdict(run)
    run.read_ahead([*STEP_COLUMNS, "resid_norm"])
    steps = run.steps_of(STEP_COLUMNS)
    # A recovered run keeps the step and signal of the collapse it trained out of, an
    # interrupted one those of a collapse found before it stopped.
    failed = judged.get("status") in EXPLAINED or collapsed_before_interrupt(judged)
    failure_step = (float(judged["step"]) if failed and judged.get("step") is not None
                    else math.nan)
    warning = first_warning_step(run, judged)
    growth, across = residual_growth(run)
    return {
        "run_id": run_id, **cell,
        "status": judged.get("status"), "mechanism": judged.get("mechanism"),
        "failure_step": failure_step,
        "signal": judged.get("signal") if failed else None,
        "final_loss": final_loss(steps), "best_loss": best_loss(steps),
        "final_val_loss": final_val_loss(steps),
        "resid_growth_steps": growth, "resid_ratio_loops": across,
        "oscillation": oscillation_index(steps),
        "first_warning_step": warning, "warning_lead": failure_step - warning,
        "last_step": float(steps["step"].max()) if len(steps) else math.nan,
        "records": loss_records(steps),
        "recomputed": bool(judged["recomputed"]),
    }


RUN_METRICS = ("status", "mechanism", "failure_step", "signal", "final_loss", "best_loss",
               "final_val_loss", "resid_growth_steps", "resid_ratio_loops", "oscillation",
               "first_warning_step")


def compare_tables(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str] = ("a", "b")) -> pd.DataFrame:
    """Two single runs as one column each per metric (with b − a where numeric); or two
    suites cell by cell (arch, n_loops, lr): runs, fraction stable and mean final loss in
    each, and the difference of the means (b − a: negative means b reached a lower loss)."""
    if names[0] == names[1]:  # one folder twice: its two columns still need two names
        names = ("a", "b")
    if len(a) == 1 and len(b) == 1:
        rows = []
        for metric in ("run_id", "arch", "n_loops", "lr", "seed", *RUN_METRICS):
            left, right = a[metric].iloc[0], b[metric].iloc[0]
            if metric in CELL_KEYS and pd.isna(left) and pd.isna(right):
                continue  # runs made outside a suite: no cell to compare
            numeric = all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                          for v in (left, right)) and metric not in ("n_loops", "seed")
            rows.append({"metric": metric, names[0]: left, names[1]: right,
                         "b - a": right - left if numeric else ""})
        return pd.DataFrame(rows)
    if a.empty or b.empty:
        raise ValueError("nothing to compare: one side has no runs (check --loops)")
    keys = ["arch", "n_loops", "lr"]
    sides = []
    for table, name in zip((a, b), names):
        sides.append(table.groupby(keys, dropna=False).agg(
            **{f"runs {name}": ("status", "size"),
               f"stable {name}": ("status", lambda s: float((s == "stable").mean())),
               f"final_loss {name}": ("final_loss", "mean")}))
    merged = sides[0].join(sides[1], how="outer").reset_index()
    merged["b - a"] = merged[f"final_loss {names[1]}"] - merged[f"final_loss {names[0]}"]
    return merged


def _cell(listed: pd.Series, run: RunData) -> dict[str, object]:
    """The run's cell as the suite manifest lists it (`listed`, its row of the suite's
    run table: `cell_lr` when the cell's `lr` clashes with the logged per-step lr), falling
    back to the run's own config."""
    own = run_cell(run)
    cell = {}
    for key in CELL_KEYS:
        value = next((listed[c] for c in (key, f"cell_{key}") if c in listed.index), None)
        cell[key] = own[key] if value is None or pd.isna(value) else value
    cell["lr"] = math.nan if cell["lr"] is None else float(cell["lr"])
    return cell


def cell_keys(table: pd.DataFrame) -> list[str]:
    """(arch, n_loops), plus lr when the suite swept it."""
    return ["arch", "n_loops", "lr"] if table["lr"].nunique() > 1 else ["arch", "n_loops"]


def stability_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Seeds aggregated per cell: runs, fraction stable, a count for each verdict (each run in
    exactly one, so they add up to `runs`; `recovered` and `interrupted` only where some run
    of the suite has them), and mean ± std of the final loss over runs with a finite one
    (diverged runs have none)."""
    keys = cell_keys(table)
    grouped = table.groupby(keys, sort=False)
    present = set(table["status"])
    counted = [status for status in STATUSES if status not in RARE_STATUSES or status in present]
    summary = grouped.agg(
        runs=("status", "size"),
        **{status: ("status", lambda s, status=status: int((s == status).sum())) for status in counted},
        final_loss_mean=("final_loss", "mean"),
        final_loss_std=("final_loss", "std"),
        oscillation_mean=("oscillation", "mean"),
    ).reset_index()
    summary.insert(len(keys) + 1, "frac_stable", summary["stable"] / summary["runs"])
    return summary


def stable_lr_range(table: pd.DataFrame) -> pd.DataFrame:
    """Per (arch, n_loops): the LRs tried, the largest LR at which every run stayed stable
    (NaN when none did), and the smallest LR at which some run failed (NaN when none)."""
    rows = []
    for (arch, n_loops), cell in table.groupby(["arch", "n_loops"], sort=False):
        all_stable = cell.groupby("lr")["status"].apply(lambda s: bool((s == "stable").all()))
        rows.append({"arch": arch, "n_loops": n_loops, "lrs_tried": len(all_stable),
                     "lr_min": all_stable.index.min(), "lr_max": all_stable.index.max(),
                     "max_stable_lr": all_stable[all_stable].index.max(),
                     "min_unstable_lr": all_stable[~all_stable].index.min()})
    return pd.DataFrame(rows)


@dataclass
class Comparison:
    """Final losses of two architectures over matching runs; the difference is a − b, so
    negative means `arch_a` reached the lower loss."""

    arch_a: str
    arch_b: str
    test: str  # "paired t" (runs matched by n_loops, lr, seed) or "Welch t"
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    difference: float
    ci_low: float  # 95% t interval of the mean difference
    ci_high: float
    statistic: float
    p_value: float
    excluded: int  # runs left out for a non-finite final loss (diverged)

    def summary(self) -> str:
        if self.test == "paired t" and self.difference == 0 and math.isnan(self.statistic):
            # e.g. looped and flt at K=1, one model: nothing to test
            return (f"{self.arch_a} vs {self.arch_b}: the same final loss in every one of the "
                    f"{self.n_a} matched runs ({self.mean_a:.4g} on average): no difference to test")
        return (f"{self.arch_a} vs {self.arch_b}: mean final loss {self.mean_a:.4g} vs "
                f"{self.mean_b:.4g} (difference {self.difference:+.3g}, 95% CI "
                f"[{self.ci_low:+.3g}, {self.ci_high:+.3g}]; {self.test} = {self.statistic:.3g}, "
                f"p = {self.p_value:.3g}; n = {self.n_a}, {self.n_b})")


def compare(table: pd.DataFrame, arch_a: str, arch_b: str, *, n_loops: int | None = None,
            lr: float | None = None) -> Comparison:
    """Compare final losses of `arch_a` and `arch_b`, optionally at one K and one LR.

    With at least two runs matched on (n_loops, lr, seed), a paired t-test over those
    pairs; otherwise Welch's t-test over all runs. The 95% interval of the mean difference
    is the test's own t interval (with a handful of seeds a bootstrap interval is far too
    narrow). Runs without a finite final loss are excluded and counted.
    """
    chosen = table[table["arch"].isin([arch_a, arch_b])]
    if n_loops is not None:
        chosen = chosen[chosen["n_loops"] == n_loops]
    if lr is not None:
        chosen = chosen[np.isclose(chosen["lr"].astype(float), lr)]
    finite = chosen[np.isfinite(chosen["final_loss"])]
    side = {arch: finite[finite["arch"] == arch].set_index(["n_loops", "lr", "seed"])["final_loss"]
            for arch in (arch_a, arch_b)}
    if min(len(side[arch_a]), len(side[arch_b])) < 2:
        raise ValueError(f"compare needs at least 2 runs with a finite final loss per "
                         f"architecture; got {arch_a}: {len(side[arch_a])}, "
                         f"{arch_b}: {len(side[arch_b])}")
    shared = side[arch_a].index.intersection(side[arch_b].index)
    paired = len(shared) >= 2
    if paired:
        a, b = side[arch_a].loc[shared].to_numpy(), side[arch_b].loc[shared].to_numpy()
    else:
        a, b = side[arch_a].to_numpy(), side[arch_b].to_numpy()
    statistic, p_value, ci_low, ci_high = t_test(a, b, paired=paired)
    return Comparison(arch_a=arch_a, arch_b=arch_b, test="paired t" if paired else "Welch t",
                      n_a=len(a), n_b=len(b), mean_a=float(a.mean()), mean_b=float(b.mean()),
                      difference=float(a.mean() - b.mean()), ci_low=ci_low, ci_high=ci_high,
                      statistic=statistic, p_value=p_value, excluded=len(chosen) - len(finite))


def t_test(a: np.ndarray, b: np.ndarray, *, paired: bool) -> tuple[float, float, float, float]:
    """(t, two-sided p, 95% interval low, high) of mean(a) − mean(b): the paired t-test over
    matched pairs, else Welch's; the numbers of scipy.stats' `ttest_rel` / `ttest_ind(...,
    equal_var=False)`, from scipy.special's t distribution, which imports in a quarter of
    the time (scipy.stats alone was a tenth of a report over 100 long runs)."""
    from scipy.special import stdtr, stdtrit

    if paired:
        differences = a - b
        difference, df = differences.mean(), len(differences) - 1
        error = np.sqrt(differences.var(ddof=1) / len(differences))
    else:
        share_a, share_b = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        difference, error = a.mean() - b.mean(), np.sqrt(share_a + share_b)
        with np.errstate(divide="ignore", invalid="ignore"):
            df = (share_a + share_b) ** 2 / (share_a**2 / (len(a) - 1) + share_b**2 / (len(b) - 1))
        df = 1.0 if np.isnan(df) else df  # both variances zero: any df gives the same answer
    with np.errstate(divide="ignore", invalid="ignore"):
        statistic = np.divide(difference, error)
    half_width = stdtrit(df, 0.975) * error
    return (float(statistic), float(2 * stdtr(df, -np.abs(statistic))),
            float(difference - half_width), float(difference + half_width))


def with_cells(frame: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """A suite's stacked frame (steps, loops, events) with each run's cell from `table` as
    `arch`, `n_loops`, `seed`, `lr`, replacing same-named logged columns (the per-step lr
    and loop count) and the store's `cell_*` copies."""
    clashing = [c for c in frame.columns if c in CELL_KEYS or c in {f"cell_{k}" for k in CELL_KEYS}]
    cells = table[["run_id", *CELL_KEYS]]
    return frame.drop(columns=clashing).merge(cells, on="run_id", how="inner")
