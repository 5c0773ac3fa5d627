"""Progress and plateaus: did a curve move, by how much, and is that more than its noise?

A curve's progress is judged from robust levels: the median of its first 3 points (the start:
fine-tunes often make their biggest move in the first few logs), the median of its last few
points, and the lowest median over consecutive blocks of that size. A change counts as
real when it beats the noise of those medians (z standard errors) and as meaningful when it is
also a minimum fraction of the starting level. Both are scale free, so a per-step log and a
windowed log of the same run give the same answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trainmedic.signals.robust import block_medians, median_of, noise_sigma

# Standard error of a sample median of k Gaussian points is sqrt(pi/2) sigma / sqrt(k).
_MEDIAN_SE = math.sqrt(math.pi / 2.0)
# Points in the start level: a median of 3 ignores one odd first log.
START_POINTS = 3


def level_points(n: int, frac: float = 0.1, lo: int = 3, hi: int = 50) -> int:
    """How many points make a "level": a tenth of the curve, at least 3, at most 50."""
    return max(1, min(n, max(lo, min(hi, int(n * frac)))))


def warmup_end(
    steps: np.ndarray,
    lr_steps: np.ndarray,
    lr_values: np.ndarray,
    frac: float = 0.1,
    peak_frac: float = 0.95,
) -> int:
    """Index of the first point after warm-up.

    Warm-up is the first `frac` of the logged points, extended to where the learning rate first
    reaches `peak_frac` of its maximum when the LR log shows a ramp (LR at the start below that).
    """
    n = steps.shape[0]
    end = min(n, math.ceil(frac * n))
    ok = np.isfinite(lr_values)
    lr_s, lr_v = lr_steps[ok], lr_values[ok]
    if lr_v.shape[0] >= 2:
        top = float(lr_v.max())
        if top > 0 and lr_v[0] < peak_frac * top:
            peak_step = int(lr_s[int(np.argmax(lr_v >= peak_frac * top))])
            end = max(end, int(np.searchsorted(steps, peak_step, side="left")))
    return min(end, n)


@dataclass(frozen=True)
class Progress:
    """Robust levels of a curve and the noise they are judged against."""

    start: float  # median of the first `start_points`
    end: float  # median of the last `points`
    best: float  # lowest median over consecutive blocks of `points` (or the end level)
    noise: float  # point-to-point noise sigma
    points: int
    start_points: int = START_POINTS

    @property
    def se(self) -> float:
        """Standard error of (start - a later level): medians of `start_points` and `points`."""
        if not math.isfinite(self.noise):
            return math.inf
        return _MEDIAN_SE * self.noise * math.sqrt(1.0 / self.start_points + 1.0 / self.points)

    @property
    def drop(self) -> float:
        return self.start - self.end

    @property
    def rel_drop(self) -> float:
        return self.drop / abs(self.start) if self.start else math.nan

    @property
    def best_drop(self) -> float:
        return self.start - self.best

    def real(self, change: float, z: float) -> bool:
        """`change` is beyond z standard errors of the noise."""
        return change > z * self.se

    def meaningful(self, change: float, min_rel: float) -> bool:
        """`change` is at least `min_rel` of the starting level."""
        return change >= min_rel * abs(self.start)


def progress(
    values: np.ndarray, points: int | None = None, start_points: int | None = START_POINTS
) -> Progress | None:
    """Levels of the finite points of `values`; None with fewer than 3 finite points.

    `start_points=None` measures the start over as many points as the end (a slow, noisy
    signal such as an RL reward, where the first 3 logs say little).
    """
    x = values[np.isfinite(values)]
    n = x.shape[0]
    if n < 3:
        return None
    k = points or level_points(n)
    blocks = block_medians(x, k)
    end = median_of(x[n - k :])
    best = min(float(blocks.min()) if blocks.shape[0] else math.inf, end)
    k0 = min(start_points or k, n)
    return Progress(
        start=median_of(x[:k0]),
        end=end,
        best=best,
        noise=noise_sigma(x),
        points=k,
        start_points=k0,
    )
