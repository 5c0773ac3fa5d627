"""nonfinite: NaN/Inf anywhere FAILs, except the fp16 scaler calibrating; negative CE FAILs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainmedic.findings import Verdict
from trainmedic.probes.nonfinite import NonFiniteSpec, nonfinite
from trainmedic.run import Run, Series

SPEC = NonFiniteSpec()
N = 100
STEPS = np.arange(1, N + 1)


def make_run(
    loss: np.ndarray | None = None,
    grad: np.ndarray | None = None,
    lr: np.ndarray | None = None,
    eval_loss: Series | None = None,
    extra: dict[str, Series] | None = None,
) -> Run:
    loss = np.linspace(2.0, 1.0, N) if loss is None else loss
    return Run(
        path=Path("x"),
        layout="test",
        train_loss=Series.of(STEPS, loss),
        grad_norm=Series.of(STEPS, np.ones(N) if grad is None else grad),
        learning_rate=Series.of(STEPS, np.full(N, 1e-4) if lr is None else lr),
        eval_loss=eval_loss or Series.empty(),
        extra=extra or {},
    )


def test_clean_run_passes_and_counts_what_was_checked() -> None:
    f = nonfinite(make_run(), SPEC)
    assert f.verdict is Verdict.PASS
    assert f.name == f.kind == "nonfinite"
    assert "loss (100)" in f.message and "grad_norm (100)" in f.message


def test_nan_loss_fails_naming_the_first_step_and_count() -> None:
    loss = np.linspace(2.0, 1.0, N)
    loss[[40, 70]] = [np.nan, np.inf]
    f = nonfinite(make_run(loss), SPEC)
    assert f.verdict is Verdict.FAIL
    assert "loss 2 (first at step 41)" in f.message
    assert f.evidence["counts"]["loss"] == 2 and f.evidence["first_step"]["loss"] == 41
    assert [e["step"] for e in f.evidence["events"]] == [41, 71]


def test_nonfinite_grad_norms_that_never_recover_count_though_the_loss_looks_finite() -> None:
    grad = np.ones(N)
    grad[60:] = np.inf  # HF's nan/inf filter hid it from the loss; the weights are gone
    f = nonfinite(make_run(grad=grad), SPEC)
    assert f.verdict is Verdict.FAIL and "grad_norm 40 (first at step 61)" in f.message


def test_an_isolated_fp16_scaler_skip_mid_run_is_named_and_only_warns() -> None:
    grad = np.ones(N)
    grad[32] = np.inf  # one overflow: the scaler skipped the step, the next norms are finite
    f = nonfinite(make_run(grad=grad), SPEC)
    assert f.verdict is Verdict.WARN, f.message
    assert "1 fp16 loss-scaler skip(s) at step(s) 33" in f.message
    assert f.evidence["scaler_skips_excluded"] == [33] and f.evidence["counts"]["grad_norm"] == 0


def test_a_scaler_that_keeps_skipping_fails() -> None:
    grad = np.ones(N)
    grad[10:90:10] = np.nan  # 8 isolated skips in 100 points: more than now and then
    f = nonfinite(make_run(grad=grad), SPEC)
    assert f.verdict is Verdict.FAIL
    assert "grad_norm 8" in f.message and "too many to be occasional fp16 scaler skips" in f.message


def test_a_long_run_of_non_finite_norms_is_no_scaler_skip() -> None:
    grad = np.ones(N)
    grad[40:45] = np.nan  # 5 in a row, then finite: longer than the scaler needs
    assert nonfinite(make_run(grad=grad), SPEC).verdict is Verdict.FAIL


def test_a_non_finite_norm_beside_a_non_finite_loss_is_no_scaler_skip() -> None:
    loss, grad = np.linspace(2.0, 1.0, N), np.ones(N)
    loss[50], grad[50] = np.nan, np.nan
    f = nonfinite(make_run(loss, grad), SPEC)
    assert f.verdict is Verdict.FAIL and f.evidence["counts"]["grad_norm"] == 1


def test_fp16_scaler_calibration_at_the_start_is_excluded_and_said() -> None:
    grad = np.ones(N)
    grad[0] = np.inf
    lr = np.linspace(0.0, 1e-4, N)  # LR still 0 at step 1: the step was skipped
    f = nonfinite(make_run(grad=grad, lr=lr), SPEC)
    assert f.verdict is Verdict.PASS, f.message
    assert "scaler calibration at step(s) [1] excluded" in f.message
    assert f.evidence["scaler_calibration_excluded"] == [1]


def test_same_pattern_with_a_moving_lr_is_no_calibration_but_a_scaler_skip() -> None:
    grad = np.ones(N)
    grad[0] = np.nan
    f = nonfinite(make_run(grad=grad), SPEC)  # LR already 1e-4: not the scaler's calibration
    assert f.evidence["scaler_calibration_excluded"] == []
    assert f.evidence["scaler_skips_excluded"] == [1] and f.verdict is Verdict.WARN
    grad[:5] = np.nan  # five in a row at a moving LR: a real overflow
    assert nonfinite(make_run(grad=grad), SPEC).verdict is Verdict.FAIL


def test_dlm_nan_step_logged_as_zero_loss_with_nan_grad_counts_as_nan_loss() -> None:
    loss = np.linspace(2.0, 1.0, N)
    grad = np.ones(N)
    loss[50], grad[50] = 0.0, np.nan
    f = nonfinite(make_run(loss, grad), SPEC)
    assert f.verdict is Verdict.FAIL
    assert f.evidence["counts"] == {"loss": 1, "grad_norm": 1, "eval_loss": 0}


def test_nonfinite_eval_loss_fails() -> None:
    ev = Series.of([50, 100], [1.2, np.nan])
    f = nonfinite(make_run(eval_loss=ev), SPEC)
    assert f.verdict is Verdict.FAIL and "eval_loss 1 (first at step 100)" in f.message


def test_negative_cross_entropy_is_an_impossible_loss() -> None:
    loss = np.linspace(0.5, -0.01, N)
    f = nonfinite(make_run(loss), SPEC)
    assert f.verdict is Verdict.FAIL
    assert "impossible loss (negative)" in f.message and "loss or label bug" in f.message
    assert f.evidence["negative_loss_count"] > 0
    assert any(e["label"] == "negative loss" for e in f.evidence["events"])


def test_rounding_noise_around_zero_is_not_called_negative() -> None:
    loss = np.r_[np.linspace(0.5, 0.0, 50), np.full(50, -0.0003)]
    assert nonfinite(make_run(loss), SPEC).verdict is Verdict.PASS


def test_rl_loss_may_be_negative() -> None:
    rng = np.random.default_rng(0)
    loss = 0.05 * rng.standard_normal(N)
    reward = {"reward": Series.of(STEPS, rng.random(N))}
    f = nonfinite(make_run(loss, extra=reward), SPEC)
    assert f.verdict is Verdict.PASS, f.message


def test_no_curves_at_all_skips() -> None:
    run = Run(path=Path("x"), layout="test")
    assert nonfinite(run, SPEC).verdict is Verdict.SKIP


def test_nan_steps_skipped_by_the_watcher_are_treated_not_failed() -> None:
    import numpy as np

    from trainmedic.findings import Verdict
    from trainmedic.probes.nonfinite import NonFiniteSpec, nonfinite
    from trainmedic.run import Run, Series

    loss = np.linspace(2.0, 1.0, 40)
    loss[20] = np.nan
    grad = np.full(40, 0.5)
    grad[20] = np.inf
    run = Run(
        path=__import__("pathlib").Path("x"),
        layout="watched HF output dir",
        train_loss=Series.of(np.arange(1, 41), loss),
        grad_norm=Series.of(np.arange(1, 41), grad),
        actions=[{"type": "action", "step": 21, "action": "skip", "reason": "non-finite"}],
    )
    treated = nonfinite(run, NonFiniteSpec())
    assert treated.verdict is Verdict.WARN
    assert "skipped by the watcher" in treated.message
    assert treated.evidence["skipped_by_watcher"] == [21]
    run.actions = []
    assert nonfinite(run, NonFiniteSpec()).verdict is Verdict.FAIL
