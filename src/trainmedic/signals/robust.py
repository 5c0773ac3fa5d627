"""Robust location and scale: medians and MADs, per window, in bounded memory.

Every statistic here exists in two shapes that share one kernel (`median_rows`): a vectorised pass
over a whole curve (post-hoc probes) and a single-window call (the streaming detectors). Both feed
the kernel identically ordered rows, so the two shapes agree to the last bit.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# 1 / Phi^-1(3/4): turns a median absolute deviation into a standard deviation for Gaussian noise.
MAD_SCALE = 1.4826
# Rows per chunk when a sliding window is materialised: 16k rows x 32 columns x 8 bytes = 4 MB.
CHUNK_ROWS = 1 << 14


def median_rows(a: np.ndarray) -> np.ndarray:
    """Median of each row of a 2-D array (partition based: O(cols) per row, no full sort)."""
    cols = a.shape[1]
    if cols == 0:
        return np.full(a.shape[0], np.nan)
    mid = cols // 2
    if cols % 2:
        return np.partition(a, mid, axis=1)[:, mid]
    # One kth is several times faster than two; the lower middle is the max of the left part.
    part = np.partition(a, mid, axis=1)
    return (part[:, :mid].max(axis=1) + part[:, mid]) * 0.5


def median_of(values: np.ndarray) -> float:
    """Median of a 1-D array through the same kernel as the windowed versions."""
    if values.shape[0] == 0:
        return math.nan
    return float(median_rows(values.reshape(1, -1))[0])


def mad_sigma_rows(a: np.ndarray) -> np.ndarray:
    """Robust standard deviation (1.4826 x median absolute deviation) of each row."""
    med = median_rows(a)
    return MAD_SCALE * median_rows(np.abs(a - med[:, None]))


def diff_noise_rows(a: np.ndarray) -> np.ndarray:
    """Noise sigma of each row from its first differences.

    Differencing removes a smooth trend, and the MAD of the differences around their own median
    removes a steady slope, so what is left is the point-to-point noise (for white noise,
    sigma(diff) = sqrt(2) sigma). A curve falling fast is therefore not mistaken for a noisy one.
    """
    if a.shape[1] < 3:
        return np.full(a.shape[0], np.nan)
    return mad_sigma_rows(np.diff(a, axis=1)) / math.sqrt(2.0)


def robust_location_scale(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 x MAD) of the finite values; NaN when there are none."""
    x = values[np.isfinite(values)]
    if x.shape[0] == 0:
        return math.nan, math.nan
    row = x.reshape(1, -1)
    return float(median_rows(row)[0]), float(mad_sigma_rows(row)[0])


def noise_sigma(values: np.ndarray) -> float:
    """Point-to-point noise sigma of a whole curve (see `diff_noise_rows`); NaN below 3 points."""
    x = values[np.isfinite(values)]
    if x.shape[0] < 3:
        return math.nan
    return float(diff_noise_rows(x.reshape(1, -1))[0])


