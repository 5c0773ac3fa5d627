"""Loss spikes: judged against the curve's own noise, and never for a rise nobody would act on."""

from __future__ import annotations

import numpy as np

from trainmedic.signals.spikes import SpikeDetector, SpikeRule, spike_flags


def _flat(level: float, n: int = 60, noise: float = 0.002, seed: int = 0) -> np.ndarray:
    return level + np.random.default_rng(seed).normal(0, noise, n)


def _streamed(values: np.ndarray) -> np.ndarray:
    det = SpikeDetector()
    return np.array([det.update(i, float(v)) is not None for i, v in enumerate(values)])


def test_a_rise_of_a_few_hundredths_on_a_flat_curve_is_no_spike() -> None:
    values = _flat(6.2)
    values[40] = 6.2 * 1.012  # ~20 sigmas of this curve's noise, but only 1.2 % (0.07 nats)
    assert not spike_flags(values).any()
    assert not _streamed(values).any()


def test_a_rise_past_the_floor_and_the_noise_is_a_spike_offline_and_live() -> None:
    values = _flat(6.2)
    values[40] = 6.2 * 1.10
    assert spike_flags(values).nonzero()[0].tolist() == [40]
    assert _streamed(values).nonzero()[0].tolist() == [40]


def test_on_a_noisy_curve_the_noise_decides_not_the_floor() -> None:
    values = _flat(2.0, noise=0.1, seed=3)
    values[40] = 2.0 * 1.08  # above the 5 % floor, but within 6 sigmas of this noise
    assert not spike_flags(values).any()
    values[40] = 2.0 + 1.2  # 12 sigmas
    assert spike_flags(values)[40]


def test_the_floor_is_a_rule_setting() -> None:
    values = _flat(6.2)
    values[40] = 6.2 * 1.012
    assert spike_flags(values, SpikeRule(min_rise=0.0))[40]
