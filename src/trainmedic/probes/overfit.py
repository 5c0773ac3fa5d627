"""overfit: the eval loss turned up while the train loss kept falling.

WARN when the eval loss ends well above its best (by more than `min_rel_rise` of the best and
`z` standard errors of the eval curve's own noise) and either kept rising for at least
`min_evals_after_best` evaluations after the best or the best came in the first `far_frac` of
the evaluations. The message names the best step, i.e. the checkpoint to keep. SKIP with fewer
than `min_evals` eval points.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import Field

from trainmedic.findings import Finding, Verdict
from trainmedic.probes.base import ProbeSpec, register
from trainmedic.run import Run
from trainmedic.signals.flags import event
from trainmedic.signals.plateau import level_points
from trainmedic.signals.robust import median_of, noise_sigma

KIND = "overfit"
# Eval losses are logged to 4 decimals by HF; no rise below that is measurable.
_RESOLUTION = 1e-4


class OverfitSpec(ProbeSpec):
    """Thresholds of the overfitting check."""

    min_evals: int = Field(3, ge=3, description="fewer eval points than this cannot show a turn")
    min_evals_after_best: int = Field(
        3, ge=1, description="evaluations after the best that show a sustained rise, not one bad eval"
    )
    min_rel_rise: float = Field(
        0.02, ge=0, description="a rise below 2% of the best eval loss is not worth a warning"
    )
    z: float = Field(3.0, gt=0, description="the rise must exceed this many noise sigmas of the eval curve")
    far_frac: float = Field(
        0.5, gt=0, le=1, description="a best eval in the first half of the evaluations is far before the end"
    )


@register(KIND, OverfitSpec, needs=("log",), summary="eval loss rising while train loss falls")
def overfit(run: Run, spec: OverfitSpec) -> Finding:
    ev = run.eval_loss
    ok = np.isfinite(ev.values)
    steps, values = ev.steps[ok], ev.values[ok]
    n = values.shape[0]
    if n < spec.min_evals:
        return Finding(
            KIND, KIND, Verdict.SKIP, f"only {n} finite eval loss point(s) (need {spec.min_evals})"
        )
    b = int(np.argmin(values))
    best, best_step = float(values[b]), int(steps[b])
    after = n - 1 - b
    tail = values[b + 1 :][-min(3, after) :] if after else values[-1:]
    end = median_of(tail)
    rise = end - best
    noise = noise_sigma(values)
    noise = max(noise if math.isfinite(noise) else 0.0, _RESOLUTION)
    tol = max(spec.min_rel_rise * abs(best), spec.z * noise)
    sustained = after >= spec.min_evals_after_best
    early = b < spec.far_frac * (n - 1)
    train_best, train_end = _train_levels(run, best_step)
    evidence: dict[str, Any] = {
        "best_step": best_step,
        "best_eval_loss": round(best, 6),
        "final_eval_loss": round(float(values[-1]), 6),
        "end_level": round(end, 6),
        "rise": round(rise, 6),
        "tolerance": round(tol, 6),
        "evals": n,
        "evals_after_best": after,
        "train_at_best": None if train_best is None else round(train_best, 6),
        "train_end": None if train_end is None else round(train_end, 6),
        "thresholds": spec.model_dump(exclude={"enabled"}),
    }
    if rise > tol and (sustained or early):
        train = ""
        if train_best is not None and train_end is not None:
            verb = "fell" if train_end < train_best else "also rose"
            train = f" while train loss {verb} {train_best:.3g} -> {train_end:.3g}"
        evidence["events"] = [event(best_step, f"best eval {best:.4g} (checkpoint-{best_step})", "warn")]
        return Finding(
            KIND,
            KIND,
            Verdict.WARN,
            f"eval loss rose {best:.4g} -> {end:.4g} over {after} evaluations after its best at step "
            f"{best_step}{train} (tolerance {tol:.2g}); keep checkpoint-{best_step}",
            score=max(0.0, 1.0 - rise / (rise + abs(best))) if best else 0.5,
            evidence=evidence,
        )
    where = "the last evaluation" if after == 0 else f"step {best_step}, {after} evaluation(s) before the end"
    return Finding(
        KIND,
        KIND,
        Verdict.PASS,
        f"eval loss best {best:.4g} at {where}; end level {end:.4g} is within {tol:.2g} of it "
        f"({n} evaluations)",
        score=1.0,
        evidence=evidence,
    )


def _train_levels(run: Run, best_step: int) -> tuple[float | None, float | None]:
    """Train loss level around the best eval step and at the end (medians of a few points)."""
    ok = np.isfinite(run.train_loss.values)
    steps, values = run.train_loss.steps[ok], run.train_loss.values[ok]
    if values.shape[0] < 2:
        return None, None
    k = level_points(values.shape[0])
    i = int(np.searchsorted(steps, best_step, side="right"))
    around = values[max(0, i - k) : i] if i else values[:1]
    return median_of(around), median_of(values[-k:])
