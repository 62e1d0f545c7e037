"""Figures as pure functions: a frame in, a `matplotlib.figure.Figure` out.

Frames carry cell columns named `arch`, `n_loops`, `seed`, `lr` (see
`loopdiag.analysis.tables.with_cells`). matplotlib is imported inside the functions, and
figures are built on `Figure` with an Agg canvas, never through pyplot, so importing this
module costs nothing and no figure state leaks from one plot into the next.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from loopdiag.analysis.analyzer import LOSS_COLUMNS, training_rows
from loopdiag.analysis.drawing import (
    MECHANISM_LABELS,
    NO_RUN_COLOUR,
    STATUS_COLOURS,
    EndLabels,
    add_end_label,
    arch_colours,
    draw_curve,
    loop_colours,
    new_figure,
    place_end_labels,
    plain_log_axis,
    save_figure,
)
from loopdiag.detect.verdict import RARE_STATUSES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STAT_UNITS = {"resid_norm": "mean token L2 norm, log", "act_grad_norm": "L2 norm of dloss/dx, log",
              "rel_update": "relative change from the previous loop, log"}

__all__ = ["plot_depth_accuracy", "plot_loop_mechanism", "plot_loop_residuals", "plot_loop_scaling",
           "plot_loop_usefulness", "plot_loss_curves",
           "plot_lr_sensitivity", "plot_oscillation_vs_loops", "plot_stability_map", "save_figure"]

# Failures named inside a stability-map cell, short enough to fit it.
SHORT_STATUS = {"collapsed": "coll.", "recovered": "recov.", "diverged": "div.",
                "failed_to_train": "no train", "interrupted": "intr."}

# What each panel of `plot_loop_mechanism` shows: (stat, transform, y label).
MECHANISM_PANELS = (
    ("token_corr", lambda v: np.abs(1 - v), "1 − token correlation (0: all positions identical)"),
    ("rel_update", lambda v: v, "relative update of the loop"),
    ("act_grad_norm", lambda v: v, "gradient norm at the loop's output"),
)
MECHANISM_STATS = tuple(stat for stat, _, _ in MECHANISM_PANELS)


def plot_loop_residuals(loops: pd.DataFrame, stat: str = "resid_norm") -> Figure:
    """Per-loop `stat` at each run's last step where every loop is finite, median over
    the runs of a cell: one panel per arch, one line per trained K, log y."""
    rows = loops[loops["stat"] == stat]
    step_finite = (rows.assign(ok=np.isfinite(rows["value"]))
                   .groupby(["run_id", "step"])["ok"].transform("all"))
    rows = rows[step_finite]
    ends = rows[rows["step"] == rows.groupby("run_id")["step"].transform("max")]
    curves = ends.groupby(["arch", "n_loops", "loop"], sort=False)["value"].median()
    archs = list(dict.fromkeys(loops["arch"]))
    figure, axes = new_figure(1, max(1, len(archs)), sharey=True)
    colours = loop_colours(loops["n_loops"].unique().tolist())
    labels: EndLabels = {}
    for ax, arch in zip(axes[0], archs):
        if arch not in curves.index.get_level_values("arch"):
            continue
        for n_loops, curve in curves.loc[arch].groupby(level="n_loops", sort=True):
            loop_ids = curve.index.get_level_values("loop").tolist()
            ax.plot(loop_ids, curve.to_numpy(), marker="o", ms=3, color=colours[n_loops])
            add_end_label(labels, ax, loop_ids, curve.tolist(), f"K={n_loops}", colours[n_loops])
        ax.set_title(arch)
        ax.set_xlabel("loop k")
        ax.set_xticks(sorted(rows["loop"].unique()))
        ax.margins(x=0.15)
    if len(curves):
        plain_log_axis(axes[0][0], "y", curves.min(), curves.max())
    place_end_labels(labels)
    axes[0][0].set_ylabel(f"{stat} ({STAT_UNITS.get(stat, 'log scale')})")
    figure.suptitle(f"{stat} per loop at the end of training (median over seeds)")
    return figure


def plot_stability_map(table: pd.DataFrame) -> Figure:
    """Arch × K grid per LR: colour = verdict (all runs stable, else the commonest
    failure), text = mean final loss, a collapse's mechanism and, with several seeds, the
    fraction stable."""
    from matplotlib.patches import Patch

    archs = list(dict.fromkeys(table["arch"]))
    loop_counts = sorted(table["n_loops"].unique())
    by_lr = list(table.groupby("lr", dropna=False, sort=True))
    figure, axes = new_figure(1, len(by_lr), panel_size=(0.9 * len(loop_counts) + 1.6,
                                                           0.55 * len(archs) + 1.0),
                              layout="constrained")  # the legend below, outside the panels
    for ax, (lr, at_lr) in zip(axes[0], by_lr):
        for i, arch in enumerate(archs):
            for j, n_loops in enumerate(loop_counts):
                cell = at_lr[(at_lr["arch"] == arch) & (at_lr["n_loops"] == n_loops)]
                colour, text = _stability_cell(cell)
                ax.add_patch(_rectangle(j, i, colour))
                ax.text(j, i, text, ha="center", va="center", fontsize=8)
        ax.set_xlim(-0.5, len(loop_counts) - 0.5)
        ax.set_ylim(len(archs) - 0.5, -0.5)
        ax.set_xticks(range(len(loop_counts)), [str(k) for k in loop_counts])
        ax.set_yticks(range(len(archs)), archs)
        ax.set_xlabel("loops K")
        ax.set_title(f"lr {lr:g}" if len(by_lr) > 1 else "")
    shown = [s for s in STATUS_COLOURS if s not in RARE_STATUSES or s in set(table["status"])]
    figure.legend(handles=[Patch(color=STATUS_COLOURS[s], label=s.replace("_", " ")) for s in shown],
                  loc="outside lower center", ncol=5, frameon=False, fontsize=8)
    several_runs = table.groupby(["arch", "n_loops", "lr"], dropna=False).size().max() > 1
    figure.suptitle("Verdict per cell; text: mean final train loss"
                    + (", runs stable / runs" if several_runs else ""))
    return figure


def _rectangle(x: float, y: float, colour: Any) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, facecolor=colour, edgecolor="white", linewidth=2)


def _stability_cell(cell: pd.DataFrame) -> tuple[Any, str]:
    if cell.empty:
        return NO_RUN_COLOUR, "no run"
    failures = cell.loc[cell["status"] != "stable", "status"]
    status = "stable" if failures.empty else failures.mode().iloc[0]
    losses = cell["final_loss"][np.isfinite(cell["final_loss"])]
    text = f"{losses.mean():.3g}" if len(losses) else "NaN"
    if status in ("collapsed", "recovered") and "mechanism" in cell.columns:  # what broke, in short
        mechanisms = cell.loc[cell["status"] == status, "mechanism"].dropna()
        if len(mechanisms):
            text += f"\n{MECHANISM_LABELS.get(mechanisms.mode().iloc[0], mechanisms.mode().iloc[0])}"
    if len(cell) > 1:
        text += f"\n{int((cell['status'] == 'stable').sum())}/{len(cell)} stable"
    if failures.nunique() > 1:  # the colour shows one failure; name them all, briefly
        text += "\n" + ", ".join(f"{n} {SHORT_STATUS.get(s, s)}" for s, n in failures.value_counts().items())
    return STATUS_COLOURS.get(status, NO_RUN_COLOUR), text


def plot_loss_curves(steps: pd.DataFrame) -> Figure:
    """Train loss vs step, one panel per (arch, K), seeds overlaid and named at their
    ends; a run whose loss turned non-finite ends in a red cross."""
    loss = next((c for c in LOSS_COLUMNS if c in steps.columns), None)
    if loss is None:
        raise ValueError(f"no train loss to draw: the frame has none of the columns "
                         f"{', '.join(LOSS_COLUMNS)} (a run store without per-step records?)")
    steps = training_rows(steps)  # a validation-only record has no train loss to draw
    archs = list(pd.unique(steps["arch"]))  # first-seen order, fast on a long frame
    loop_counts = sorted(steps["n_loops"].unique())
    figure, axes = new_figure(len(archs), len(loop_counts), panel_size=(3.0, 2.2),
                              sharex=True, sharey=True)
    finite = steps[loss][np.isfinite(steps[loss])]
    several_lrs = steps["lr"].nunique() > 1
    labels: EndLabels = {}
    for (i, arch), (j, n_loops) in itertools.product(enumerate(archs), enumerate(loop_counts)):
        ax = axes[i][j]
        cell = steps[(steps["arch"] == arch) & (steps["n_loops"] == n_loops)]
        for colour_index, (run_id, run) in enumerate(cell.groupby("run_id", sort=False)):
            colour = f"C{colour_index % 10}"
            draw_curve(ax, run["step"].to_numpy(), run[loss].to_numpy(), colour)
            name = f"s{run['seed'].iloc[0]}" + (f" lr{run['lr'].iloc[0]:g}" if several_lrs else "")
            add_end_label(labels, ax, run["step"].to_numpy(), run[loss].to_numpy(), name, colour)
            ok = run[np.isfinite(run[loss])]
            if len(ok) < len(run) and len(ok):
                ax.scatter(ok["step"].iloc[-1], ok[loss].iloc[-1], marker="x", color="red",
                           zorder=3)
        ax.set_title(f"{arch}, K={n_loops}", fontsize=9)
        ax.margins(x=0.2)
    if len(finite):
        axes[0][0].set_ylim(finite.min() * 0.95, finite.quantile(0.99) * 1.05)
    place_end_labels(labels)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("train loss (nats)")
    figure.suptitle("Train loss vs step per (arch, K); red x: loss became non-finite")
    return figure


def plot_oscillation_vs_loops(table: pd.DataFrame) -> Figure:
    """Oscillation index vs K, one line per arch (mean over runs; runs as dots)."""
    figure, axes = new_figure(1, 1, panel_size=(5.0, 3.4))
    ax = axes[0][0]
    colours = arch_colours(table["arch"].tolist())
    labels: EndLabels = {}
    for arch, group in table.groupby("arch", sort=False):
        mean = group.groupby("n_loops")["oscillation"].mean()
        ax.scatter(group["n_loops"], group["oscillation"], s=10, alpha=0.4, color=colours[arch])
        ax.plot(mean.index, mean.to_numpy(), marker="o", color=colours[arch])
        add_end_label(labels, ax, mean.index.tolist(), mean.tolist(), arch, colours[arch])
    ax.set_xlabel("loops K")
    ax.set_ylabel("oscillation index (mean max(0, -cos))")
    ax.set_xticks(sorted(table["n_loops"].unique()))
    ax.margins(x=0.2)
    place_end_labels(labels)
    ax.set_title("Gradient oscillation vs loops, 2nd half of training\n"
                 "(line: mean over runs; dots: single runs)", fontsize=10)
    return figure


def plot_lr_sensitivity(table: pd.DataFrame) -> Figure:
    """Final loss vs LR (log x), one panel per arch, one line per K (mean over runs with a
    finite loss); a diverged run is a red x at the panel's top, a collapsed one a ring."""
    from matplotlib.ticker import NullLocator

    archs = list(dict.fromkeys(table["arch"]))
    lrs = sorted(table["lr"].unique())
    figure, axes = new_figure(1, len(archs), sharey=True)
    colours = loop_colours(table["n_loops"].unique().tolist())
    labels: EndLabels = {}
    for ax, arch in zip(axes[0], archs):
        runs = table[table["arch"] == arch]
        for n_loops, group in runs.groupby("n_loops"):
            mean = group.groupby("lr")["final_loss"].mean()
            ax.plot(mean.index, mean.to_numpy(), marker="o", ms=3, color=colours[n_loops])
            add_end_label(labels, ax, mean.index.tolist(), mean.tolist(), f"K={n_loops}",
                          colours[n_loops])
        collapsed = runs[runs["status"] == "collapsed"]
        ax.scatter(collapsed["lr"], collapsed["final_loss"], s=60, facecolors="none",
                   edgecolors=STATUS_COLOURS["collapsed"], linewidths=1.5, zorder=3)
        diverged = runs[runs["status"] == "diverged"]
        ax.scatter(diverged["lr"], np.full(len(diverged), 0.97), marker="x", color="red",
                   transform=ax.get_xaxis_transform(), zorder=3)
        ax.set_xscale("log")
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_title(arch)
        ax.set_xlabel("peak learning rate (log)")
        ax.margins(x=0.25, y=0.15)  # headroom for the diverged marks at the top
    place_end_labels(labels)
    axes[0][0].set_ylabel("final train loss (nats)")
    figure.suptitle("Final loss vs learning rate per K; red x at top: diverged run, "
                    "orange ring: collapsed run")
    return figure


