"""memorization: the train loss went to ~0 and nothing shows whether the model generalises.

Per-token cross-entropy below `floor` = 0.1 nats means perplexity under 1.105: the model gives
about 90% probability to every training token. Natural-language continuations do not allow
that without reproducing the training text, so a tail that low is memorisation unless an eval
set says otherwise. With eval data present the question becomes overfit's (PASS with a note).
Losses that are not per-token likelihoods (RL, DPO) are skipped: the floor means nothing there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from trainmedic.findings import Finding, Verdict
from trainmedic.probes.base import ProbeSpec, register
from trainmedic.run import Run
from trainmedic.signals.flags import event
from trainmedic.signals.objective import Objective, classify_objective
from trainmedic.signals.plateau import level_points
from trainmedic.signals.robust import median_of

KIND = "memorization"


class MemorizationSpec(ProbeSpec):
    """Thresholds of the memorisation check."""

    floor: float = Field(
        0.1, gt=0, description="train loss below this many nats per token (perplexity < 1.105) is ~0"
    )
    tail_frac: float = Field(0.1, gt=0, le=1, description="last fraction of points whose median is judged")
    min_points: int = Field(5, ge=3, description="fewer finite loss points than this cannot be judged")
    negative_tol: float = Field(
        1e-3, ge=0, description="a tail below -tol is a broken loss, not memorisation"
    )


def _skip(message: str, **evidence: Any) -> Finding:
    return Finding(KIND, KIND, Verdict.SKIP, message, evidence=evidence)


@register(KIND, MemorizationSpec, needs=("log",), summary="train loss ~0 with no eval set")
def memorization(run: Run, spec: MemorizationSpec) -> Finding:
    objective = classify_objective(run.train_loss.values, run.extra.keys())
    if objective is Objective.UNKNOWN:
        return _skip("no finite training loss logged", objective=objective.value)
    if objective is not Objective.CROSS_ENTROPY:
        return _skip(
            f"{objective.value} objective: the loss is not a per-token cross-entropy",
            objective=objective.value,
        )
    ok = np.isfinite(run.train_loss.values)
    steps, values = run.train_loss.steps[ok], run.train_loss.values[ok]
    n = values.shape[0]
    if n < spec.min_points:
        return _skip(f"only {n} finite loss points (need {spec.min_points})")
    k = level_points(n, spec.tail_frac)
    tail = values[-k:]
    level = median_of(tail)
    evidence: dict[str, Any] = {
        "tail_level": round(level, 6),
        "tail_points": k,
        "tail_start_step": int(steps[-k]),
        "floor": spec.floor,
        "eval_points": int(np.isfinite(run.eval_loss.values).sum()),
    }
    if float(tail.min()) < -spec.negative_tol or level < 0:
        return _skip(
            "the loss ends at or below 0: a broken loss, not memorisation (nonfinite judges it)", **evidence
        )
    if level >= spec.floor:
        return Finding(
            KIND,
            KIND,
            Verdict.PASS,
            f"train loss ends at {level:.4g} nats/token over the last {k} points, "
            f"above the {spec.floor:g} floor",
            score=1.0,
            evidence=evidence,
        )
    ev_ok = np.isfinite(run.eval_loss.values)
    if ev_ok.any():
        ev_end = float(run.eval_loss.values[ev_ok][-1])
        evidence["eval_end"] = round(ev_end, 6)
        evidence["gap"] = round(ev_end - level, 6)
        return Finding(
            KIND,
            KIND,
            Verdict.PASS,
            f"train loss ends at {level:.4g} nats/token (< {spec.floor:g}), but an eval set exists "
            f"(last eval {ev_end:.4g}, gap {ev_end - level:+.3g}): overfit judges generalisation",
            score=1.0,
            evidence=evidence,
        )
    evidence["events"] = [event(int(steps[-k]), f"train loss < {spec.floor:g}", "warn")]
    return Finding(
        KIND,
        KIND,
        Verdict.WARN,
        f"train loss ends at {level:.4g} nats/token (< {spec.floor:g}, perplexity {np.exp(level):.3f}) "
        f"over the last {k} points, and there is no eval set to tell memorisation from learning",
        score=0.5,
        evidence=evidence,
    )
