"""Drawing helpers shared by the plots: a pyplot-free figure on an Agg canvas, saving as
PNG (and SVG on request), a report's figures drawn in two processes at once, long curves
thinned to their per-pixel envelope, direct line labels instead of legends, plain-number log
axes, colours."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

STATUS_COLOURS = {"stable": "#8fd18f", "recovered": "#d4e157", "collapsed": "#f5b041",
                  "diverged": "#e5533d", "failed_to_train": "#b39ddb", "interrupted": "#c8c8c8"}
MECHANISM_LABELS = {"representation": "repr.", "gradient": "grad.", "residual": "resid.",
                    "plateau": "plateau", "loss": "loss"}
NO_RUN_COLOUR = "#ffffff"
PNG_DPI = 120
# Buckets a long curve is thinned to before its panel is known (a report's loss frame):
# more than any panel's pixel columns at PNG_DPI.
ENVELOPE_BUCKETS = 1000
# The fixed layout's margins, in inches: tick labels and an axis label left and below, a
# suptitle and panel titles above (and the 2 % of the height a suptitle leaves above it);
# between panels, tick labels unless the axis is shared.
FIXED_MARGINS = {"left": 0.8, "right": 0.2, "bottom": 0.55, "top": 0.6}
FIXED_GAPS = {"shared": (0.2, 0.35), "own": (0.7, 0.6)}  # (between columns, between rows)


def new_figure(nrows: int, ncols: int, panel_size: tuple[float, float] = (3.6, 2.8),
               layout: str = "fixed", **subplots: Any) -> tuple[Figure, np.ndarray]:
    """A figure on its own Agg canvas with an (nrows, ncols) array of axes. `layout`
    "fixed" places the panels by `FIXED_MARGINS` and `FIXED_GAPS`, at once; "constrained"
    (for a legend outside the axes or a colorbar) measures every label at drawing time,
    which cost a third of saving a grid of panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = panel_size[0] * ncols + 0.6, panel_size[1] * nrows + 0.8
    figure = Figure(figsize=(width, height), layout=None if layout == "fixed" else layout)
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=False, **subplots)
    if layout == "fixed":
        gap_x = FIXED_GAPS["shared" if subplots.get("sharey") in (True, "row") else "own"][0]
        gap_y = FIXED_GAPS["shared" if subplots.get("sharex") in (True, "col") else "own"][1]
        left, right = FIXED_MARGINS["left"] / width, 1 - FIXED_MARGINS["right"] / width
        bottom, top = FIXED_MARGINS["bottom"] / height, 0.98 - FIXED_MARGINS["top"] / height
        panel_width = (width * (right - left) - gap_x * (ncols - 1)) / ncols
        panel_height = (height * (top - bottom) - gap_y * (nrows - 1)) / nrows
        figure.subplots_adjust(left=left, right=right, bottom=bottom, top=top,
                               wspace=gap_x / panel_width, hspace=gap_y / panel_height)
    return figure, axes


def save_figure(figure: Figure, path_stem: str | Path, *, svg: bool = False) -> list[Path]:
    """Write `<path_stem>.png`, and `<path_stem>.svg` when `svg` is true; returns the paths
    written. Without `svg`, an SVG of the same name is removed: left from an earlier
    drawing, it would no longer match the PNG."""
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    png, vector = Path(f"{path_stem}.png"), Path(f"{path_stem}.svg")
    figure.savefig(png, dpi=PNG_DPI)
    if not svg:
        vector.unlink(missing_ok=True)
        return [png]
    figure.savefig(vector)  # an SVG costs as much as the PNG again: only when asked for
    return [png, vector]


@dataclass(frozen=True)
class FigureJob:
    """A figure to draw: `plot(*args)` (a module-level function, so another process can
    run it), saved as `<name>.png` under the figures folder."""

    name: str
    plot: Callable[..., Figure]
    args: tuple[Any, ...]


def _draw(job: FigureJob, folder: Path, svg: bool) -> None:
    save_figure(job.plot(*job.args), folder / job.name, svg=svg)


def _import_plots() -> None:
    import loopdiag.analysis.plots  # noqa: F401 - the helper's imports, before any figure


