"""Drawing helpers shared by the plots: a pyplot-free figure on an Agg canvas, saving as
PNG + SVG, direct line labels instead of legends, plain-number log axes, colours."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

STATUS_COLOURS = {"stable": "#8fd18f", "collapsed": "#f5b041", "diverged": "#e5533d",
                  "failed_to_train": "#b39ddb", "interrupted": "#c8c8c8"}
MECHANISM_LABELS = {"representation": "repr.", "gradient": "grad.", "residual": "resid.",
                    "plateau": "plateau", "loss": "loss"}
NO_RUN_COLOUR = "#ffffff"


def new_figure(nrows: int, ncols: int, panel_size: tuple[float, float] = (3.6, 2.8),
               **subplots: Any) -> tuple[Figure, np.ndarray]:
    """A figure on its own Agg canvas with an (nrows, ncols) array of axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(panel_size[0] * ncols + 0.6, panel_size[1] * nrows + 0.8),
                    layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(nrows, ncols, squeeze=False, **subplots)


def save_figure(figure: Figure, path_stem: str | Path) -> tuple[Path, Path]:
    """Write `<path_stem>.png` and `<path_stem>.svg`; returns both paths."""
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    png, svg = Path(f"{path_stem}.png"), Path(f"{path_stem}.svg")
    figure.savefig(png, dpi=120)
    figure.savefig(svg)
    return png, svg


EndLabels = dict[Any, list[tuple[float, float, str, Any]]]  # axes -> (x, y, text, colour)
LABEL_GAP = 0.075  # least vertical distance between two end labels, in axes fraction


def add_end_label(labels: EndLabels, ax: Axes, x: Sequence[float], y: Sequence[float],
                  text: str, colour: Any) -> None:
    """Remember a line's name for its last finite point (drawn by `place_end_labels`)."""
    finite = [(a, b) for a, b in zip(x, y) if np.isfinite(b)]
    if finite:
        labels.setdefault(ax, []).append((*finite[-1], text, colour))


def place_end_labels(labels: EndLabels) -> None:
    """Write each line's name just right of its end, so no legend is needed; names that
    would overlap are pushed apart vertically. Call once every limit is final."""
    for ax, items in labels.items():
        ax.autoscale_view()
        ax.set_xlim(ax.get_xlim())  # freeze the limits the positions are computed from
        ax.set_ylim(ax.get_ylim())
        to_axes = ax.transData + ax.transAxes.inverted()
        points = [to_axes.transform((x, y)) for x, y, _, _ in items]
        order = sorted(range(len(items)), key=lambda i: points[i][1])
        heights: dict[int, float] = {}
        for rank, i in enumerate(order):
            below = heights[order[rank - 1]] + LABEL_GAP if rank else -np.inf
            heights[i] = max(points[i][1], below)
        overflow = max(0.0, max(heights.values()) - 0.97)
        for i, (x, y, text, colour) in enumerate(items):
            ax.annotate(text, xy=(x, y), xytext=(points[i][0] + 0.02, heights[i] - overflow),
                        textcoords="axes fraction", va="center", fontsize=8, color=colour,
                        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white",
                              "edgecolor": "none", "alpha": 0.8})


def plain_log_axis(ax: Axes, which: str, low: float, high: float) -> None:
    """Log scale labelled in plain numbers (1, 2, 5, 10, ...; finer within one decade),
    readable at a glance and far cheaper to draw than mathtext powers on minor ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    within_a_decade = high < 10 * low
    subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if within_a_decade else (1.0, 2.0, 5.0)
    axis.set_major_locator(LogLocator(subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def loop_colours(loop_counts: Sequence[int]) -> dict[int, Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    ordered = sorted(set(loop_counts))
    return {k: cmap(0.85 * i / max(1, len(ordered) - 1)) for i, k in enumerate(ordered)}


def arch_colours(archs: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    return {arch: colormaps["tab10"](i % 10) for i, arch in enumerate(dict.fromkeys(archs))}