def _window_chunks(values: np.ndarray, width: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first window index, block of full sliding windows) in chunks of bounded size."""
    view = np.lib.stride_tricks.sliding_window_view(values, width)
    for start in range(0, view.shape[0], CHUNK_ROWS):
        yield start, view[start : start + CHUNK_ROWS]


def rolling_median(values: np.ndarray, window: int) -> np.ndarray:
    """Causal rolling median: out[i] = median(values[max(0, i-window+1) : i+1]).

    The first `window-1` points use the shorter windows they have, so out[0] = values[0].
    """
    n = values.shape[0]
    out = np.empty(n, dtype=np.float64)
    head = min(n, window - 1)
    for i in range(head):
        out[i] = median_of(values[: i + 1])
    if n >= window:
        for start, block in _window_chunks(values, window):
            out[window - 1 + start : window - 1 + start + block.shape[0]] = median_rows(block)
    return out


def block_medians(values: np.ndarray, block: int) -> np.ndarray:
    """Medians of consecutive non-overlapping blocks of `block` points (a ragged tail is dropped)."""
    nb = values.shape[0] // block
    if nb == 0:
        return np.zeros(0)
    out = np.empty(nb)
    rows = values[: nb * block].reshape(nb, block)
    for start in range(0, nb, CHUNK_ROWS):
        out[start : start + CHUNK_ROWS] = median_rows(rows[start : start + CHUNK_ROWS])
    return out


@dataclass(frozen=True)
class BlockStats:
    """Per-block statistics of the trailing window (see `strided_stats`)."""

    level: np.ndarray  # median of the window
    noise: np.ndarray  # point-to-point noise sigma of the window

    def at(self, n: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
        """The statistics in force at each of `n` points (point i uses block i // stride)."""
        return np.repeat(self.level, stride)[:n], np.repeat(self.noise, stride)[:n]


def _window_stats(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return median_rows(rows), diff_noise_rows(rows)


def strided_stats(values: np.ndarray, window: int, stride: int, min_history: int) -> BlockStats:
    """Median and noise sigma of the trailing `window` values, refreshed every `stride` points.

    Block b describes values[max(0, j-window) : j] with j = b * stride (NaN while fewer than
    `min_history` values precede j). Refreshing per block rather than per point costs `stride`
    times less, and a streaming detector reproduces it exactly with a ring buffer of `window`
    values (`TrailingWindow`).
    """
    n = values.shape[0]
    nb = (n + stride - 1) // stride
    level, noise = np.full(nb, np.nan), np.full(nb, np.nan)
    least = max(min_history, 3)
    for b in range(nb):
        j = b * stride
        if j >= window:
            break
        if j >= least:
            lv, nz = _window_stats(values[:j].reshape(1, -1))
            level[b], noise[b] = lv[0], nz[0]
    first = -(-max(window, least) // stride)  # first block with a full window
    if first < nb:
        # Windows ending at j = b * stride start at j - window; take them as strided views.
        view = np.lib.stride_tricks.sliding_window_view(values, window)[first * stride - window :: stride]
        view = view[: nb - first]
        for start in range(0, view.shape[0], CHUNK_ROWS):
            rows = view[start : start + CHUNK_ROWS]
            sl = slice(first + start, first + start + rows.shape[0])
            level[sl], noise[sl] = _window_stats(rows)
    return BlockStats(level, noise)


def strided_noise(values: np.ndarray, window: int, stride: int, min_history: int) -> np.ndarray:
    """The noise half of `strided_stats`: one sigma per block of `stride` points."""
    return strided_stats(values, window, stride, min_history).noise


class TrailingWindow:
    """The streaming side of `strided_stats`: the last `window` values and their statistics.

    Call `stats()` before `push(value)`: it returns (median, noise sigma) of the trailing window,
    refreshed on the same `stride` boundaries as the offline pass (NaN before `min_history`).
    """

    def __init__(self, window: int, stride: int, min_history: int) -> None:
        self.window, self.stride, self.min_history = window, stride, min_history
        self._buf: deque[float] = deque(maxlen=window)
        self.count = 0
        self._stats = (math.nan, math.nan)

    def stats(self) -> tuple[float, float]:
        if self.count % self.stride == 0:
            self._stats = (math.nan, math.nan)
            if self.count >= max(self.min_history, 3):
                lv, nz = _window_stats(np.asarray(self._buf).reshape(1, -1))
                self._stats = (float(lv[0]), float(nz[0]))
        return self._stats

    def refreshed(self) -> bool:
        """True when the next `stats()` call recomputes (a stride boundary)."""
        return self.count % self.stride == 0

    def last(self, m: int) -> np.ndarray:
        """The last `m` values pushed, oldest first."""
        return np.asarray(self._buf)[-m:]

    def push(self, value: float) -> None:
        self._buf.append(value)
        self.count += 1
