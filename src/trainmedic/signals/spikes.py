"""Causal loss-spike detection judged against the curve's own noise.

A point is a spike when it exceeds the median of the `smooth_window` points before it by more
than `k` noise sigmas and by at least `min_rise` of that median, the sigma being the robust
point-to-point noise of the trailing `window` points (refreshed every `stride` points, see
`robust.strided_noise`). Only earlier points are used, so the verdict at step t is the same
whether computed live at step t or after the run.

Non-finite values are not spikes (the non-finite check owns them) and do not enter any window:
both `spike_flags` and `SpikeDetector` work on the finite sub-sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trainmedic.signals.flags import Flag
from trainmedic.signals.robust import TrailingWindow, median_of, rolling_median, strided_noise


@dataclass(frozen=True)
class SpikeRule:
    """Thresholds of the spike rule, each with the reason for its default.

    - k=6: with Gaussian noise a 6-sigma exceedance has probability ~1e-9 per point, so even a
      million-step healthy run yields essentially none after allowing for the error of a
      32-point scale estimate; genuine loss spikes (a bad batch, an LR blow-up) are tens of
      sigmas. 6 sigma is also the usual per-step threshold of pretraining spike monitors.
    - window=32: enough differences for the MAD to be within ~20% of the true sigma, short
      enough to follow the noise as the loss (and with it the noise) shrinks.
    - stride=8: the noise scale changes slowly; refreshing it every 8 points costs 8x less.
    - smooth_window=5: the reference level is the median of the 5 previous points, which follows
      a falling curve closely and ignores up to two earlier spikes.
    - min_history=8: no verdict before 8 earlier points exist (7 differences).
    - resolution=1e-4: HF rounds logged losses to 4 decimals; a curve that is constant after
      rounding has zero measured noise, and no smaller jump than the rounding step is a spike.
    - rel_floor=1e-3: noise is never taken below 0.1% of the level (float32 averaging noise).
    - min_rise=0.05: a spike also rises at least 5% above the level. On a curve that barely moves
      the measured noise is tiny, and 6 of its sigmas can be a hundredth of a nat: no one would
      act on a jump that a per-step loss makes from one batch to the next.
    """

    k: float = 6.0
    window: int = 32
    stride: int = 8
    smooth_window: int = 5
    min_history: int = 8
    resolution: float = 1e-4
    rel_floor: float = 1e-3
    min_rise: float = 0.05

    def __post_init__(self) -> None:
        if self.window < max(3, self.smooth_window) or self.stride < 1 or self.smooth_window < 1:
            raise ValueError("spike rule needs window >= max(3, smooth_window) and stride >= 1")


def _floored(noise: float | np.ndarray, level: float | np.ndarray, rule: SpikeRule) -> np.ndarray:
    return np.maximum(np.maximum(noise, rule.resolution), rule.rel_floor * np.abs(level))


def _threshold(noise: float | np.ndarray, level: float | np.ndarray, rule: SpikeRule) -> np.ndarray:
    """`level` plus k floored sigmas, and never less than `min_rise` of the level above it."""
    rise = np.maximum(rule.k * _floored(noise, level, rule), rule.min_rise * np.abs(level))
    return np.asarray(level + rise)


def spike_thresholds_finite(
    values: np.ndarray,
    rule: SpikeRule = SpikeRule(),
    smooth: np.ndarray | None = None,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """Spike threshold at each point of an all-finite curve; NaN where there is no verdict yet.

    `smooth` (rolling median over `smooth_window`) and `noise` (`strided_noise` blocks) may be
    passed when already computed for the same rule, e.g. by the divergence check.
    """
    n = values.shape[0]
    out = np.full(n, np.nan)
    if n <= rule.min_history:
        return out
    if smooth is None:
        smooth = rolling_median(values, rule.smooth_window)
    if noise is None:
        noise = strided_noise(values, rule.window, rule.stride, rule.min_history)
    level = smooth[rule.min_history - 1 : n - 1]  # median of the `smooth_window` points before i
    sigma = np.repeat(noise, rule.stride)[rule.min_history : n]
    thr = _threshold(sigma, level, rule)
    out[rule.min_history :] = thr  # NaN where the noise is not known yet
    return out


def spike_flags(values: np.ndarray, rule: SpikeRule = SpikeRule()) -> np.ndarray:
    """Boolean spike mask aligned with `values` (non-finite points are never flagged)."""
    finite = np.isfinite(values)
    if finite.all():
        with np.errstate(invalid="ignore"):
            return values > spike_thresholds_finite(values, rule)
    out = np.zeros(values.shape[0], dtype=bool)
    x = values[finite]
    thr = spike_thresholds_finite(x, rule)
    with np.errstate(invalid="ignore"):
        out[finite] = x > thr
    return out


def evaluated_points(n_finite: int, rule: SpikeRule = SpikeRule()) -> int:
    """How many points of a finite curve get a spike verdict (the denominator of the rate)."""
    return max(0, n_finite - rule.min_history)


class SpikeDetector:
    """Streaming twin of `spike_flags`: feed (step, value) one at a time.

    Holds the last `window` finite values; the noise scale is recomputed every `stride` values,
    exactly where the offline pass refreshes it, so both flag the same steps.
    """

    def __init__(self, rule: SpikeRule = SpikeRule()) -> None:
        self.rule = rule
        self._win = TrailingWindow(rule.window, rule.stride, rule.min_history)

    def update(self, step: int, value: float) -> Flag | None:
        if not math.isfinite(value):
            return None
        rule = self.rule
        _, noise = self._win.stats()
        flag = None
        if self._win.count >= rule.min_history and math.isfinite(noise):
            level = median_of(self._win.last(rule.smooth_window))
            thr = float(_threshold(noise, level, rule))
            if value > thr:
                flag = Flag("spike", int(step), float(value), thr, int(step))
        self._win.push(float(value))
        return flag
