"""training_drift: is the training loss curve healthy?

Verdicts:
- FAIL: the run diverged and is still diverged at its last logged point (the smoothed loss is
  sustained well above its own best, see `signals.trend`), or its last logged loss is
  non-finite, or every logged loss is non-finite.
- WARN: a divergence episode that recovered; spikes above the allowed rate (judged against the
  curve's own noise, see `signals.spikes`); non-finite losses mid-run; or little progress: the
  final level is above `max_convergence_ratio` of the first loss (a plateau). Short fine-tunes
  of a capable model legitimately plateau early, so a high ratio alone never FAILs.
- PASS: none of these.
- SKIP: no or too few loss records, or an RL-style loss that is ~0 by design.

The original metrics (`initial_loss`, `final_loss`, `convergence_ratio`, `smoothness`,
`instability_events`) stay in the evidence, with the verdict their original gate would have
given (`seed_verdict`), but no longer decide: smoothness is ~0 for any healthy curve with a fast
early drop and for per-step logs, and the raw instability count grows with logging frequency.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import Field

from trainmedic.findings import Finding, Verdict
from trainmedic.probes.base import ProbeSpec, register
from trainmedic.run import Run
from trainmedic.signals.downsample import curve_evidence
from trainmedic.signals.flags import Severity, cap_events, event
from trainmedic.signals.nonfinite import forward_fill
from trainmedic.signals.objective import Objective, classify_objective
from trainmedic.signals.plateau import level_points
from trainmedic.signals.robust import median_of, rolling_median, strided_stats
from trainmedic.signals.spikes import SpikeRule, evaluated_points, spike_thresholds_finite
from trainmedic.signals.stability import instability_events, smoothness
from trainmedic.signals.trend import DivergenceRule, divergence_trace

KIND = "training_drift"


class TrainingDriftSpec(ProbeSpec):
    """Thresholds of the loss-curve check; the reasons for the defaults are in `signals`."""

    min_steps: int = Field(10, ge=3, description="fewer logged loss points than this cannot be judged")
    max_convergence_ratio: float = Field(
        0.7, gt=0, description="final level above this fraction of the first loss: plateau (WARN only)"
    )
    spike_k: float = Field(
        6.0, gt=0, description="a spike exceeds the recent level by this many noise sigmas"
    )
    spike_window: int = Field(32, ge=5, description="trailing points the noise sigma is measured over")
    max_spike_rate: float = Field(
        0.02, ge=0, le=1, description="more than 1 spike per 50 judged points is an unstable run"
    )
    min_spikes: int = Field(
        2, ge=1, description="one spike the run recovered from is not instability, whatever the rate"
    )
    smooth_window: int = Field(5, ge=1, description="points in the rolling median that smooths the loss")
    divergence_rise: float = Field(
        0.5, gt=0, description="sustained rise above the best level, as a fraction of it, that is divergence"
    )
    divergence_noise_k: float = Field(
        4.0, ge=0, description="the rise must also exceed this many noise sigmas (noisy per-step logs)"
    )
    divergence_patience: int = Field(3, ge=1, description="consecutive smoothed points above the bar")
    rolling_window: int = Field(10, ge=2, description="original instability count: centred window (evidence)")
    spike_sigma: float = Field(3.0, gt=0, description="original instability count: multiplier (evidence)")
    min_smoothness: float = Field(
        0.7, ge=0, le=1, description="original smoothness bar, used only for evidence['seed_verdict']"
    )
    max_events: int = Field(50, ge=0, description="events kept for the report's chart")
    curve_points: int = Field(512, ge=2, description="points of the downsampled curve in the evidence")


def _num(x: float | None, digits: int = 6) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def _skip(message: str, **evidence: Any) -> Finding:
    return Finding(KIND, KIND, Verdict.SKIP, message, evidence=evidence)


@register(KIND, TrainingDriftSpec, needs=("log",), summary="loss curve: divergence, spikes, progress")
def training_drift(run: Run, spec: TrainingDriftSpec) -> Finding:
    loss = run.train_loss
    n = len(loss)
    if n == 0:
        return _skip("no step records with a training loss")
    if n < spec.min_steps:
        return _skip(f"only {n} logged loss points (min_steps {spec.min_steps})", points=n)
    objective = classify_objective(loss.values, run.extra.keys())
    if objective in (Objective.RL, Objective.NEAR_ZERO):
        return _skip(
            "RL-style objective: the loss is ~0 by design and measures no progress "
            "(not_learning judges the reward)",
            objective=objective.value,
        )
    steps, values = loss.steps, loss.values
    finite = np.isfinite(values)
    n_bad = int(n - finite.sum())
    thresholds = _thresholds(spec)
    if n_bad == n:
        return Finding(
            KIND,
            KIND,
            Verdict.FAIL,
            f"all {n} logged losses are non-finite",
            score=0.0,
            evidence={
                "initial_loss": None,
                "final_loss": None,
                "convergence_ratio": None,
                "smoothness": None,
                "instability_events": n,
                "nonfinite_count": n,
                "thresholds": thresholds,
                "curve": curve_evidence(steps, values, spec.curve_points),
                "events": [event(int(steps[0]), "non-finite loss", "fail")],
            },
        )
    return _judge(run, spec, objective, n_bad, thresholds)


def _thresholds(spec: TrainingDriftSpec) -> dict[str, Any]:
    return spec.model_dump(exclude={"enabled", "max_events", "curve_points"})


def _judge(
    run: Run, spec: TrainingDriftSpec, objective: Objective, n_bad: int, thresholds: dict[str, Any]
) -> Finding:
    steps, values = run.train_loss.steps, run.train_loss.values
    n = values.shape[0]
    finite = np.isfinite(values)
    filled = forward_fill(values)

    # Original metrics, on the forward-filled curve; non-finite points count as events.
    initial, final = float(filled[0]), float(filled[-1])
    ratio = final / initial if initial != 0 else None
    smooth_seed = smoothness(filled)
    seed_events = int(instability_events(filled, spec.rolling_window, spec.spike_sigma).shape[0]) + n_bad
    seed_pass = (
        smooth_seed >= spec.min_smoothness
        and ratio is not None
        and ratio <= spec.max_convergence_ratio
        and seed_events == 0  # the original gate tolerated no event at all
    )

    # Noise-relative judgement on the finite points (the same stream a live watcher sees).
    f_steps, f_values = (steps, values) if n_bad == 0 else (steps[finite], values[finite])
    spike_rule = SpikeRule(k=spec.spike_k, window=spec.spike_window, smooth_window=spec.smooth_window)
    smooth = rolling_median(f_values, spike_rule.smooth_window)
    stats = strided_stats(f_values, spike_rule.window, spike_rule.stride, spike_rule.min_history)
    with np.errstate(invalid="ignore"):
        spikes = f_values > spike_thresholds_finite(f_values, spike_rule, smooth, stats.noise)
    judged = evaluated_points(f_values.shape[0], spike_rule)
    n_spikes = int(spikes.sum())
    spike_rate = n_spikes / judged if judged else 0.0
    rule = DivergenceRule(
        rise=spec.divergence_rise,
        noise_k=spec.divergence_noise_k,
        patience=spec.divergence_patience,
        smooth_window=spec.smooth_window,
        window=spec.spike_window,
        stride=spike_rule.stride,
        min_history=spike_rule.min_history,
    )
    trace = divergence_trace(f_values, rule, smooth, stats)
    episodes = trace.onsets(rule.patience)
    diverged = trace.at_end(rule.patience)
    onset = episodes[-1][0] if diverged else f_values.shape[0] - 1
    best_i = int(np.argmin(trace.smooth[: onset + 1]))  # lowest smoothed point before any final climb
    end_level = median_of(f_values[-level_points(f_values.shape[0]) :])
    start = float(f_values[0])
    progress_ratio = end_level / start if start > 0 else None
    nonfinite_at_end = not bool(finite[-1])

    events = _events(steps, finite, f_steps, spikes, episodes, diverged)
    problems: list[str] = []
    verdict = Verdict.PASS
    if nonfinite_at_end:
        verdict = Verdict.FAIL
        problems.append(f"loss is non-finite at the last logged step {int(steps[-1])}")
    if diverged:
        verdict = Verdict.FAIL
        problems.append(
            f"diverged: smoothed loss rose from {trace.smooth[best_i]:.4g} (step {int(f_steps[best_i])}) "
            f"to {trace.smooth[-1]:.4g} from step {int(f_steps[onset])} and never recovered"
        )
    recovered = len(episodes) - int(diverged)
    warns: list[str] = []
    if recovered > 0:
        warns.append(f"{recovered} divergence episode(s) that recovered")
    # a non-finite step whose update the live watcher skipped left the weights untouched:
    # the nonfinite probe reports it as treated; here it is no sign of drift
    untreated = int((~finite & ~np.isin(steps, run.skipped_steps())).sum())
    if untreated and not nonfinite_at_end:
        warns.append(f"{untreated} non-finite loss value(s) mid-run")
    if spike_rate > spec.max_spike_rate and n_spikes >= spec.min_spikes:
        warns.append(f"spike rate {spike_rate:.1%} above {spec.max_spike_rate:.0%}")
    if progress_ratio is not None and progress_ratio > spec.max_convergence_ratio and not diverged:
        warns.append(
            f"plateau: final level {progress_ratio:.2f} of the first loss (> {spec.max_convergence_ratio})"
        )
    if verdict is Verdict.PASS and warns:
        verdict = Verdict.WARN

    summary = (
        f"loss {start:.4g} -> {end_level:.4g} (ratio {_fmt_ratio(progress_ratio)}), "
        f"smoothness {smooth_seed:.2f}, {spike_rate:.1%} spike rate ({n_spikes} of {judged} points) "
        f"vs {spec.max_spike_rate:.0%} allowed"
    )
    reasons = problems if verdict is Verdict.FAIL else warns
    message = "; ".join([*reasons, summary])
    if run.max_steps and int(steps[-1]) + run.train_loss.interval < run.max_steps:
        message += f" (log ends at step {int(steps[-1])} of {run.max_steps} planned)"
    score = {Verdict.PASS: 1.0, Verdict.WARN: 0.5}.get(verdict, 0.0)
    evidence = {
        "initial_loss": _num(initial),
        "final_loss": _num(final),
        "convergence_ratio": _num(ratio),
        "smoothness": _num(smooth_seed, 4),
        "instability_events": seed_events,
        "seed_verdict": "pass" if seed_pass else "warn",
        "objective": objective.value,
        "end_level": _num(end_level),
        "progress_ratio": _num(progress_ratio, 4),
        "best_loss": _num(float(trace.smooth[best_i])),
        "best_step": int(f_steps[best_i]),
        "spike_count": n_spikes,
        "spike_points_judged": judged,
        "spike_rate": round(spike_rate, 6),
        "divergence_episodes": [
            {"onset_step": int(f_steps[a]), "confirmed_step": int(f_steps[b])} for a, b in episodes[:20]
        ],
        "diverged_at_end": diverged,
        "nonfinite_count": n_bad,
        "nonfinite_at_end": nonfinite_at_end,
        "points": n,
        "thresholds": thresholds,
        "curve": curve_evidence(steps, values, spec.curve_points),
        "events": cap_events(events, spec.max_events),
        "events_total": len(events),
    }
    return Finding(KIND, KIND, verdict, message, score=score, evidence=evidence)


def _fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}"


def _events(
    steps: np.ndarray,
    finite: np.ndarray,
    f_steps: np.ndarray,
    spikes: np.ndarray,
    episodes: list[tuple[int, int]],
    diverged: bool,
) -> list[dict[str, Any]]:
    last = steps.shape[0] - 1
    out = [
        event(int(steps[i]), "non-finite loss", "fail" if i == last else "warn")
        for i in np.nonzero(~finite)[0][-100:]
    ]
    for k, (onset, _confirmed) in enumerate(episodes):
        final = diverged and k == len(episodes) - 1
        sev: Severity = "fail" if final else "warn"
        out.append(event(int(f_steps[onset]), "divergence onset" if final else "divergence (recovered)", sev))
    out.extend(event(int(f_steps[i]), "loss spike", "warn") for i in np.nonzero(spikes)[0][:100])
    return out
