"""not_learning: did the loss ever really fall, and is it pinned at a chance constant?

- FAIL: the loss sits at a chance constant after warm-up and never fell (ln 2 for DPO or
  binary choice, ln 3, ln 4: a model guessing uniformly), named in the message; or the loss
  never fell by a meaningful fraction of its start beyond its noise (flat from the start).
- WARN: it fell, but by less than the meaningful fraction (barely learning), or by a
  meaningful fraction that is still within the noise.
- PASS: a real, meaningful fall at some point. A run that learned early and then plateaued
  passes here: plateaus and divergence are training_drift's question.
- RL/GRPO logs, whose loss is ~0 by design, are judged on the reward instead (WARN when it
  does not rise, never FAIL), or SKIPped when no reward is logged.

Warm-up is the first `warmup_frac` of the logged points, extended to the end of the LR ramp
when the learning rate shows one. DPO starts at ln 2 by construction, so the chance test only
looks at points after warm-up.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import Field

from trainmedic.findings import Finding, Verdict
from trainmedic.probes.base import ProbeSpec, register
from trainmedic.run import Run
from trainmedic.signals.chance import CHANCE_CONSTANTS, LN2, ChanceConstant, pinned_at_chance
from trainmedic.signals.flags import event
from trainmedic.signals.objective import Objective, classify_objective
from trainmedic.signals.plateau import Progress, progress, warmup_end

KIND = "not_learning"


class NotLearningSpec(ProbeSpec):
    """Thresholds of the learning check."""

    min_points: int = Field(5, ge=3, description="fewer finite loss points than this cannot be judged")
    warmup_frac: float = Field(
        0.1, ge=0, lt=1, description="first fraction of logged points treated as warm-up"
    )
    lr_peak_frac: float = Field(
        0.95, gt=0, le=1, description="LR warm-up ends where the LR first reaches this fraction of its peak"
    )
    min_rel_drop: float = Field(
        0.02, ge=0, description="a fall below 2% of the starting loss is no meaningful learning"
    )
    z: float = Field(3.0, gt=0, description="a fall must exceed this many standard errors of the noise")
    chance_tol: float = Field(
        0.02, gt=0, description="nats from ln k that count as 'at chance' (gap ln 3..ln 4 is 0.29)"
    )


def _finding(verdict: Verdict, message: str, evidence: dict[str, Any]) -> Finding:
    score = {Verdict.PASS: 1.0, Verdict.WARN: 0.5, Verdict.FAIL: 0.0}.get(verdict)
    return Finding(KIND, KIND, verdict, message, score=score, evidence=evidence)


def _levels(p: Progress) -> dict[str, Any]:
    def r(x: float) -> float | None:
        return round(x, 6) if math.isfinite(x) else None

    return {"start": r(p.start), "end": r(p.end), "best": r(p.best), "noise": r(p.noise), "points": p.points}


@register(KIND, NotLearningSpec, needs=("log",), summary="loss never fell, or pinned at a chance constant")
def not_learning(run: Run, spec: NotLearningSpec) -> Finding:
    objective = classify_objective(run.train_loss.values, run.extra.keys())
    if objective in (Objective.RL, Objective.NEAR_ZERO):
        return _judge_reward(run, spec, objective)
    loss = run.train_loss
    finite = np.isfinite(loss.values)
    if int(finite.sum()) < spec.min_points:
        return _finding(
            Verdict.SKIP, f"only {int(finite.sum())} finite loss points (need {spec.min_points})", {}
        )
    steps, values = loss.steps[finite], loss.values[finite]
    w = warmup_end(
        steps, run.learning_rate.steps, run.learning_rate.values, spec.warmup_frac, spec.lr_peak_frac
    )
    p = progress(values)
    if p is None:  # unreachable with min_points >= 3; keeps the type checker honest
        return _finding(Verdict.SKIP, "too few finite loss points", {})
    fell_ever = p.real(p.best_drop, spec.z) and p.meaningful(p.best_drop, spec.min_rel_drop)
    candidates = (LN2,) if objective is Objective.PREFERENCE else CHANCE_CONSTANTS
    warm_step = int(steps[w]) if w < steps.shape[0] else None
    evidence: dict[str, Any] = {
        "objective": objective.value,
        "levels": _levels(p),
        "rel_drop": round(p.rel_drop, 6) if math.isfinite(p.rel_drop) else None,
        "se": round(p.se, 6) if math.isfinite(p.se) else None,
        "warmup_end_step": warm_step,
        "thresholds": spec.model_dump(exclude={"enabled"}),
    }
    chance = None if fell_ever else pinned_at_chance(values[w:], spec.chance_tol, candidates)
    eval_chance, n_eval_post = _eval_at_chance(run, spec, warm_step, candidates)
    const = chance or eval_chance
    if const is not None:
        evidence["chance_constant"] = {"name": const.name, "value": round(const.value, 6)}
        evidence["events"] = [event(warm_step or int(steps[0]), f"at chance ({const.name})", "fail")]
        return _finding(
            Verdict.FAIL, _chance_message(const, chance, eval_chance, n_eval_post, len(values) - w), evidence
        )

    change = f"loss {p.start:.4g} -> {p.end:.4g} ({-p.rel_drop:+.1%}, best {p.best:.4g})"
    bar = f"needs >= {spec.min_rel_drop:.0%} and > {spec.z:g} SE = {spec.z * p.se:.2g}"
    if fell_ever:
        if p.real(p.drop, spec.z) and p.meaningful(p.drop, spec.min_rel_drop):
            return _finding(Verdict.PASS, f"{change}: a real fall ({bar})", evidence)
        return _finding(
            Verdict.PASS, f"{change}: it fell, then rose back (training_drift judges that)", evidence
        )
    real = p.real(p.best_drop, spec.z)
    meaningful = p.meaningful(p.best_drop, spec.min_rel_drop)
    if real:
        return _finding(
            Verdict.WARN, f"barely learning: {change} is beyond noise but small ({bar})", evidence
        )
    if meaningful:
        return _finding(Verdict.WARN, f"{change} is within the noise ({bar})", evidence)
    evidence["events"] = [event(int(steps[0]), "no learning", "fail")]
    what = "never fell, it rose" if p.real(-p.drop, spec.z) else "flat from the start"
    return _finding(Verdict.FAIL, f"{what}: {change} ({bar})", evidence)


def _eval_at_chance(
    run: Run, spec: NotLearningSpec, warm_step: int | None, candidates: tuple[ChanceConstant, ...]
) -> tuple[ChanceConstant | None, int]:
    """The constant the eval loss sits at after warm-up, when it never fell at all."""
    ev = run.eval_loss
    ok = np.isfinite(ev.values)
    steps, values = ev.steps[ok], ev.values[ok]
    if values.shape[0] < 3:
        return None, 0
    post = values[steps >= warm_step] if warm_step is not None else values[:0]
    p = progress(values)
    if p is None or post.shape[0] < 3:
        return None, int(post.shape[0])
    if p.real(p.best_drop, spec.z) and p.meaningful(p.best_drop, spec.min_rel_drop):
        return None, int(post.shape[0])
    return pinned_at_chance(post, spec.chance_tol, candidates), int(post.shape[0])


def _chance_message(
    const: ChanceConstant,
    train: ChanceConstant | None,
    ev: ChanceConstant | None,
    n_eval: int,
    n_train: int,
) -> str:
    if train is not None and ev is not None and train == ev:
        return f"train and eval loss sit at {const.describe()} for {n_eval} evaluations after warm-up"
    if ev is not None:
        return f"eval loss sits at {const.describe()} for {n_eval} evaluations after warm-up"
    return f"train loss sits at {const.describe()} for {n_train} logged points after warm-up"


def _judge_reward(run: Run, spec: NotLearningSpec, objective: Objective) -> Finding:
    """RL logs: the loss is ~0 by design; the reward should rise. Never FAIL on the loss."""
    reward = run.extra.get("reward")
    ok = np.isfinite(reward.values) if reward is not None else np.zeros(0, dtype=bool)
    if reward is None or int(ok.sum()) < spec.min_points:
        return _finding(
            Verdict.SKIP,
            "loss is ~0 by design (RL-style objective) and no usable reward curve is logged",
            {"objective": objective.value},
        )
    r = reward.values[ok]
    p = progress(-r, start_points=None)  # a rising reward is a falling -reward
    if p is None:
        return _finding(Verdict.SKIP, "too few finite reward points", {"objective": objective.value})
    gain = p.drop
    evidence = {
        "objective": objective.value,
        "reward_start": round(-p.start, 6),
        "reward_end": round(-p.end, 6),
        "reward_noise": round(p.noise, 6) if math.isfinite(p.noise) else None,
        "se": round(p.se, 6) if math.isfinite(p.se) else None,
        "thresholds": spec.model_dump(exclude={"enabled"}),
    }
    change = f"reward {-p.start:.3g} -> {-p.end:.3g} over {r.shape[0]} logs"
    if p.real(gain, spec.z):
        return _finding(
            Verdict.PASS,
            f"{change}: a real rise (> {spec.z:g} SE = {spec.z * p.se:.2g}); loss ~0 by design",
            evidence,
        )
    return _finding(
        Verdict.WARN,
        f"no reward gain: {change} (needs > {spec.z:g} SE = {spec.z * p.se:.2g}); "
        "loss ~0 by design, not judged",
        evidence,
    )
