"""What the watcher saw (events) and what it did (actions): plain records, one shape everywhere."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from trainmedic.findings import finite_or_none

__all__ = ["Action", "Event", "Severity", "StepVitals", "finite_or_none"]

Severity = Literal["info", "warn", "fail"]


@dataclass(frozen=True)
class Event:
    """A detection: which rule fired at which step, how bad, why, and the numbers behind it."""

    step: int
    rule: str  # nonfinite_loss, nonfinite_grad, loss_spike, divergence, grad_explosion, ...
    severity: Severity
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {"type": "event", **asdict(self)}


@dataclass(frozen=True)
class Action:
    """A treatment: clip, skip or stop, with the reason in plain words."""

    step: int
    action: str  # clip | skip | stop
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {"type": "action", **asdict(self)}


@dataclass
class StepVitals:
    """One optimizer step as the watcher measured it."""

    step: int
    loss: float | None
    grad_norm: float | None
    grad_norm_after_clip: float | None
    lr: float | None
    skipped: bool = False
    tokens: int | None = None
    time: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "type": "step",
            "step": self.step,
            "loss": self.loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "grad_norm_after_clip": self.grad_norm_after_clip,
            "skipped": self.skipped,
            "tokens": self.tokens,
            "time": self.time,
        }
        rec.update(self.extra)
        return rec
