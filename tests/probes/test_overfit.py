"""overfit: eval turning up while train falls WARNs and names the checkpoint to keep."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainmedic.findings import Verdict
from trainmedic.probes.overfit import OverfitSpec, overfit
from trainmedic.run import Run, Series

SPEC = OverfitSpec()
TRAIN_STEPS = np.arange(10, 2010, 10)


def make_run(eval_values: list[float], eval_every: int = 200, train: np.ndarray | None = None) -> Run:
    ev_steps = np.arange(1, len(eval_values) + 1) * eval_every
    train = np.linspace(1.5, 0.05, TRAIN_STEPS.shape[0]) if train is None else train
    return Run(
        path=Path("x"),
        layout="test",
        train_loss=Series.of(TRAIN_STEPS, train),
        eval_loss=Series.of(ev_steps, eval_values),
    )


def test_fewer_than_three_evals_skip_with_reason() -> None:
    f = overfit(make_run([0.5, 0.6]), SPEC)
    assert f.verdict is Verdict.SKIP and "2 finite eval loss point(s)" in f.message


def test_eval_rising_while_train_falls_warns_naming_the_best_checkpoint() -> None:
    f = overfit(make_run([0.40, 0.35, 0.33, 0.36, 0.41, 0.45, 0.52, 0.56, 0.60]), SPEC)
    assert f.verdict is Verdict.WARN, f.message
    assert f.name == f.kind == "overfit"
    assert "step 600" in f.message and "checkpoint-600" in f.message
    assert "train loss fell" in f.message
    assert f.evidence["best_step"] == 600 and f.evidence["evals_after_best"] == 6
    assert f.evidence["events"][0]["step"] == 600


def test_steadily_improving_eval_passes() -> None:
    f = overfit(make_run([1.0, 0.9, 0.84, 0.8, 0.78, 0.77, 0.765]), SPEC)
    assert f.verdict is Verdict.PASS and "the last evaluation" in f.message


def test_noisy_flat_eval_is_within_tolerance() -> None:
    rng = np.random.default_rng(0)
    values = (1.3863 + 0.0005 * rng.standard_normal(40)).tolist()
    assert overfit(make_run(values, eval_every=50), SPEC).verdict is Verdict.PASS


def test_one_bad_last_eval_is_not_a_sustained_rise_unless_the_best_was_early() -> None:
    late = overfit(make_run([1.0, 0.9, 0.8, 0.7, 0.65, 0.62, 0.60, 0.75]), SPEC)
    assert late.verdict is Verdict.PASS, late.message
    early = overfit(make_run([0.5, 0.7, 0.9]), SPEC)
    assert early.verdict is Verdict.WARN and "checkpoint-200" in early.message


def test_nonfinite_evals_are_ignored_here() -> None:
    f = overfit(make_run([0.5, float("nan"), 0.45, 0.44, 0.43]), SPEC)
    assert f.verdict is Verdict.PASS and f.evidence["evals"] == 4
