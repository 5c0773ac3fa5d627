"""Downsampling curves for charts and evidence without hiding what matters.

Each bucket keeps its minimum and its maximum (a spike or a collapse survives any zoom level)
and, when it has one, its first non-finite point in place of the maximum, so a NaN is never
averaged away. The first and last points are always kept.
"""

from __future__ import annotations

import numpy as np


def downsample(steps: np.ndarray, values: np.ndarray, max_points: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` (>= 2) points of the curve, in step order, first and last kept."""
    n = values.shape[0]
    if max_points < 2:
        raise ValueError("max_points must be at least 2")
    if n <= max_points:
        return steps.copy(), values.copy()
    inner = n - 2
    buckets = (max_points - 2) // 2
    if buckets == 0:
        return steps[[0, n - 1]], values[[0, n - 1]]
    size = -(-inner // buckets)  # ceil
    buckets = -(-inner // size)
    pad = buckets * size - inner
    v = values[1 : n - 1]
    finite = np.isfinite(v)
    lo = np.where(finite, v, np.inf)
    hi = np.where(finite, v, -np.inf)
    bad = ~finite
    if pad:
        lo = np.concatenate([lo, np.full(pad, np.inf)])
        hi = np.concatenate([hi, np.full(pad, -np.inf)])
        bad = np.concatenate([bad, np.zeros(pad, dtype=bool)])
    base = np.arange(buckets) * size
    i_lo = base + np.argmin(lo.reshape(buckets, size), axis=1)
    i_hi = base + np.argmax(hi.reshape(buckets, size), axis=1)
    bad2 = bad.reshape(buckets, size)
    has_bad = bad2.any(axis=1)
    i_hi = np.where(has_bad, base + np.argmax(bad2, axis=1), i_hi)
    picked = np.unique(np.concatenate([i_lo, i_hi]))
    picked = picked[picked < inner] + 1
    keep = np.concatenate([[0], picked, [n - 1]])
    return steps[keep], values[keep]


def curve_evidence(steps: np.ndarray, values: np.ndarray, max_points: int = 512) -> dict[str, list]:
    """A JSON-safe downsampled curve: {"steps": [...], "values": [...]}, None for non-finite."""
    s, v = downsample(steps, values, max_points)
    return {
        "steps": [int(x) for x in s],
        "values": [float(x) if np.isfinite(x) else None for x in v],
    }
