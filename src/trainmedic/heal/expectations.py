"""What a heal round promises, checked on its own step table once it has ended.

- the SFT loss falls (the round learned the kept data);
- the divergence is exactly 0 in `nll`/`wd` mode (no barrier ran) and above 0 in a KL mode (the
  reference really is a different model: the original, all adapters off);
- gradient norms stay finite;
- in a KL mode the barrier fired at least once: if D never exceeded tau the round was plain nll
  training under another name, which deserves a warning, not a silent pass.

Pure functions on the round's `StepRow`s (no torch), so they are tested without training anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from trainmedic.findings import Finding, Verdict, finite_or_none
from trainmedic.heal.loss import KL_MODES

TAIL = 5  # heal_nll: the mean SFT loss over the last TAIL steps (the seed's definition)
KIND = "heal"


@dataclass
class StepRow:
    """One optimizer step of a round: the means over its examples, and the watcher's grad norm."""

    step: int
    nll: float
    divergence: float
    loss: float
    grad_norm: float | None
    fired: float  # fraction of the step's examples whose divergence exceeded tau
    examples: int
    seconds: float | None = None


def heal_nll(rows: Sequence[StepRow]) -> float | None:
    """Mean SFT loss over the last TAIL steps, or None when there are none."""
    tail = [r.nll for r in rows[-TAIL:]]
    return sum(tail) / len(tail) if tail else None


def check(rows: Sequence[StepRow], divergence: str, tau: float) -> list[Finding]:
    """Every expectation of a round with these rows (in step order), as findings."""
    found = [_nll_falls(rows), _divergence(rows, divergence), _finite_grads(rows)]
    if divergence in KL_MODES:
        found.append(_barrier_fired(rows, tau))
    return found


def _finding(name: str, verdict: Verdict, message: str, **evidence: object) -> Finding:
    return Finding(name=name, kind=KIND, verdict=verdict, message=message, evidence=dict(evidence))


def _nll_falls(rows: Sequence[StepRow]) -> Finding:
    if len(rows) < 2:
        return _finding("nll_falls", Verdict.SKIP, f"only {len(rows)} step(s): nothing to compare")
    k = min(TAIL, len(rows) // 2)
    first = sum(r.nll for r in rows[:k]) / k
    last = heal_nll(rows)
    assert last is not None
    ev = {"first": finite_or_none(first), "heal_nll": finite_or_none(last), "window": k}
    if math.isfinite(first) and math.isfinite(last) and last < first:
        return _finding(
            "nll_falls", Verdict.PASS, f"nll {first:.4g} (first {k} steps) -> {last:.4g} (last {TAIL})", **ev
        )
    return _finding(
        "nll_falls",
        Verdict.FAIL,
        f"nll did not fall: {first:.4g} over the first {k} steps, {last:.4g} over the last {TAIL}; "
        "the round learned nothing (learning rate too low, too few steps, or lam too high)",
        **ev,
    )


def _divergence(rows: Sequence[StepRow], mode: str) -> Finding:
    values = [r.divergence for r in rows]
    peak = max(values, default=0.0)
    if mode not in KL_MODES:
        if all(v == 0.0 for v in values):
            return _finding("divergence", Verdict.PASS, f"0 at every step, as {mode!r} has no barrier")
        why = f"{mode!r} has no barrier, yet the divergence reached {peak:.4g}"
        return _finding("divergence", Verdict.FAIL, why, peak=finite_or_none(peak))
    if peak > 0 and math.isfinite(peak):
        return _finding(
            "divergence",
            Verdict.PASS,
            f"{mode} to the original rose to {peak:.4g} nats/token (last step {values[-1]:.4g})",
            peak=peak,
            last=finite_or_none(values[-1]),
        )
    return _finding(
        "divergence",
        Verdict.FAIL,
        f"{mode} to the original stayed at {peak:.4g}: the reference pass saw the trained model, so the "
        "adapters were not really switched off (or the round never moved)",
        peak=finite_or_none(peak),
    )


def _finite_grads(rows: Sequence[StepRow]) -> Finding:
    bad = [r.step for r in rows if r.grad_norm is None or not math.isfinite(r.grad_norm)]
    if not rows:
        return _finding("grad_norms_finite", Verdict.SKIP, "no steps ran")
    if not bad:
        top = max(r.grad_norm for r in rows if r.grad_norm is not None)
        return _finding("grad_norms_finite", Verdict.PASS, f"all {len(rows)} finite (largest {top:.4g})")
    shown = ", ".join(str(s) for s in bad[:8]) + (", ..." if len(bad) > 8 else "")
    return _finding(
        "grad_norms_finite",
        Verdict.FAIL,
        f"{len(bad)} of {len(rows)} step(s) without a finite gradient norm (steps {shown})",
        steps=bad[:50],
    )


def _barrier_fired(rows: Sequence[StepRow], tau: float) -> Finding:
    fired = [r.step for r in rows if r.fired > 0]
    peak = max((r.divergence for r in rows), default=0.0)
    if fired:
        share = sum(r.fired for r in rows) / len(rows)
        return _finding(
            "barrier_fired",
            Verdict.PASS,
            f"D > tau={tau:g} on {len(fired)} of {len(rows)} steps ({share:.0%} of examples): "
            "the barrier pulled the round back toward the original",
            steps=len(fired),
            share=share,
        )
    return _finding(
        "barrier_fired",
        Verdict.WARN,
        f"D never exceeded tau={tau:g} (peak {peak:.4g}): the barrier never fired, so this round was "
        "plain nll training; lower tau (or train longer) for the barrier to act",
        peak=finite_or_none(peak),
    )
