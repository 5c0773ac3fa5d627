"""Exact spectra of low-rank updates `scale * B @ A`, and a robust outlier test on their sizes.

A LoRA update is `out x in` but has rank at most `r` (8-64). Its singular values are those of a
small `r x r` matrix: with `B = Q_B R_B` and `A^T = Q_A R_A` (thin QR, orthonormal `Q`s),
`B @ A = Q_B (R_B R_A^T) Q_A^T`, and multiplying by matrices with orthonormal columns keeps
singular values. So the full update never has to be built: `O((out + in) r^2)` instead of
`O(out * in * r)` work and memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# 1.4826 * MAD estimates the standard deviation of normally distributed data.
_MAD_TO_SIGMA = 1.4826


def lowrank_singular_values(b: np.ndarray, a: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray:
    """Singular values (descending) of `scale * b @ a`, batched over the leading axis.

    `b` is `(n, out, r)`, `a` is `(n, r, in)`, `scale` a scalar or `(n,)`. Returns `(n, k)` with
    `k = min(out, r, in)`; the remaining singular values of the product are exactly zero.
    """
    b = np.asarray(b, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    if b.ndim != 3 or a.ndim != 3 or b.shape[0] != a.shape[0] or b.shape[2] != a.shape[1]:
        raise ValueError(f"expected b (n, out, r) and a (n, r, in); got {b.shape} and {a.shape}")
    n = b.shape[0]
    k = min(b.shape[1], b.shape[2], a.shape[2])
    if n == 0 or k == 0:
        return np.zeros((n, k))
    r_b = np.linalg.qr(b, mode="r")  # (n, min(out, r), r)
    r_a = np.linalg.qr(np.swapaxes(a, 1, 2), mode="r")  # (n, min(in, r), r)
    core = r_b @ np.swapaxes(r_a, 1, 2)  # (n, min(out, r), min(in, r))
    s = np.linalg.svd(core, compute_uv=False)[:, :k]
    scale_arr = np.abs(np.broadcast_to(np.asarray(scale, dtype=np.float64), (n,)))
    return s * scale_arr[:, None]


def effective_rank(s: np.ndarray) -> np.ndarray:
    """Entropy effective rank `exp(H(s / sum s))` (Roy & Vetterli 2007), row-wise; 0 for zero rows.

    It reads as "how many directions carry the update": 1 when one singular value dominates,
    `r` when all are equal, and it does not jump when a tiny singular value crosses a cut-off.
    """
    s = np.atleast_2d(np.asarray(s, dtype=np.float64))
    total = s.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(total > 0, s / np.where(total > 0, total, 1.0), 0.0)
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return np.where(total[:, 0] > 0, np.exp(-plogp.sum(axis=1)), 0.0)


@dataclass(frozen=True)
class Outliers:
    """Which points of a positive sample stand out on a log scale, and by how much."""

    ratio: np.ndarray  # value / median of the sample
    z: np.ndarray  # robust z-score of log(value); inf where the sample has no spread
    flagged: np.ndarray  # bool


def log_outliers(values: np.ndarray, *, z_threshold: float, min_ratio: float) -> Outliers:
    """Flag values whose log departs from the median log by more than `z_threshold` robust sigmas
    (median absolute deviation) AND by more than a factor `min_ratio` either way.

    Sizes of updates vary multiplicatively, hence the log. The z-score alone would flag a 10 %
    departure in a sample that happens to be very tight (MAD near 0); the ratio floor keeps the
    flag for departures large enough to matter. Median and MAD ignore a few outliers themselves,
    and a steady trend across the sample gives |z| of about 1.3 at its ends, so trends do not flag.
    """
    x = np.log(np.asarray(values, dtype=np.float64))
    med = float(np.median(x))
    sigma = _MAD_TO_SIGMA * float(np.median(np.abs(x - med)))
    dev = x - med
    z = dev / sigma if sigma > 0 else np.where(dev > 0, np.inf, np.where(dev < 0, -np.inf, 0.0))
    flagged = (np.abs(z) > z_threshold) & (np.abs(dev) > np.log(min_ratio))
    return Outliers(ratio=np.exp(dev), z=z, flagged=flagged)