def plot_loop_scaling(frame: pd.DataFrame) -> Figure:
    """Test-time loop scaling: `value` vs inference loops `eval_loops`, mean over seeds;
    one row of panels per metric, one panel per arch, one line per trained K (a star
    marks it). Loss panels share a y range, so architectures compare across panels."""
    metrics = list(dict.fromkeys(frame["metric"]))
    archs = list(dict.fromkeys(frame["arch"]))
    figure, axes = new_figure(len(metrics), len(archs), panel_size=(3.0, 2.6), sharey="row")
    colours = loop_colours(frame["train_loops"].unique().tolist())
    labels: EndLabels = {}
    for row, metric in enumerate(metrics):
        for ax, arch in zip(axes[row], archs):
            rows = frame[(frame["metric"] == metric) & (frame["arch"] == arch)]
            for train_loops, line in rows.groupby("train_loops", sort=True):
                line = line.groupby("eval_loops")["value"].mean()
                colour = colours[train_loops]
                ax.plot(line.index, line.to_numpy(), marker="o", ms=3, color=colour)
                if train_loops in line.index:
                    ax.scatter([train_loops], [line[train_loops]], marker="*", s=90, color=colour,
                               zorder=3)
                add_end_label(labels, ax, line.index.tolist(), line.tolist(),
                              f"K={train_loops}", colour)
            ticks = sorted(frame["eval_loops"].unique())
            ax.set_xticks(ticks if len(ticks) <= 7 else [*ticks[:-1:2], ticks[-1]])  # room for 12
            ax.margins(x=0.3)
            ax.set_title(arch if row == 0 else "", fontsize=10)
            ax.set_xlabel("inference loops K'" if row == len(metrics) - 1 else "")
        axes[row][0].set_ylabel(metric)
    place_end_labels(labels)
    figure.suptitle("Test-time loop scaling: trained at K (star), evaluated at K'")
    return figure


