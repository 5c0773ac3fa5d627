"""The CI gate: which verdicts make `check` exit non-zero."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from trainmedic.findings import RunReport, Verdict


class FailOn(StrEnum):
    WARN = "warn"
    FAIL = "fail"
    ERROR = "error"


def gate_fails(reports: Sequence[RunReport], fail_on: FailOn | str, *, allow_empty: bool = False) -> bool:
    """True when any finding reaches `fail_on` (ERROR always does), or a PATH had nothing to check.

    A gate pointed at the wrong directory must not pass quietly, hence the `allow_empty` opt-out.
    """
    threshold = Verdict(str(fail_on)).rank
    for report in reports:
        if any(f.verdict.rank >= threshold or f.verdict is Verdict.ERROR for f in report.findings):
            return True
        if not allow_empty and not report.checked_anything:
            return True
    return False
