"""Divergence: the smoothed loss climbing well above its own best, and staying there.

The current level is a causal rolling median of `smooth_window` points (robust to isolated
spikes). The best level is the lowest of: the current level at the first full window (the
start), and the medians of the trailing `window` points seen so far (refreshed every `stride`
points; a 32-point median does not chase a short run of lucky batches the way a running minimum
of a 5-point median would on a long run). Nothing is judged before the first full window.
The run has diverged at point i when the current level stayed above

    best_i + max(rise x reference_i, noise_k x noise_i)

for `patience` consecutive points, where reference_i = max(|best_i|, floor_frac x |start|)
(start: the current level once the first window is full) and noise_i the trailing
point-to-point noise. Both terms are scale free: the first asks for a rise of half the loss
level (or of a tenth of the starting loss for losses that fell close to zero, so a fine-tune's
0.03 -> 0.06 wobble is not a divergence), the second keeps very noisy per-step curves from
reaching the first by noise alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trainmedic.signals.flags import Flag
from trainmedic.signals.robust import BlockStats, TrailingWindow, median_of, rolling_median, strided_stats


@dataclass(frozen=True)
class DivergenceRule:
    """Thresholds of the divergence rule, each with the reason for its default.

    - rise=0.5: a sustained 50% rise above the best level is far outside anything a healthy
      schedule produces (epoch boundaries and LR warm-up move a loss by a few percent) and is
      reached within a few points by a real blow-up.
    - floor_frac=0.1: near-zero losses are judged against a tenth of the starting loss, so a
      memorised run wobbling at 0.03 is not called diverged for doubling.
    - noise_k=4: the current level is a 5-point median (noise ~0.56 sigma) and the best a
      32-point one; 4 raw sigmas above the best is ~7 standard errors of the current level, which
      noise alone does not reach, while a short climbing log (noise measured from a handful
      of uneven steps) still confirms.
    - patience=3: three consecutive smoothed points; with the 5-point median that means the
      majority of about 7 raw points, so one bad batch never confirms a divergence.
    - smooth_window=5, window=32, stride=8, min_history=8: as in `spikes.SpikeRule`.
    """

    rise: float = 0.5
    floor_frac: float = 0.1
    noise_k: float = 4.0
    patience: int = 3
    smooth_window: int = 5
    window: int = 32
    stride: int = 8
    min_history: int = 8

    def __post_init__(self) -> None:
        if self.window < max(3, self.smooth_window) or self.stride < 1 or self.patience < 1:
            raise ValueError("divergence rule needs window >= max(3, smooth_window), stride, patience >= 1")


@dataclass(frozen=True)
class DivergenceTrace:
    """Per-point arrays of the divergence rule over an all-finite curve."""

    smooth: np.ndarray
    best: np.ndarray
    threshold: np.ndarray
    above: np.ndarray  # smooth > threshold
    run_length: np.ndarray  # consecutive `above` points ending here

    def confirmed(self, patience: int) -> np.ndarray:
        """True where the divergence has held for `patience` points (the whole episode after)."""
        return self.run_length >= patience

    def onsets(self, patience: int) -> list[tuple[int, int]]:
        """(index where an episode began, index where it was confirmed) for each episode."""
        hits = np.nonzero(self.run_length == patience)[0]
        return [(int(i) - patience + 1, int(i)) for i in hits]

    def at_end(self, patience: int) -> bool:
        return bool(self.run_length.shape[0] and self.run_length[-1] >= patience)


def divergence_trace(
    values: np.ndarray,
    rule: DivergenceRule = DivergenceRule(),
    smooth: np.ndarray | None = None,
    stats: BlockStats | None = None,
) -> DivergenceTrace:
    """The divergence rule evaluated at every point of an all-finite curve.

    `smooth` (rolling median over `smooth_window`) and `stats` (`strided_stats` with the rule's
    window, stride and min_history) may be passed when already computed.
    """
    n = values.shape[0]
    if n == 0:
        empty = np.zeros(0)
        return DivergenceTrace(empty, empty, empty, np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64))
    if smooth is None:
        smooth = rolling_median(values, rule.smooth_window)
    if stats is None:
        stats = strided_stats(values, rule.window, rule.stride, rule.min_history)
    m = rule.smooth_window
    best = np.repeat(np.fmin.accumulate(stats.level), rule.stride)[:n]
    best[: m - 1] = np.nan  # nothing is judged before the first full window
    if n >= m:
        start = float(smooth[m - 1])
        np.fmin(best[m - 1 :], start, out=best[m - 1 :])
        floor = rule.floor_frac * abs(start)
    else:
        floor = math.nan
    reference = np.abs(best)
    np.maximum(reference, floor, out=reference)
    reference *= rule.rise
    threshold = np.repeat(np.nan_to_num(stats.noise, nan=0.0), rule.stride)[:n]
    threshold *= rule.noise_k
    np.maximum(reference, threshold, out=threshold)
    del reference
    threshold += best
    with np.errstate(invalid="ignore"):
        above = smooth > threshold  # False where no best exists yet (NaN)
    run_length = np.arange(n)
    last_below = np.where(above, -1, run_length)
    np.maximum.accumulate(last_below, out=last_below)
    run_length -= last_below
    return DivergenceTrace(smooth, best, threshold, above, run_length)


def divergence_flags(values: np.ndarray, rule: DivergenceRule = DivergenceRule()) -> np.ndarray:
    """True at the point where each divergence episode is confirmed (aligned with `values`).

    Non-finite values are skipped, as in `DivergenceDetector`.
    """
    finite = np.isfinite(values)
    out = np.zeros(values.shape[0], dtype=bool)
    trace = divergence_trace(values[finite], rule)
    out[np.nonzero(finite)[0][trace.run_length == rule.patience]] = True
    return out


class DivergenceDetector:
    """Streaming twin of `divergence_flags`: returns a Flag when an episode is confirmed."""

    def __init__(self, rule: DivergenceRule = DivergenceRule()) -> None:
        self.rule = rule
        self._win = TrailingWindow(rule.window, rule.stride, rule.min_history)
        self._block_best = math.nan
        self._start = math.nan
        self._run = 0
        self._run_start_step = 0

    def update(self, step: int, value: float) -> Flag | None:
        if not math.isfinite(value):
            return None
        rule = self.rule
        level, noise = self._win.stats()
        self._block_best = _fmin(self._block_best, level)
        i = self._win.count
        self._win.push(float(value))
        smooth = median_of(self._win.last(rule.smooth_window))
        if i == rule.smooth_window - 1:
            self._start = smooth
        best = _fmin(self._block_best, self._start)
        above = False
        threshold = math.nan
        if i >= rule.smooth_window - 1 and math.isfinite(best):
            reference = max(abs(best), rule.floor_frac * abs(self._start))
            guard = rule.noise_k * noise if math.isfinite(noise) else 0.0
            threshold = best + max(rule.rise * reference, guard)
            above = smooth > threshold
        if above:
            if self._run == 0:
                self._run_start_step = int(step)
            self._run += 1
        else:
            self._run = 0
        if self._run == rule.patience:
            return Flag("divergence", int(step), float(value), float(threshold), self._run_start_step)
        return None


def _fmin(a: float, b: float) -> float:
    """min ignoring NaN, like np.fmin."""
    if math.isnan(a):
        return b
    if math.isnan(b):
        return a
    return min(a, b)