def plot_loop_mechanism(loops: pd.DataFrame | Mapping[str, pd.DataFrame],
                        title: str = "") -> Figure:
    """One run's loops over training: 1 − token correlation, relative update and gradient
    norm per loop (one line per loop, log scale), the three signs of a looped collapse.
    `loops` is the run's long table (step, loop, stat, value), or its (step × loop) table
    of each stat (`RunData.loop_table`), which spares building the long one; absent or
    empty stats are skipped."""
    if isinstance(loops, pd.DataFrame):
        loops = {stat: loops[loops["stat"] == stat].pivot_table(index="step", columns="loop",
                                                                values="value", aggfunc="first")
                 for stat in MECHANISM_STATS}
    loops = {stat: table.dropna(axis=1, how="all") for stat, table in loops.items()}  # never logged
    panels = [(stat, transform, label) for stat, transform, label in MECHANISM_PANELS
              if stat in loops and not loops[stat].empty]
    figure, axes = new_figure(1, max(1, len(panels)), panel_size=(4.2, 3.0))
    for ax, (stat, transform, label) in zip(axes[0], panels):
        table = loops[stat]
        colours = loop_colours(list(table.columns))
        values = transform(table.to_numpy(dtype=float))
        # float32 rounding makes identical positions read as ±1e-7; draw them at a floor
        floor = 1e-8
        steps, curves = table.index.to_numpy(), np.clip(values, floor, None)
        for index, loop in enumerate(table.columns):
            draw_curve(ax, steps, curves[:, index], colours[loop], label=f"loop {loop}")
        shown = curves[np.isfinite(curves)]
        if len(shown):
            plain_log_axis(ax, "y", shown.min(), shown.max())
        else:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=9)
    if panels:
        axes[0][-1].legend(fontsize=6, ncol=2, frameon=False, loc="best")
    figure.suptitle(title or "Per-loop signs of a looped collapse")
    return figure


