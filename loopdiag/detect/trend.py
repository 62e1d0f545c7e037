"""Rank-based trend statistics over a window: the Theil–Sen line and the Mann–Kendall test.

Rank-based, so a lone spike neither makes nor breaks a trend. They rerun on every record,
so they are written directly in numpy (the same numbers as `scipy.stats.theilslopes` and
a one-sided `scipy.stats.kendalltau`, at a fraction of the call overhead).
"""

from __future__ import annotations

import functools
import math

import numpy as np

ROLLING_CHUNK = 1 << 21  # values per block of windows held at once


def mann_kendall_rising_p(values: np.ndarray) -> float:
    """One-sided p-value that `values` (in step order) rise: Kendall's S over all pairs,
    normal approximation with continuity correction. Ties get no variance correction:
    measured floats rarely tie, and ignoring ties only makes p larger."""
    n = len(values)
    first, second = _pairs(n)
    return rising_p(float(np.sign(values[second] - values[first]).sum()), n)


def rising_p(s: float, n: int) -> float:
    """The one-sided p-value of Kendall's S over a window of n values."""
    z = (s - 1) / math.sqrt(n * (n - 1) * (2 * n + 5) / 18) if s > 0 else 0.0
    return 0.5 * math.erfc(z / math.sqrt(2))


def rolling_rising_p(values: np.ndarray, n: int) -> np.ndarray:
    """`mann_kendall_rising_p` of every window of n consecutive values, the window ending
    at position n - 1 first. Kendall's S is an integer, updated exactly from one window to
    the next (the pairs of the value leaving, those of the value entering), so each p is
    the per-window function's to the last bit, in O(n) per window instead of O(n²)."""
    if len(values) < n:
        return np.empty(0)
    windows = np.lib.stride_tricks.sliding_window_view(values, n)
    entering = np.empty(len(windows))
    leaving = np.empty(len(windows))
    rows = max(1, ROLLING_CHUNK // n)
    for start in range(0, len(windows), rows):
        block = windows[start:start + rows]
        # Counting comparisons is the sign sum of the differences (finite values) at a third
        # of the cost: no float temporaries.
        newest, older = block[:, -1:], block[:, :-1]
        entering[start:start + rows] = (np.count_nonzero(older < newest, axis=1)
                                        - np.count_nonzero(older > newest, axis=1))
        oldest, later = block[:, :1], block[:, 1:]
        leaving[start:start + rows] = (np.count_nonzero(later > oldest, axis=1)
                                       - np.count_nonzero(later < oldest, axis=1))
    first, second = _pairs(n)
    s = np.empty(len(windows))
    s[0] = np.sign(windows[0][second] - windows[0][first]).sum()
    s[1:] = s[0] + np.cumsum(entering[1:] - leaving[:-1])
    p_of = {value: rising_p(value, n) for value in np.unique(s).tolist()}
    return np.array([p_of[value] for value in s.tolist()])


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
