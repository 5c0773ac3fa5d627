"""memorization: train loss ~0 with no eval set WARNs; eval data hands over to overfit; RL skips."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainmedic.findings import Verdict
from trainmedic.probes.memorization import MemorizationSpec, memorization
from trainmedic.run import Run, Series

SPEC = MemorizationSpec()


def make_run(loss: np.ndarray, **kw: object) -> Run:
    steps = np.arange(1, len(loss) + 1)
    return Run(path=Path("x"), layout="test", train_loss=Series.of(steps, loss), **kw)  # type: ignore[arg-type]


def to_zero(n: int = 200, floor: float = 0.004) -> np.ndarray:
    return 3.0 * np.exp(-np.arange(n) / 20) + floor


def test_near_zero_train_loss_without_eval_warns() -> None:
    f = memorization(make_run(to_zero()), SPEC)
    assert f.verdict is Verdict.WARN
    assert f.name == f.kind == "memorization"
    assert "no eval set to tell memorisation from learning" in f.message
    assert f.evidence["tail_level"] < 0.1


def test_near_zero_train_loss_with_eval_data_is_left_to_overfit() -> None:
    ev = Series.of([100, 200], [0.9, 1.1])
    f = memorization(make_run(to_zero(), eval_loss=ev), SPEC)
    assert f.verdict is Verdict.PASS
    assert "overfit" in f.message and f.evidence["gap"] > 1.0


def test_healthy_final_loss_passes() -> None:
    f = memorization(make_run(to_zero(floor=0.45)), SPEC)
    assert f.verdict is Verdict.PASS and "above the 0.1 floor" in f.message


def test_a_single_low_point_is_not_a_sustained_tail() -> None:
    loss = to_zero(floor=0.5)
    loss[-1] = 0.01
    assert memorization(make_run(loss), SPEC).verdict is Verdict.PASS


def test_rl_logs_never_fire() -> None:
    rng = np.random.default_rng(0)
    loss = np.where(rng.random(300) < 0.8, 0.0, 0.001 * rng.standard_normal(300))
    run = make_run(loss, extra={"reward": Series.of(np.arange(1, 301), rng.random(300))})
    f = memorization(run, SPEC)
    assert f.verdict is Verdict.SKIP and "rl" in f.message
    assert memorization(make_run(loss), SPEC).verdict is Verdict.SKIP  # ~0 from the start, no reward


def test_negative_tail_is_a_broken_loss_not_memorisation() -> None:
    loss = np.r_[np.linspace(0.4, 0.0, 30), np.full(30, -0.01)]
    f = memorization(make_run(loss), SPEC)
    assert f.verdict is Verdict.SKIP and "broken loss" in f.message
