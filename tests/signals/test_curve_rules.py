"""Downsampling, chance constants, objective guessing, warm-up, progress, non-finite helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainmedic.signals.chance import LN2, LN3, LN4, match_chance, pinned_at_chance
from trainmedic.signals.downsample import curve_evidence, downsample
from trainmedic.signals.nonfinite import ScalerRule, forward_fill, scaler_calibration_mask
from trainmedic.signals.objective import Objective, classify_objective
from trainmedic.signals.plateau import progress, warmup_end


def test_downsample_keeps_first_last_extremes_and_nan_within_budget() -> None:
    rng = np.random.default_rng(0)
    n = 100_003
    steps = np.arange(n) * 10
    values = rng.random(n)
    values[54_321] = 50.0  # a spike
    values[70_000] = -3.0  # a dip
    values[80_000] = np.nan
    s, v = downsample(steps, values, 512)
    assert s.shape[0] == v.shape[0] <= 512
    assert np.nanmax(v) == 50.0 and np.nanmin(v) == -3.0
    assert s[0] == 0 and s[-1] == steps[-1]
    assert np.all(np.diff(s) > 0)
    assert 543_210 in s and 700_000 in s and 800_000 in s
    ev = curve_evidence(steps, values, 512)
    assert None in ev["values"] and len(ev["steps"]) == len(ev["values"]) <= 512


def test_downsample_leaves_short_curves_alone_and_rejects_tiny_budgets() -> None:
    s, v = downsample(np.arange(5), np.arange(5.0), 512)
    assert s.tolist() == [0, 1, 2, 3, 4] and v.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError):
        downsample(np.arange(5), np.arange(5.0), 1)
    s, v = downsample(np.arange(1000), np.arange(1000.0), 2)
    assert s.tolist() == [0, 999] and v.tolist() == [0.0, 999.0]


def test_chance_constants_are_named_and_matched_within_tolerance() -> None:
    assert LN2.value == pytest.approx(0.6931, abs=1e-4)
    assert LN4.value == pytest.approx(1.3863, abs=1e-4)
    assert match_chance(1.3871, 0.02) is LN4
    assert match_chance(1.0986, 0.02) is LN3
    assert match_chance(1.25, 0.02) is None
    assert match_chance(float("nan"), 0.02) is None
    assert "ln 4" in LN4.describe() and "4-way" in LN4.describe()


def test_pinned_at_chance_needs_the_whole_tail_there() -> None:
    rng = np.random.default_rng(1)
    stuck = LN4.value + 0.005 * rng.standard_normal(60)
    assert pinned_at_chance(stuck, 0.02) is LN4
    leaving = np.concatenate([stuck[:40], np.linspace(1.3, 0.9, 20)])
    assert pinned_at_chance(leaving, 0.02) is None
    assert pinned_at_chance(stuck[:2], 0.02) is None


def test_objective_is_guessed_from_extras_and_the_start_of_the_loss() -> None:
    ce = np.linspace(2.5, 1.0, 50)
    assert classify_objective(ce, []) is Objective.CROSS_ENTROPY
    assert classify_objective(ce, ["reward", "kl"]) is Objective.RL
    assert classify_objective(ce, ["rewards/margins"]) is Objective.PREFERENCE
    assert classify_objective(np.r_[0.6931, np.linspace(0.69, 0.4, 20)], []) is Objective.PREFERENCE
    assert classify_objective(np.r_[0.0, -0.01, 0.02, 0.0, 0.0, 0.1], []) is Objective.NEAR_ZERO
    assert classify_objective(np.full(5, np.nan), []) is Objective.UNKNOWN


def test_warmup_extends_to_the_end_of_the_lr_ramp() -> None:
    steps = np.arange(10, 1010, 10)
    lr_steps = steps
    ramp = np.minimum(1.0, lr_steps / 300) * 2e-4  # peaks at step 300
    assert warmup_end(steps, lr_steps, ramp) == int(np.searchsorted(steps, 290))
    constant = np.full(steps.shape[0], 2e-4)
    assert warmup_end(steps, lr_steps, constant) == 10  # 10% of 100 points
    assert warmup_end(steps, np.zeros(0, dtype=np.int64), np.zeros(0)) == 10


def test_progress_judges_a_fall_against_noise_and_start_level() -> None:
    rng = np.random.default_rng(2)
    flat = 4.68 + 0.01 * rng.standard_normal(40)
    p = progress(flat)
    assert p is not None
    assert not (p.real(p.best_drop, 3.0) and p.meaningful(p.best_drop, 0.02))
    falling = np.linspace(3.0, 1.0, 40) + 0.01 * rng.standard_normal(40)
    q = progress(falling)
    assert q is not None and q.real(q.drop, 3.0) and q.meaningful(q.drop, 0.02)
    assert q.rel_drop == pytest.approx(q.drop / q.start)
    assert progress(np.array([1.0, np.nan])) is None


def test_forward_fill_uses_last_finite_value_and_first_for_leading_gaps() -> None:
    x = np.array([np.nan, 2.0, np.inf, np.nan, 1.0, np.nan])
    np.testing.assert_array_equal(forward_fill(x), [2.0, 2.0, 2.0, 2.0, 1.0, 1.0])
    assert np.isnan(forward_fill(np.full(3, np.nan))).all()


def test_scaler_calibration_requires_lr_zero_a_short_run_and_a_finite_follow_up() -> None:
    steps = np.arange(1, 8)
    g = np.array([np.inf, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    lr_steps, lr_zero_then_up = steps, np.array([0.0, 1e-5, 2e-5, 3e-5, 4e-5, 5e-5, 6e-5])
    assert scaler_calibration_mask(steps, g, lr_steps, lr_zero_then_up).tolist() == [True] + [False] * 6
    # LR already moving: a real overflow.
    assert not scaler_calibration_mask(steps, g, lr_steps, np.full(7, 1e-5)).any()
    # No LR logged yet at that step counts as 0.
    assert scaler_calibration_mask(steps, g, np.array([5]), np.array([1e-5]))[0]
    # Too long a leading run is not calibration.
    long = np.array([np.inf] * 4 + [1.0] * 3)
    assert not scaler_calibration_mask(steps, long, lr_steps, np.zeros(7), ScalerRule(3)).any()
    # Never followed by a finite value: broken, not calibration.
    assert not scaler_calibration_mask(steps[:2], np.array([np.nan, np.nan]), lr_steps, np.zeros(7)).any()
    assert math.isfinite(LN2.value)
