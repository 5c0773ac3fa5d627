"""nonfinite: NaN/Inf in the loss, gradient norm or eval loss, and impossible negative losses.

Hugging Face's default `logging_nan_inf_filter` logs a NaN step loss as the running average, so
a broken run often shows only a non-finite `grad_norm`: that counts. dlm logs a NaN step as loss
0.0 beside a NaN grad norm; that pair counts as a non-finite loss. Two patterns are excluded, and
the message says so: the fp16 loss scaler calibrating at the start, and its occasional skips
later (an isolated non-finite grad norm with a finite loss, finite again after; see
`signals.nonfinite`). A scaler that skips on and on is not excused.

A live watcher that skipped a step's update because its loss or gradient was non-finite left the
weights untouched: such values are reported as treated and give WARN, not FAIL (the run log's
`action` records say which steps were skipped).

A negative loss on a likelihood objective (cross-entropy, DPO) is FAIL: -log p >= 0 for every
probability, so a value below -`negative_tol` (beyond 4-decimal rounding and low-precision
noise) cannot come from a correct loss. The optimiser was minimising something else (masking,
label or loss-function bug), so neither the curve nor the resulting model can be trusted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from trainmedic.findings import Finding, Verdict
from trainmedic.probes.base import ProbeSpec, register
from trainmedic.record.hf_log import hidden_nan_losses
from trainmedic.run import Run
from trainmedic.signals.flags import cap_events, event
from trainmedic.signals.nonfinite import ScalerRule, ScalerSkipRule, scaler_calibration_mask, scaler_skip_mask
from trainmedic.signals.objective import classify_objective, is_likelihood

KIND = "nonfinite"


class NonFiniteSpec(ProbeSpec):
    """Thresholds of the non-finite check."""

    scaler_max_points: int = Field(
        3, ge=0, description="leading non-finite grad norms at LR 0 forgiven as fp16 scaler calibration"
    )
    negative_tol: float = Field(
        1e-3, ge=0, description="a likelihood loss below -tol is impossible (beyond rounding noise)"
    )
    scaler_skip_run: int = Field(
        3, ge=0, description="mid-run non-finite grad norms in a row still read as fp16 scaler skips"
    )
    scaler_skip_share: float = Field(
        0.02, ge=0, le=1, description="share of grad-norm points that may be scaler skips (at least 3)"
    )
    max_events: int = Field(50, ge=0, description="events kept for the report's chart")


def _listed(steps: list[int], most: int = 8) -> str:
    shown = ", ".join(str(s) for s in steps[:most])
    return shown + (f" and {len(steps) - most} more" if len(steps) > most else "")


def _first(steps: np.ndarray, mask: np.ndarray) -> int | None:
    idx = np.nonzero(mask)[0]
    return int(steps[idx[0]]) if idx.shape[0] else None


@register(KIND, NonFiniteSpec, needs=("log",), summary="NaN/Inf in loss, grad norm, eval loss; negative loss")
def nonfinite(run: Run, spec: NonFiniteSpec) -> Finding:
    loss, grad, ev = run.train_loss, run.grad_norm, run.eval_loss
    if not (len(loss) or len(grad) or len(ev)):
        return Finding(KIND, KIND, Verdict.SKIP, "no loss, grad norm or eval loss logged")
    bad_loss = ~np.isfinite(loss.values)
    bad_loss |= hidden_nan_losses(loss, grad)  # a NaN logged as 0.0 (dlm, the HF NaN filter)
    true_loss = np.where(bad_loss, np.nan, loss.values)
    bad_grad = ~np.isfinite(grad.values)
    excused = scaler_calibration_mask(
        grad.steps,
        grad.values,
        run.learning_rate.steps,
        run.learning_rate.values,
        ScalerRule(spec.scaler_max_points),
    )
    bad_grad &= ~excused
    skips, occasional = scaler_skip_mask(
        grad.steps,
        grad.values,
        loss.steps,
        true_loss,
        ScalerSkipRule(spec.scaler_skip_run, spec.scaler_skip_share),
    )
    skipped = run.skipped_steps()
    skips &= bad_grad & ~np.isin(grad.steps, skipped)
    bad_grad &= ~skips
    bad_eval = ~np.isfinite(ev.values)
    treated_loss = bad_loss & np.isin(loss.steps, skipped)
    treated_grad = bad_grad & np.isin(grad.steps, skipped)
    bad_loss &= ~treated_loss
    bad_grad &= ~treated_grad
    n_treated = int(np.union1d(loss.steps[treated_loss], grad.steps[treated_grad]).shape[0])
    objective = classify_objective(loss.values, run.extra.keys())
    negative = np.zeros(len(loss), dtype=bool)
    if is_likelihood(objective):
        with np.errstate(invalid="ignore"):
            negative = loss.values < -spec.negative_tol

    counts = {
        "loss": int(bad_loss.sum()),
        "grad_norm": int(bad_grad.sum()),
        "eval_loss": int(bad_eval.sum()),
    }
    firsts = {
        "loss": _first(loss.steps, bad_loss),
        "grad_norm": _first(grad.steps, bad_grad),
        "eval_loss": _first(ev.steps, bad_eval),
    }
    events: list[dict[str, Any]] = []
    for name, series, mask in (
        ("loss", loss, bad_loss),
        ("grad_norm", grad, bad_grad),
        ("eval_loss", ev, bad_eval),
    ):
        events.extend(event(int(s), f"non-finite {name}", "fail") for s in series.steps[mask][:100])
    events.extend(event(int(s), "negative loss", "fail") for s in loss.steps[negative][:20])
    treated_steps = np.union1d(loss.steps[treated_loss], grad.steps[treated_grad])
    events.extend(event(int(s), "non-finite, update skipped", "treated") for s in treated_steps[:100])

    excused_steps = [int(s) for s in grad.steps[excused]]
    skip_steps = [int(s) for s in grad.steps[skips]]
    note = f"; fp16 loss-scaler calibration at step(s) {excused_steps} excluded" if excused_steps else ""
    if skip_steps:
        note += (
            f"; {len(skip_steps)} fp16 loss-scaler skip(s) at step(s) {_listed(skip_steps)} "
            "(finite loss, finite again after: the scaler lowered its scale, by design)"
        )
    if not occasional:
        note += "; the non-finite grad norms are too many to be occasional fp16 scaler skips"
    parts = [f"{name} {counts[name]} (first at step {firsts[name]})" for name in counts if counts[name]]
    verdict = Verdict.PASS
    problems = []
    if parts:
        verdict = Verdict.FAIL
        problems.append("non-finite values: " + ", ".join(parts))
    n_neg = int(negative.sum())
    if n_neg:
        verdict = Verdict.FAIL
        lowest = float(np.nanmin(loss.values[negative]))
        problems.append(
            f"impossible loss (negative): {n_neg} value(s) below -{spec.negative_tol:g}, min {lowest:.4g}, "
            f"first at step {_first(loss.steps, negative)}: loss or label bug"
        )
    treated_note = ""
    if n_treated:
        first = int(treated_steps[0])
        treated_note = (
            f"; {n_treated} non-finite step(s) (first {first}) had their update skipped by the watcher"
        )
    if verdict is Verdict.PASS and (n_treated or skip_steps):
        verdict = Verdict.WARN  # handled (by the watcher, or by the fp16 scaler): worth a look
        message = f"no untreated NaN/Inf{treated_note}{note}"
    elif verdict is Verdict.PASS:
        message = (
            f"no NaN/Inf in loss ({len(loss)}), grad_norm ({len(grad)}) or eval_loss ({len(ev)}) values{note}"
        )
    else:
        message = "; ".join(problems) + treated_note + note
    evidence = {
        "counts": counts,
        "first_step": firsts,
        "points": {"loss": len(loss), "grad_norm": len(grad), "eval_loss": len(ev)},
        "negative_loss_count": n_neg,
        "objective": objective.value,
        "scaler_calibration_excluded": excused_steps,
        "scaler_skips_excluded": skip_steps[:100],
        "skipped_by_watcher": [int(x) for x in treated_steps[:100]],
        "thresholds": spec.model_dump(exclude={"enabled", "max_events"}),
        "events": cap_events(events, spec.max_events),
        "events_total": len(events),
    }
    score = {Verdict.PASS: 1.0, Verdict.WARN: 0.5}.get(verdict, 0.0)
    return Finding(KIND, KIND, verdict, message, score=score, evidence=evidence)