def plot_depth_accuracy(accuracy: pd.DataFrame) -> Figure:
    """Accuracy per task depth (rows: hops) and trained loop count (columns: K), each
    model evaluated at its own K, mean over seeds; one panel per arch. `accuracy` is
    `loopdiag.analysis.depth.depth_accuracy`'s frame."""
    at_own_k = accuracy[accuracy["eval_loops"] == accuracy["train_loops"]]
    archs = list(dict.fromkeys(accuracy["arch"]))
    hops = sorted(accuracy["hops"].unique())
    loop_counts = sorted(accuracy["train_loops"].unique())
    figure, axes = new_figure(1, len(archs), panel_size=(0.55 * len(loop_counts) + 1.2,
                                                           0.5 * len(hops) + 1.2),
                              layout="constrained")  # room for the colorbar
    image = None
    for ax, arch in zip(axes[0], archs):
        grid = (at_own_k[at_own_k["arch"] == arch]
                .pivot_table(index="hops", columns="train_loops", values="accuracy")
                .reindex(index=hops, columns=loop_counts))
        image = ax.imshow(grid.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis",
                          aspect="auto")
        for (i, j), value in np.ndenumerate(grid.to_numpy(dtype=float)):
            text = "–" if np.isnan(value) else f"{value:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="black" if not np.isnan(value) and value > 0.6 else "white")
        ax.set_xticks(range(len(loop_counts)), [str(k) for k in loop_counts])
        ax.set_yticks(range(len(hops)), [str(h) for h in hops])
        ax.set_xlabel("trained loops K")
        ax.set_title(arch, fontsize=10)
    axes[0][0].set_ylabel("hops")
    if image is not None:
        figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="exact-match accuracy")
    figure.suptitle("Accuracy per depth (hops) and trained loop count, evaluated at K' = K")
    return figure


