"""ZClip follows the published rule, and fixes the reference implementation's gaps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainmedic.watcher.zclip import ZClip


def published(
    norms: list[float], *, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25
) -> list[float]:
    """The paper's algorithm written out plainly: the norm each step is rescaled to."""
    out: list[float] = []
    buf: list[float] = []
    mean = var = None
    for g in norms:
        if mean is None:
            buf.append(g)
            out.append(g)
            if len(buf) == warmup:
                mean = sum(buf) / warmup
                var = sum((x - mean) ** 2 for x in buf) / warmup
            continue
        std = math.sqrt(var)
        z = (g - mean) / (std + 1e-6)
        eff = mean + z_thresh * std / (z / z_thresh) if z > z_thresh else g
        out.append(eff)
        mean = alpha * mean + (1 - alpha) * eff
        var = alpha * var + (1 - alpha) * (eff - mean) ** 2
    return out


def spiky_norms(n: int = 200, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    norms = list(1.0 + 0.05 * rng.standard_normal(n))
    for i in (i for i in (60, 61, 120, 170) if i < n):
        norms[i] *= 1000.0  # x1000 gradient spikes
    return [float(x) for x in norms]


def applied(clip: ZClip, norms: list[float]) -> list[float]:
    out = []
    for g in norms:
        d = clip.decide(g)
        out.append(d.target if d.target is not None and d.target < g else g)
    return out


def test_matches_the_published_algorithm_on_an_injected_spike_sequence() -> None:
    norms = spiky_norms()
    ours = applied(ZClip(), norms)
    ref = published(norms)
    assert np.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    assert all(ours[i] < 2.0 for i in (60, 61, 120, 170))  # the x1000 spikes were clipped


def test_no_clipping_during_warmup_and_no_false_alarms_on_a_clean_run() -> None:
    rng = np.random.default_rng(3)
    clip = ZClip()
    decisions = [clip.decide(float(1 + 0.05 * x)) for x in rng.standard_normal(200)]
    assert all(d.reason == "warmup" for d in decisions[:25])
    clipped = [d for d in decisions if d.clipped]
    # a z > 2.5 event happens for ~0.6% of Gaussian steps; none in warm-up, few overall
    assert len(clipped) <= 4


def test_a_nan_gradient_leaves_the_statistics_finite() -> None:
    clip = ZClip(warmup=5)
    for g in (1.0, 1.1, 0.9, 1.0, 1.05, 1.0):
        clip.decide(g)
    d = clip.decide(float("nan"))
    assert d.reason == "nonfinite" and d.target is None
    clip.decide(float("inf"))
    assert clip.mean is not None and math.isfinite(clip.mean)
    assert clip.var is not None and math.isfinite(clip.var)
    assert clip.decide(1.0).reason == "none"


def test_nan_during_warmup_is_not_collected() -> None:
    clip = ZClip(warmup=3)
    for g in (1.0, float("nan"), 2.0, 3.0):
        clip.decide(g)
    assert clip.mean == pytest.approx(2.0)


def test_no_hidden_cap_unless_the_user_sets_one() -> None:
    clip = ZClip(warmup=2)
    assert clip.decide(50.0).target is None  # warm-up, no cap: left alone
    capped = ZClip(warmup=2, max_norm=1.0)
    d = capped.decide(50.0)
    assert d.reason == "cap" and d.target == 1.0


def test_cap_applies_on_top_but_the_statistics_follow_the_published_rule() -> None:
    norms = spiky_norms(120, seed=5)
    capped = ZClip(max_norm=1.02)
    plain = ZClip()
    for g in norms:
        capped.decide(g)
        plain.decide(g)
    assert capped.mean == pytest.approx(plain.mean)
    assert capped.var == pytest.approx(plain.var)


def test_state_round_trip_resumes_with_identical_decisions() -> None:
    norms = spiky_norms(150, seed=7)
    whole = ZClip()
    first = [whole.decide(g) for g in norms]
    part = ZClip()
    for g in norms[:80]:
        part.decide(g)
    resumed = ZClip()
    resumed.load_state_dict(part.state_dict())
    assert [resumed.decide(g) for g in norms[80:]] == first[80:]


def test_skipped_steps_do_not_feed_the_statistics() -> None:
    clip = ZClip(warmup=3)
    for g in (1.0, 1.0, 1.2):
        clip.decide(g)
    before = clip.state_dict()
    clip.decide(500.0, update=False)
    assert clip.state_dict() == before


def test_an_outlier_under_a_lower_user_cap_is_still_a_zclip_treatment() -> None:
    clip = ZClip(warmup=3, max_norm=1.0)
    for g in (2.0, 2.1, 1.9):
        clip.decide(g)
    d = clip.decide(2000.0)
    assert d.reason == "zscore" and d.target == 1.0
    assert clip.decide(2.0).reason == "cap"  # an ordinary step above the cap is just capped
