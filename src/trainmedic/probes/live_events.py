"""live_events: what trainmedic's live watcher saw and did during the run, read from its run log.

Applies only to a live record (layouts "trainmedic run log", "watched HF output dir" and "watched HF
checkpoint"); any other run is SKIP. The curve probes judge the curves again after the fact; this
one reports the watcher's own detections (`event` records), treatments (`action` records) and ending
(`run_complete`), so `check` shows the same events the watcher raised while training.

Verdict rules, worst first:
- FAIL when a `fail` event got no treatment: no action other than `stop` at its step or within
  `treat_within` steps after it (in-step treatments share the step; a decision taken at the next
  step boundary lands one step later). Trouble nobody treated went into the weights.
- FAIL when the run ended `crashed`, or `stopped` by the watcher (a `stop` action): the run did not
  reach its end because of trouble.
- FAIL when skipped updates exceed `max_skip_fraction` of the logged steps: skipping that much is
  no longer dropping a bad batch, the data or the model is broken.
- WARN for `warn` events, for `fail` events that were treated (the run had trouble; the treatment
  is why it may still be usable), for more skips than `max_skips` (each dropped a batch), for more
  ZClip clips than `max(max_clips, max_clip_fraction x steps)`, for any other treatment (rollback,
  learning-rate cut, batch split: the run needed rescuing), for a run resumed after it crashed or
  stopped, for a run stopped without a watcher `stop` (e.g. by its user), and for a log that has
  no `run_complete` (still running, or the process was killed).
- PASS otherwise. `info` events are counted but change nothing.

`clip` actions are ZClip's adaptive interventions; the user's fixed `max_grad_norm` cap shows per
step in `grad_norm_after_clip` and is not an action.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

from pydantic import Field

from trainmedic.findings import Finding, Verdict
from trainmedic.probes.base import ProbeSpec, register
from trainmedic.record.detect import Layout
from trainmedic.run import Run
from trainmedic.signals.flags import cap_events, event

KIND = "live_events"
NOTHING_RECOGNISED = frozenset({Layout.UNKNOWN.value, Layout.EMPTY.value})
LIVE_LAYOUTS = frozenset(
    {Layout.RUN_LOG.value, Layout.WATCHED_HF_OUTPUT_DIR.value, Layout.WATCHED_HF_CHECKPOINT.value}
)
_RANK = {"info": 0, "warn": 1, "fail": 2}
# (singular, plural) words for the watcher's rule and action names; others are shown as named.
RULE_WORDS = {
    "nonfinite_loss": ("non-finite loss", "non-finite losses"),
    "nonfinite_grad": ("non-finite gradient", "non-finite gradients"),
    "loss_spike": ("loss spike", "loss spikes"),
    "grad_explosion": ("gradient explosion", "gradient explosions"),
    "grad_vanishing": ("vanishing gradient", "vanishing gradients"),
    "divergence": ("divergence", "divergences"),
    "plateau": ("plateau", "plateaus"),
    "not_learning": ("not-learning alarm", "not-learning alarms"),
    "overfit": ("overfitting alarm", "overfitting alarms"),
}
ACTION_WORDS = {
    "clip": ("grad clip", "grad clips"),
    "skip": ("skipped update", "skipped updates"),
    "stop": ("stop by the watcher", "stops by the watcher"),
    "rollback": ("rollback", "rollbacks"),
}
PAST = {"clip": "clipped", "skip": "skipped", "stop": "stopped", "rollback": "rolled back"}
# The treatment an event is credited with when several share its steps: the one that did the most.
STRENGTH = {
    name: rank for rank, name in enumerate(("rollback", "oom_fallback", "skip", "lr_cap", "oom_split"))
}
IN_RUN_ACTIONS = frozenset({"clip", "skip", "stop"})  # the others rescue the run across steps


class LiveEventsSpec(ProbeSpec):
    """Allowances for the watcher's treatments; every fail event must still be treated."""

    treat_within: int = Field(
        2, ge=0, le=10_000, description="steps after a fail event in which a treatment counts as its response"
    )
    max_skips: int = Field(0, ge=0, description="skipped updates before WARN: a clean run skips none")
    max_skip_fraction: float = Field(
        0.05, ge=0, le=1, description="skipped share of the steps that FAILs: broken data, not a glitch"
    )
    max_clips: int = Field(5, ge=0, description="ZClip clips always tolerated (short runs)")
    max_clip_fraction: float = Field(
        0.02,
        ge=0,
        le=1,
        description="clipped share of the steps tolerated: z > 2.5 clips ~0.6% of Gaussian norms, x3",
    )
    warn_unfinished: bool = Field(
        True, description="WARN when the log has no run_complete (running or killed)"
    )
    max_listed: int = Field(20, ge=0, description="events and actions listed in the evidence")
    max_events: int = Field(50, ge=0, description="events kept for the report's chart")


