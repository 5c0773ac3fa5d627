"""The CI gate: which verdicts make `check` exit non-zero. Every renderer and the CLI use this."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from trainmedic.findings import RunReport, Verdict


class FailOn(StrEnum):
    WARN = "warn"
    FAIL = "fail"
    ERROR = "error"


FAIL_ON_CHOICES = tuple(v.value for v in FailOn)


def fail_threshold(fail_on: str) -> Verdict:
    """The verdict from which the gate fails; a bad value is a caller error, said plainly."""
    if fail_on not in FAIL_ON_CHOICES:
        raise ValueError(f"fail_on must be one of {', '.join(FAIL_ON_CHOICES)}, not {fail_on!r}")
    return Verdict(fail_on)


def gate_fails(reports: Sequence[RunReport], fail_on: str = "fail") -> bool:
    """True when any run's worst verdict reaches `fail_on`, or a PATH had nothing to check.

    ERROR ranks above FAIL, so an unreadable file fails any gate. A PATH where no probe could
    apply fails too: a gate pointed at the wrong directory must not pass quietly.
    """
    threshold = fail_threshold(str(fail_on)).rank
    return any(r.worst.rank >= threshold or not r.checked_anything for r in reports)
