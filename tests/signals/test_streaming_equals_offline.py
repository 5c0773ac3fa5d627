"""The streaming detectors flag exactly the steps the offline passes flag, on the same curve."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from trainmedic.signals.nonfinite import NonFiniteDetector, ScalerRule, scaler_calibration_mask
from trainmedic.signals.spikes import SpikeDetector, SpikeRule, spike_flags, spike_thresholds_finite
from trainmedic.signals.trend import DivergenceDetector, DivergenceRule, divergence_flags


def _curve(kind: str, n: int = 600, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    base = 2.0 * np.exp(-t / 150) + 0.5
    x = base * (1 + 0.05 * rng.standard_normal(n))
    if kind == "spiky":
        x[rng.choice(n, 12, replace=False)] *= 4.0
    elif kind == "diverging":
        x[400:] = x[400] * np.exp((t[400:] - 400) / 40)
    elif kind == "with_nan":
        x[rng.choice(n, 20, replace=False)] = np.nan
        x[17] = np.inf
    elif kind == "rounded_flat":
        x = np.round(np.full(n, 0.0002) + 0.00004 * rng.standard_normal(n), 4)
    elif kind == "recovering":
        x[300:340] *= 3.0
    return x


def _online_spikes(values: np.ndarray, rule: SpikeRule) -> list[int]:
    det = SpikeDetector(rule)
    return [f.step for s, v in enumerate(values) if (f := det.update(s, float(v))) is not None]


def _online_divergence(values: np.ndarray, rule: DivergenceRule) -> list[int]:
    det = DivergenceDetector(rule)
    return [f.step for s, v in enumerate(values) if (f := det.update(s, float(v))) is not None]


def test_spike_detector_matches_offline_flags_on_realistic_curves() -> None:
    rule = SpikeRule()
    total = 0
    for kind in ("healthy", "spiky", "diverging", "with_nan", "rounded_flat", "recovering"):
        x = _curve(kind)
        offline = np.nonzero(spike_flags(x, rule))[0].tolist()
        assert _online_spikes(x, rule) == offline, kind
        total += len(offline)
    assert total > 10  # the curves do contain spikes, so the comparison is not vacuous


def test_spike_detector_threshold_is_bit_identical_to_offline() -> None:
    x = _curve("healthy", 300, seed=3)
    rule = SpikeRule(k=0.5)  # low bar: many flags, each carrying its threshold
    thr = spike_thresholds_finite(x, rule)
    det = SpikeDetector(rule)
    seen = 0
    for i, v in enumerate(x):
        flag = det.update(i, float(v))
        if flag is not None:
            assert flag.threshold == thr[i]
            seen += 1
    assert seen > 20


def test_divergence_detector_matches_offline_flags() -> None:
    rule = DivergenceRule()
    confirmed = 0
    for kind in ("healthy", "spiky", "diverging", "with_nan", "recovering"):
        x = _curve(kind)
        offline = np.nonzero(divergence_flags(x, rule))[0].tolist()
        assert _online_divergence(x, rule) == offline, kind
        confirmed += len(offline)
    assert confirmed >= 2  # diverging and recovering curves each confirm an episode


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            st.floats(min_value=-5, max_value=50, allow_nan=False),
            st.just(float("nan")),
            st.just(float("inf")),
        ),
        min_size=0,
        max_size=120,
    ),
    window=st.integers(5, 20),
    stride=st.integers(1, 6),
    smooth=st.integers(1, 5),
)
def test_online_equals_offline_on_arbitrary_streams(
    values: list[float], window: int, stride: int, smooth: int
) -> None:
    x = np.asarray(values, dtype=np.float64)
    srule = SpikeRule(k=1.0, window=window, stride=stride, smooth_window=smooth, min_history=3)
    assert _online_spikes(x, srule) == np.nonzero(spike_flags(x, srule))[0].tolist()
    drule = DivergenceRule(rise=0.1, patience=2, smooth_window=smooth, window=window, stride=stride)
    assert _online_divergence(x, drule) == np.nonzero(divergence_flags(x, drule))[0].tolist()


@settings(max_examples=60, deadline=None)
@given(
    grad=st.lists(st.sampled_from([1.0, 0.5, float("nan"), float("inf")]), min_size=0, max_size=12),
    lr_zero_until=st.integers(0, 6),
    max_points=st.integers(0, 4),
)
def test_nonfinite_detector_matches_calibration_mask(
    grad: list[float], lr_zero_until: int, max_points: int
) -> None:
    g = np.asarray(grad, dtype=np.float64)
    steps = np.arange(1, g.shape[0] + 1)
    lr = np.where(steps <= lr_zero_until, 0.0, 1e-4)
    rule = ScalerRule(max_points)
    excused = scaler_calibration_mask(steps, g, steps, lr, rule)
    offline = set(steps[~np.isfinite(g) & ~excused].tolist())
    det = NonFiniteDetector(rule)
    online: set[int] = set()
    for s, v, r in zip(steps, g, lr, strict=True):
        online.update(f.step for f in det.update(int(s), 1.0, float(v), float(r)))
    online.update(f.step for f in det.finish())
    assert online == offline