@register(KIND, LiveEventsSpec, needs=("log",), summary="what the live watcher detected and treated")
def live_events(run: Run, spec: LiveEventsSpec) -> Finding:
    if run.layout not in LIVE_LAYOUTS:
        where = "here" if run.layout in NOTHING_RECOGNISED else f"in this {run.layout}"
        return Finding(KIND, KIND, Verdict.SKIP, f"no live record from trainmedic's watcher {where}")
    events = [e for e in run.events if e.get("type", "event") == "event" and _is_step(e.get("step"))]
    endings = [e for e in run.events if e.get("type") == "run_complete"]
    final = next((e for e in reversed(endings) if not e.get("superseded")), None)
    actions = run.actions
    n_steps = len(run.train_loss)
    last_step = int(run.train_loss.steps[-1]) if n_steps else None

    response = _responses(events, actions, spec.treat_within)
    fails: list[str] = []
    warns: list[str] = []
    untreated = [e for e in events if e.get("severity") == "fail" and not _treated(response[id(e)])]
    if untreated:
        fails.append(f"{len(untreated)} fail event(s) untreated")
    if any(e.get("severity") == "fail" and _treated(response[id(e)]) for e in events):
        warns.append("fail events treated")
    if any(e.get("severity") == "warn" for e in events):
        warns.append("warn events")

    counts = Counter(str(a.get("action")) for a in actions)
    _ending_verdict(final, counts, spec, fails, warns)
    if any(e.get("superseded") and e.get("status") != "completed" for e in endings):
        warns.append("resumed after an early end")
    action_text = _action_parts(counts, n_steps, spec, fails, warns)

    verdict = Verdict.FAIL if fails else Verdict.WARN if warns else Verdict.PASS
    parts = _event_parts(events, response) + action_text
    head = ", ".join(parts) if parts else f"no warnings, failures or treatments in {n_steps} step(s)"
    message = f"watcher: {head}; {_ending_text(final, endings, last_step)}"
    charted = _chart_events(events, response)
    evidence = {
        "steps": n_steps,
        "ending": _clean(final),
        "earlier_endings": [_clean(e) for e in endings if e.get("superseded")][: spec.max_listed],
        "counts": {
            "events": dict(Counter(str(e.get("severity")) for e in events)),
            "by_rule": dict(Counter(str(e.get("rule")) for e in events)),
            "actions": dict(counts),
        },
        "reasons": {"fail": fails, "warn": warns},
        "untreated": [_listed(e, None) for e in untreated[: spec.max_listed]],
        "listed_events": [
            _listed(e, response[id(e)])
            for e in sorted(events, key=lambda e: (-_RANK.get(str(e.get("severity")), 1), e["step"]))[
                : spec.max_listed
            ]
        ],
        "listed_actions": [_clean(a) for a in actions[: spec.max_listed]],
        "thresholds": spec.model_dump(exclude={"enabled", "max_listed", "max_events"}),
        "events": cap_events(charted, spec.max_events),
        "events_total": len(charted),
    }
    score = {Verdict.PASS: 1.0, Verdict.WARN: 0.5}.get(verdict, 0.0)
    return Finding(KIND, KIND, verdict, message, score=score, evidence=evidence)


def _responses(
    events: list[dict[str, Any]], actions: list[dict[str, Any]], within: int
) -> dict[int, str | None]:
    """For each event (by id): the nearest action at its step or up to `within` steps after, of
    those in one step the strongest (a rollback over a clip taken with it); a treatment is
    preferred over a `stop` (which ends the run, it does not treat it)."""
    at: dict[int, list[str]] = defaultdict(list)
    for a in actions:
        if _is_step(a.get("step")):
            at[a["step"]].append(str(a.get("action")))
    out: dict[int, str | None] = {}
    for e in events:
        near = [(s - e["step"], n) for s in range(e["step"], e["step"] + within + 1) for n in at.get(s, ())]
        # the nearest treatment, and of those at the same step the strongest
        treatments = sorted((d, STRENGTH.get(n, len(STRENGTH)), n) for d, n in near if n != "stop")
        out[id(e)] = treatments[0][2] if treatments else ("stop" if near else None)
    return out


def _treated(response: str | None) -> bool:
    return response is not None and response != "stop"


def _ending_verdict(
    final: dict[str, Any] | None,
    counts: Counter[str],
    spec: LiveEventsSpec,
    fails: list[str],
    warns: list[str],
) -> None:
    status = None if final is None else final.get("status")
    if status is None and spec.warn_unfinished:
        warns.append("no run_complete record")
    elif status == "crashed":
        fails.append("run crashed")
    elif status == "stopped" and counts.get("stop"):
        fails.append("stopped by the watcher")
    elif status == "stopped":
        warns.append("stopped early")


