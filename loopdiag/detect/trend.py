"""Rank-based trend statistics over a window: the Theil–Sen line and the Mann–Kendall test.

Rank-based, so a lone spike neither makes nor breaks a trend. They rerun on every record,
so they are written directly in numpy (the same numbers as `scipy.stats.theilslopes` and
a one-sided `scipy.stats.kendalltau`, at a fraction of the call overhead).
"""

from __future__ import annotations

import functools
import math

import numpy as np


def mann_kendall_rising_p(values: np.ndarray) -> float:
    """One-sided p-value that `values` (in step order) rise: Kendall's S over all pairs,
    normal approximation with continuity correction. Ties get no variance correction:
    measured floats rarely tie, and ignoring ties only makes p larger."""
    n = len(values)
    first, second = _pairs(n)
    s = float(np.sign(values[second] - values[first]).sum())
    z = (s - 1) / math.sqrt(n * (n - 1) * (2 * n + 5) / 18) if s > 0 else 0.0
    return 0.5 * math.erfc(z / math.sqrt(2))


def sen_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Theil–Sen slope (median of pairwise slopes) and the line's value at x[0], with
    scipy's default intercept median(y) - slope · median(x)."""
    first, second = _pairs(len(x))
    dx, dy = x[second] - x[first], y[second] - y[first]
    slope = float(np.median(dy[dx > 0] / dx[dx > 0]))
    return slope, float(np.median(y) - slope * (np.median(x) - x[0]))


@functools.lru_cache(maxsize=8)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs i < j of a window of n, computed once per window size."""
    return np.triu_indices(n, 1)
