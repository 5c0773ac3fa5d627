"""Windowed robust statistics agree with their naive definitions, in bounded chunks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainmedic.signals.robust import (
    MAD_SCALE,
    block_medians,
    diff_noise_rows,
    median_rows,
    noise_sigma,
    robust_location_scale,
    rolling_median,
    strided_noise,
)
from trainmedic.signals.stability import instability_events, smoothness


def test_median_rows_equals_numpy_median_for_odd_and_even_widths() -> None:
    rng = np.random.default_rng(0)
    for cols in range(1, 12):
        a = rng.standard_normal((40, cols))
        np.testing.assert_allclose(median_rows(a), np.median(a, axis=1), rtol=0, atol=1e-15)


def test_robust_scale_recovers_gaussian_sigma_and_ignores_outliers() -> None:
    rng = np.random.default_rng(1)
    x = 3.0 + 0.2 * rng.standard_normal(20_000)
    x[:500] = 1e6  # 2.5% gross outliers
    loc, scale = robust_location_scale(x)
    assert loc == pytest.approx(3.0, abs=0.01)
    assert scale == pytest.approx(0.2, rel=0.05)
    assert pytest.approx(1.4826) == MAD_SCALE


def test_diff_noise_ignores_a_steep_trend() -> None:
    rng = np.random.default_rng(2)
    t = np.arange(5000)
    x = 10.0 - 0.01 * t + 0.05 * rng.standard_normal(t.shape[0])
    assert noise_sigma(x) == pytest.approx(0.05, rel=0.06)
    assert float(diff_noise_rows(x[None, :2])[0]) != float(diff_noise_rows(x[None, :2])[0])  # NaN: too short


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 90), window=st.integers(1, 9), seed=st.integers(0, 1000))
def test_rolling_median_is_causal_and_matches_naive(n: int, window: int, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal(n)
    expected = [np.median(x[max(0, i - window + 1) : i + 1]) for i in range(n)]
    np.testing.assert_allclose(rolling_median(x, window), expected, rtol=0, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 120),
    window=st.integers(3, 40),
    stride=st.integers(1, 10),
    min_history=st.integers(1, 12),
    seed=st.integers(0, 1000),
)
def test_strided_noise_matches_naive_trailing_windows(
    n: int, window: int, stride: int, min_history: int, seed: int
) -> None:
    x = np.random.default_rng(seed).standard_normal(n)
    got = strided_noise(x, window, stride, min_history)
    assert got.shape[0] == -(-n // stride)
    for b, value in enumerate(got):
        j = b * stride
        if j < max(min_history, 3):
            assert np.isnan(value)
        else:
            w = np.diff(x[max(0, j - window) : j])
            expected = MAD_SCALE * np.median(np.abs(w - np.median(w))) / np.sqrt(2)
            assert value == pytest.approx(expected, abs=1e-12)


def test_block_medians_drop_the_ragged_tail() -> None:
    x = np.arange(10, dtype=float)
    np.testing.assert_array_equal(block_medians(x, 3), [1.0, 4.0, 7.0])
    assert block_medians(x, 20).shape == (0,)


def _naive_events(x: np.ndarray, window: int, sigma: float) -> list[int]:
    d = np.diff(x)
    a = np.abs(d)
    half = max(1, window // 2)
    out = []
    for i in range(d.shape[0]):
        if d.shape[0] < 2 * half + 1:
            base = np.median(a)
        else:
            base = np.median(np.concatenate([a[max(0, i - half) : i], a[i + 1 : i + half + 1]]))
        if d[i] > 0 and d[i] > sigma * base:
            out.append(i + 1)
    return out


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 80), window=st.integers(2, 12), seed=st.integers(0, 1000))
def test_original_instability_count_matches_its_definition(n: int, window: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.standard_normal(n)) * 0.1 + rng.standard_normal(n)
    assert instability_events(x, window, 3.0).tolist() == _naive_events(x, window, 3.0)


def test_zero_baseline_makes_any_increase_an_instability_event() -> None:
    x = np.array([1.0] * 12 + [1.0001] + [1.0] * 12)
    assert instability_events(x, 10, 3.0).tolist() == [12]


def test_smoothness_is_zero_for_a_constant_curve_and_high_for_a_smooth_one() -> None:
    assert smoothness(np.full(50, 2.0)) == 0.0
    assert smoothness(np.exp(-np.arange(200) / 50)) > 0.99
    rng = np.random.default_rng(3)
    assert smoothness(rng.standard_normal(500)) == 0.0