class FigureDrawer:
    """Draws a report's figures here and, with `helper`, in one spawned process beside this
    one. The helper starts at once, so its imports (matplotlib, pandas) overlap the
    caller's reading of the store; it draws figures as they are `submit`ted, and `finish`
    draws here, from the back, those it has not taken. Without a helper (`loopdiag report`
    asks for one on two cores or more), or where none can start (in a daemon process), every
    figure is drawn here. The files are the same either way. Like any spawned process, the helper needs a script's
    `if __name__ == "__main__":` guard."""

    def __init__(self, folder: Path, *, svg: bool = False, helper: bool = False) -> None:
        self.folder, self.svg = folder, svg
        self._pool: ProcessPoolExecutor | None = None
        self._submitted: list[tuple[FigureJob, Future | None]] = []
        if helper:
            try:
                self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_import_plots)
                self._pool.submit(int)  # start the helper now, not at the first figure
            except (OSError, RuntimeError, AssertionError):  # daemonic processes cannot fork
                self.close()

    def submit(self, jobs: Sequence[FigureJob]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for job in jobs:
            future = None
            if self._pool is not None:
                try:
                    future = self._pool.submit(_draw, job, self.folder, self.svg)
                except (BrokenProcessPool, RuntimeError):
                    self.close()
            self._submitted.append((job, future))

    def finish(self) -> None:
        """Every submitted figure drawn and saved (a figure's error raised here)."""
        submitted, self._submitted = self._submitted, []
        for job, future in reversed(submitted):
            if future is None or future.cancel():  # not taken by the helper
                _draw(job, self.folder, self.svg)
        for job, future in submitted:
            if future is not None and not future.cancelled():
                try:
                    future.result()
                except BrokenProcessPool:  # the helper died: its figure is drawn here
                    _draw(job, self.folder, self.svg)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> FigureDrawer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def pixel_columns(ax: Axes) -> int:
    """How many pixel columns the axes spans in the PNG (before the layout shrinks it)."""
    return max(1, int(ax.get_position().width * ax.figure.get_figwidth() * PNG_DPI))


def envelope_indices(x: np.ndarray, y: np.ndarray, buckets: int = ENVELOPE_BUCKETS) -> np.ndarray:
    """Sorted indices of the points that draw the curve (x ascending, y) as the full curve
    looks when `buckets` equal slices of its x range each fill one pixel column: in each
    slice its lowest and highest finite y (a one-step spike stays), its first non-finite y
    (the line's gap), and the first, last and last finite points (where a curve ends and
    is labelled). What a report keeps of a 100k-step curve before `draw_curve` draws it."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    count = len(y)
    if count <= 3 * buckets + 3:  # no more than an envelope keeps
        return np.arange(count)
    span = x[-1] - x[0]
    slices = (np.minimum(((x - x[0]) * (buckets / span)).astype(np.int64), buckets - 1)
              if span > 0 else np.zeros(count, dtype=np.int64))
    keep = [np.array([0, count - 1])]
    finite = np.flatnonzero(np.isfinite(y))
    if len(finite):  # x ascending: each slice is one stretch of `finite`, reduced at once
        values, owners = y[finite], slices[finite]
        starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
        sizes, positions = np.diff(np.r_[starts, len(finite)]), np.arange(len(finite))
        at_low = values == np.repeat(np.minimum.reduceat(values, starts), sizes)
        at_high = values == np.repeat(np.maximum.reduceat(values, starts), sizes)
        first_low = np.minimum.reduceat(np.where(at_low, positions, len(finite)), starts)
        last_high = np.maximum.reduceat(np.where(at_high, positions, -1), starts)
        keep += [finite[first_low], finite[last_high], finite[-1:]]
    gaps = np.flatnonzero(~np.isfinite(y))
    if len(gaps):
        keep.append(gaps[np.r_[True, slices[gaps][1:] != slices[gaps][:-1]]])
    return np.unique(np.concatenate(keep))


def draw_curve(ax: Axes, x: np.ndarray, y: np.ndarray, colour: Any, linewidth: float = 1.0,
               label: str | None = None) -> None:
    """Draw y over x (ascending) as a line, or, with more than three points per pixel
    column of the axes, as the band between its lowest and highest finite y in each column
    (edged like the line): the pixels the full line covers, where a dense zigzag of
    segments would cost Agg its whole stroke length. A column without a finite y is a gap."""
    from matplotlib.collections import PolyCollection

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    columns = pixel_columns(ax)
    if len(y) <= 3 * columns + 3 or x[-1] <= x[0]:
        ax.plot(x, y, color=colour, linewidth=linewidth, label=label)
        return
    slices = np.minimum(((x - x[0]) * (columns / (x[-1] - x[0]))).astype(np.int64), columns - 1)
    finite = np.isfinite(y)
    lows, highs = np.full(columns, np.inf), np.full(columns, -np.inf)
    np.minimum.at(lows, slices[finite], y[finite])
    np.maximum.at(highs, slices[finite], y[finite])
    centres = x[0] + (np.arange(columns) + 0.5) * (x[-1] - x[0]) / columns
    filled = np.isfinite(lows)
    starts = np.flatnonzero(filled & ~np.r_[False, filled[:-1]])  # runs of filled columns
    ends = np.flatnonzero(filled & ~np.r_[filled[1:], False]) + 1
    bands = [np.r_[np.c_[centres[a:b], highs[a:b]], np.c_[centres[a:b], lows[a:b]][::-1]]
             for a, b in zip(starts, ends)]
    # the bands as polygons: fill_between's masking and interpolation cost more than drawing them
    ax.add_collection(PolyCollection(bands, facecolors=colour, edgecolors=colour,
                                     linewidths=linewidth, label=label))
    ax.autoscale_view()  # older matplotlib does not fit the view to an added collection


EndLabels = dict[Any, list[tuple[float, float, str, Any]]]  # axes -> (x, y, text, colour)
LABEL_GAP = 0.075  # least vertical distance between two end labels, in axes fraction


def add_end_label(labels: EndLabels, ax: Axes, x: Sequence[float], y: Sequence[float],
                  text: str, colour: Any) -> None:
    """Remember a line's name for its last finite point (drawn by `place_end_labels`)."""
    finite = np.flatnonzero(np.isfinite(np.asarray(y, dtype=float)))
    if len(finite):
        labels.setdefault(ax, []).append((x[finite[-1]], y[finite[-1]], text, colour))


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
    """Log scale labelled in plain numbers (1, 2, 5, 10, ...; finer within one decade;
    powers of ten alone, without minor ticks, over more than three decades), readable at a
    glance and far cheaper to lay out and draw than mathtext powers on minor ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    within_a_decade = high < 10 * low
    many_decades = high > 1e3 * low
    subs = ((1.0,) if many_decades else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if within_a_decade
            else (1.0, 2.0, 5.0))
    axis.set_major_locator(LogLocator(subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())
    if many_decades:
        axis.set_minor_locator(NullLocator())


def loop_colours(loop_counts: Sequence[int]) -> dict[int, Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    ordered = sorted(set(loop_counts))
    return {k: cmap(0.85 * i / max(1, len(ordered) - 1)) for i, k in enumerate(ordered)}


def arch_colours(archs: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    return {arch: colormaps["tab10"](i % 10) for i, arch in enumerate(dict.fromkeys(archs))}
