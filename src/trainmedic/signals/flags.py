"""What a detector says about one point, and the capped event list charts read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Severity = Literal["warn", "fail", "treated"]  # treated: the live watcher handled it


@dataclass(frozen=True)
class Flag:
    """One flagged point of a curve.

    `onset_step` is where the condition began (a divergence is confirmed a few points after it
    starts); it equals `step` for point events such as spikes.
    """

    kind: str  # "spike" | "divergence" | "nonfinite:<series>"
    step: int
    value: float
    threshold: float
    onset_step: int


def event(step: int, label: str, severity: Severity) -> dict[str, Any]:
    """One entry of `evidence["events"]`, the list the HTML report marks on the curves."""
    return {"step": int(step), "label": label, "severity": severity}


def cap_events(events: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most `limit` events, FAIL ones first, returned in step order."""
    if len(events) > limit:
        ranked = sorted(events, key=lambda e: (e["severity"] != "fail", e["step"]))
        events = ranked[:limit]
    return sorted(events, key=lambda e: e["step"])