def _action_parts(
    counts: Counter[str], n_steps: int, spec: LiveEventsSpec, fails: list[str], warns: list[str]
) -> list[str]:
    """Words for the action counts; threshold breaches go to `fails`/`warns`."""
    parts = []
    skips, clips = counts.get("skip", 0), counts.get("clip", 0)
    if clips:
        allowed = max(spec.max_clips, math.floor(spec.max_clip_fraction * n_steps))
        over = clips > allowed
        parts.append(
            _count(clips, "clip", ACTION_WORDS) + (f" (over the {allowed} tolerated)" if over else "")
        )
        if over:
            warns.append("many clips")
    if skips:
        share = skips / n_steps if n_steps else 1.0
        text = _count(skips, "skip", ACTION_WORDS)
        if share > spec.max_skip_fraction:
            fails.append("too many skips")
            text += f" ({share:.0%} of {n_steps} steps, over {spec.max_skip_fraction:.0%})"
        elif skips > spec.max_skips:
            warns.append("skipped updates")
        parts.append(text)
    for name, n in sorted(counts.items()):
        if name in ("clip", "skip"):
            continue
        parts.append(_count(n, name, ACTION_WORDS))
        if name not in IN_RUN_ACTIONS:
            warns.append(f"{name} needed")
    return parts


def _event_parts(events: list[dict[str, Any]], response: dict[int, str | None]) -> list[str]:
    """'1 non-finite loss (step 37, skipped)' per rule, worst rules first; info events summed."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    n_info = 0
    for e in events:
        if e.get("severity") == "info":
            n_info += 1
        else:
            groups[str(e.get("rule"))].append(e)

    def worst_first(item: tuple[str, list[dict[str, Any]]]) -> tuple[int, int]:
        group = item[1]
        return (-max(_RANK.get(str(e.get("severity")), 1) for e in group), min(e["step"] for e in group))

    parts = []
    for rule, group in sorted(groups.items(), key=worst_first):
        first = min(e["step"] for e in group)
        missing = sum(1 for e in group if e.get("severity") == "fail" and response[id(e)] is None)
        done = sorted({PAST.get(r, r) for e in group if (r := response[id(e)])})
        annot = ([f"{missing} untreated" if len(group) > 1 else "untreated"] if missing else []) + done
        where = f"step {first}" if len(group) == 1 else f"first at step {first}"
        parts.append(f"{_count(len(group), rule, RULE_WORDS)} ({', '.join([where, *annot])})")
    if n_info:
        parts.append(f"{n_info} info event{'s' if n_info > 1 else ''}")
    return parts


def _ending_text(final: dict[str, Any] | None, endings: list[dict[str, Any]], last_step: int | None) -> str:
    earlier = [e for e in endings if e.get("superseded")]
    resumed = ""
    if earlier:
        e = earlier[-1]
        resumed = f" (resumed after it {e.get('status')} at step {e.get('step')})"
    if final is None:
        where = f" after step {last_step}" if last_step is not None else ""
        return f"no run_complete record{where}: still running, or the process was killed{resumed}"
    status = final.get("status")
    if status == "completed":
        return f"run completed{resumed}"
    reason = _short(final.get("reason"))
    return f"run {status} at step {final.get('step')}{': ' + reason if reason else ''}{resumed}"


def _chart_events(events: list[dict[str, Any]], response: dict[int, str | None]) -> list[dict[str, Any]]:
    out = []
    for e in events:
        sev = e.get("severity")
        if sev not in ("warn", "fail"):
            continue
        rule = str(e.get("rule"))
        t = response[id(e)]
        label = RULE_WORDS.get(rule, (rule,))[0] + (f" ({PAST.get(t, t)})" if t else "")
        out.append(event(e["step"], f"watcher: {label}", "treated" if _treated(t) else sev))
    return out


def _count(n: int, name: str, words: dict[str, tuple[str, str]]) -> str:
    """'1 loss spike' / '3 loss spikes'; an unknown name is shown as it is logged."""
    default = (
        (f"{name} event", f"{name} events") if words is RULE_WORDS else (f"{name} action", f"{name} actions")
    )
    one, many = words.get(name, default)
    return f"{n} {one if n == 1 else many}"


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _listed(e: dict[str, Any], treatment: str | None) -> dict[str, Any]:
    return {
        "step": e["step"],
        "rule": str(e.get("rule")),
        "severity": str(e.get("severity")),
        "message": _short(e.get("message"), 200),
        "treatment": treatment,
        "evidence": _clean(e.get("evidence")) if isinstance(e.get("evidence"), dict) else None,
    }


def _short(value: Any, limit: int = 120) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clean(obj: Any, depth: int = 0) -> Any:
    """JSON-safe copy of a record: non-finite floats become None, depth and size bounded."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, bool | int):
        return obj
    if isinstance(obj, str):
        return _short(obj, 500)
    if depth >= 4:
        return _short(obj, 200)
    if isinstance(obj, dict):
        return {str(k): _clean(v, depth + 1) for k, v in list(obj.items())[:50]}
    if isinstance(obj, list):
        return [_clean(v, depth + 1) for v in obj[:50]]
    return _short(obj, 200)
