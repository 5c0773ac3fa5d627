"""The curve probes on real public training logs give the verdicts a careful reader would."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from trainmedic.findings import Finding, Verdict
from trainmedic.probes.base import REGISTRY, run_probe
from trainmedic.record.hf_log import curves_from_log_history
from trainmedic.run import Run

CURVES = Path(__file__).resolve().parents[2].parent / "shared" / "real_curves"
KINDS = ("training_drift", "nonfinite", "not_learning", "overfit", "memorization")
for _kind in KINDS:  # each module registers its probe on import
    importlib.import_module(f"trainmedic.probes.{_kind}")

pytestmark = pytest.mark.skipif(not CURVES.is_dir(), reason=f"{CURVES} not available")


def load(name: str) -> Run:
    doc = json.loads((CURVES / f"{name}.json").read_text())
    c = curves_from_log_history(doc["log_history"])
    return Run(
        path=CURVES / f"{name}.json",
        layout="test",
        train_loss=c.train_loss,
        grad_norm=c.grad_norm,
        learning_rate=c.learning_rate,
        eval_loss=c.eval_loss,
        extra=c.extra,
        max_steps=doc.get("meta", {}).get("max_steps"),
    )


def judge(name: str) -> dict[str, Finding]:
    run = load(name)
    out = {}
    for kind in KINDS:
        probe = REGISTRY[kind]
        out[kind] = run_probe(probe, run, probe.spec_cls())
    return out


def test_diverged_run_fails_training_drift() -> None:
    f = judge("901")["training_drift"]
    assert f.verdict is Verdict.FAIL and "diverged" in f.message


def test_four_way_task_at_chance_fails_not_learning_naming_ln4() -> None:
    f = judge("055")["not_learning"]
    assert f.verdict is Verdict.FAIL and "ln 4" in f.message


def test_pinned_loss_fails_not_learning() -> None:
    assert judge("011")["not_learning"].verdict is Verdict.FAIL


def test_overfitting_run_warns_naming_the_best_step() -> None:
    f = judge("043")["overfit"]
    assert f.verdict is Verdict.WARN and "checkpoint-200" in f.message


@pytest.mark.parametrize("name", ["015", "070"])
def test_memorised_runs_without_eval_warn(name: str) -> None:
    assert judge(name)["memorization"].verdict is Verdict.WARN


def test_a_run_with_two_isolated_non_finite_grad_norms_names_them_as_scaler_skips() -> None:
    f = judge("012")["nonfinite"]  # a NaN at step 5, an inf at 18, finite loss and finite after
    assert f.verdict is Verdict.WARN and "fp16 loss-scaler skip(s) at step(s) 5, 18" in f.message


@pytest.mark.parametrize("name", ["016", "059", "068", "029", "007", "014", "030", "066"])
def test_healthy_runs_get_no_fail(name: str) -> None:
    bad = {k: f.message for k, f in judge(name).items() if f.verdict in (Verdict.FAIL, Verdict.ERROR)}
    assert not bad


@pytest.mark.parametrize("name", ["005", "031"])
def test_grpo_runs_are_not_failed_for_their_near_zero_loss(name: str) -> None:
    results = judge(name)
    assert all(f.verdict not in (Verdict.FAIL, Verdict.ERROR) for f in results.values())
    assert results["training_drift"].verdict is Verdict.SKIP
    assert results["memorization"].verdict is Verdict.SKIP


def test_every_real_curve_yields_one_line_messages_and_strict_json_evidence() -> None:
    names = sorted(p.stem for p in CURVES.glob("*.json"))
    assert len(names) >= 20
    for name in names:
        for kind, f in judge(name).items():
            assert f.verdict is not Verdict.ERROR, (name, kind, f.message)
            assert f.message and "\n" not in f.message
            json.dumps(f.evidence, allow_nan=False)
