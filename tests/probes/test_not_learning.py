"""not_learning: flat from the start FAILs, chance constants are named, DPO and RL handled."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainmedic.findings import Verdict
from trainmedic.probes.not_learning import NotLearningSpec, not_learning
from trainmedic.run import Run, Series

SPEC = NotLearningSpec()


def make_run(loss: np.ndarray, steps: np.ndarray | None = None, **kw: object) -> Run:
    steps = np.arange(1, len(loss) + 1) * 10 if steps is None else steps
    return Run(path=Path("x"), layout="test", train_loss=Series.of(steps, loss), **kw)  # type: ignore[arg-type]


def noise(n: int, scale: float, seed: int = 0) -> np.ndarray:
    return scale * np.random.default_rng(seed).standard_normal(n)


def test_flat_from_the_start_fails() -> None:
    f = not_learning(make_run(4.68 + noise(34, 0.01)), SPEC)
    assert f.verdict is Verdict.FAIL, f.message
    assert f.name == f.kind == "not_learning"
    assert "flat from the start" in f.message


def test_learning_run_passes() -> None:
    loss = 2.0 * np.exp(-np.arange(100) / 30) + 1.0 + noise(100, 0.02)
    f = not_learning(make_run(loss), SPEC)
    assert f.verdict is Verdict.PASS and "a real fall" in f.message


def test_learned_early_then_plateaued_high_is_not_this_probes_business() -> None:
    loss = np.r_[[3.4, 3.3, 3.2], 3.05 + noise(200, 0.03)]
    f = not_learning(make_run(loss), SPEC)
    assert f.verdict is Verdict.PASS, f.message


def test_four_way_task_stuck_at_ln4_names_the_constant() -> None:
    train = 1.39 + noise(62, 0.005)
    steps = np.arange(1, 63) * 50
    ev = Series.of(steps, np.round(np.log(4) + noise(62, 0.0001, seed=1), 4))
    f = not_learning(make_run(train, steps, eval_loss=ev), SPEC)
    assert f.verdict is Verdict.FAIL, f.message
    assert "train and eval loss sit at 1.3863 = ln 4 (chance for 4-way choice)" in f.message
    assert "evaluations" in f.message
    assert f.evidence["chance_constant"]["name"] == "ln 4"


def test_dpo_at_ln2_at_the_start_is_expected_and_not_flagged() -> None:
    n = 200
    loss = np.log(2) * np.exp(-np.arange(n) / 150) + noise(n, 0.01)
    loss[0] = 0.6931
    margins = {"rewards/margins": Series.of(np.arange(1, n + 1) * 10, np.linspace(0, 2, n))}
    f = not_learning(make_run(loss, extra=margins), SPEC)
    assert f.verdict is Verdict.PASS, f.message


def test_dpo_stuck_at_ln2_after_warmup_fails_naming_ln2() -> None:
    n = 200
    loss = np.log(2) + noise(n, 0.004)
    margins = {"rewards/margins": Series.of(np.arange(1, n + 1) * 10, noise(n, 0.01))}
    f = not_learning(make_run(loss, extra=margins), SPEC)
    assert f.verdict is Verdict.FAIL
    assert "0.6931 = ln 2" in f.message and "logged points after warm-up" in f.message


def test_sft_that_fell_to_0_69_is_not_called_chance() -> None:
    loss = np.r_[np.linspace(2.0, 0.70, 40), 0.693 + noise(160, 0.005)]
    f = not_learning(make_run(loss), SPEC)
    assert f.verdict is Verdict.PASS, f.message
    assert "chance_constant" not in f.evidence


def test_long_lr_warmup_moves_the_chance_window() -> None:
    n = 100
    steps = np.arange(1, n + 1) * 10
    lr = Series.of(steps, np.minimum(1.0, steps / 400) * 1e-4)  # ramp over the first 40 points
    loss = np.r_[np.log(4) + noise(40, 0.002), np.linspace(1.38, 0.6, 60)]
    f = not_learning(make_run(loss, steps, learning_rate=lr), SPEC)
    assert f.verdict is Verdict.PASS, f.message
    assert f.evidence["warmup_end_step"] >= 380


def test_a_rising_loss_never_fell() -> None:
    f = not_learning(make_run(np.linspace(1.0, 30.0, 10)), SPEC)
    assert f.verdict is Verdict.FAIL and "rose" in f.message


def test_small_but_real_drop_warns_as_barely_learning() -> None:
    loss = np.linspace(3.0, 2.97, 2000) + noise(2000, 0.002)
    f = not_learning(make_run(loss), SPEC)
    assert f.verdict is Verdict.WARN and "barely learning" in f.message


def test_grpo_zero_loss_is_judged_on_reward_and_never_fails() -> None:
    n = 400
    rng = np.random.default_rng(3)
    loss = np.where(rng.random(n) < 0.7, 0.0, 0.001 * rng.standard_normal(n))
    steps = np.arange(1, n + 1)
    rising = {"reward": Series.of(steps, np.linspace(0.1, 0.4, n) + 0.1 * rng.standard_normal(n))}
    f = not_learning(make_run(loss, steps, extra=rising), SPEC)
    assert f.verdict is Verdict.PASS and "reward" in f.message
    flat = {"reward": Series.of(steps, 0.3 + 0.2 * rng.standard_normal(n))}
    g = not_learning(make_run(loss, steps, extra=flat), SPEC)
    assert g.verdict is Verdict.WARN and "no reward gain" in g.message
    h = not_learning(make_run(loss, steps), SPEC)
    assert h.verdict is Verdict.SKIP and "reward" in h.message


def test_too_few_points_skip() -> None:
    f = not_learning(make_run(np.array([2.0, 1.9, np.nan, 1.8])), SPEC)
    assert f.verdict is Verdict.SKIP