def plot_loop_usefulness(updates: pd.DataFrame, accuracy: pd.DataFrame,
                         idle_update: float) -> Figure:
    """Per arch (columns), for its model trained at the largest K: top, the relative update
    of each loop at the end of training (median over seeds, log y, the idle line at
    `idle_update`); bottom, accuracy per depth evaluated at K' = loop index. Read down a
    column: a loop that moves the stream by little should add little accuracy.
    `updates`: (arch, train_loops, loop, value); `accuracy`: `depth_accuracy`'s frame."""
    archs = list(dict.fromkeys(accuracy["arch"]))
    figure, axes = new_figure(2, len(archs), panel_size=(3.0, 2.4), sharex="col")
    hop_colours = loop_colours(sorted(accuracy["hops"].unique().tolist()))
    for column, arch in enumerate(archs):
        top, bottom = axes[0][column], axes[1][column]
        largest = int(accuracy.loc[accuracy["arch"] == arch, "train_loops"].max())
        rows = updates[(updates["arch"] == arch) & (updates["train_loops"] == largest)]
        curve = rows.groupby("loop")["value"].median().sort_index()
        if len(curve):
            top.plot(curve.index, np.clip(curve.to_numpy(dtype=float), 1e-8, None), marker="o",
                     ms=3, color="black")
            top.set_yscale("log")
        top.axhline(idle_update, color="grey", linestyle="--", linewidth=0.8)
        top.set_title(f"{arch}, trained at K={largest}", fontsize=9)
        model = accuracy[(accuracy["arch"] == arch) & (accuracy["train_loops"] == largest)]
        for hops, line in model.groupby("hops", sort=True):
            line = line.sort_values("eval_loops")
            bottom.plot(line["eval_loops"], line["accuracy"], marker="o", ms=3,
                        color=hop_colours[hops], label=f"{hops} hop{'s' if hops > 1 else ''}")
        bottom.axvline(largest, color="grey", linewidth=0.6)
        bottom.set_ylim(-0.02, 1.02)
        bottom.set_xlabel("loop k / inference loops K'")
    axes[0][0].set_ylabel("relative update (log)")
    axes[1][0].set_ylabel("accuracy at K' = k")
    axes[1][-1].legend(fontsize=6, frameon=False, loc="best")
    figure.suptitle("Does each loop compute? Its relative update (top) beside the accuracy "
                    "it adds (bottom)")
    return figure
