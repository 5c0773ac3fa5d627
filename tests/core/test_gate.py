"""The gate behind `check`'s exit code."""

from __future__ import annotations

import pytest

from trainmedic.findings import Finding, RunReport, Verdict
from trainmedic.gate import gate_fails


def _run(*verdicts: Verdict) -> RunReport:
    return RunReport("p", "x", [Finding(f"p{i}", "k", v, "m") for i, v in enumerate(verdicts)])


@pytest.mark.parametrize(
    ("verdicts", "fail_on", "fails"),
    [
        ((Verdict.PASS, Verdict.WARN), "fail", False),
        ((Verdict.PASS, Verdict.WARN), "warn", True),
        ((Verdict.FAIL,), "fail", True),
        ((Verdict.FAIL,), "error", False),
        ((Verdict.ERROR,), "error", True),
        ((Verdict.PASS, Verdict.SKIP), "warn", False),
    ],
)
def test_gate_follows_fail_on(verdicts: tuple[Verdict, ...], fail_on: str, fails: bool) -> None:
    assert gate_fails([_run(*verdicts)], fail_on) is fails


def test_a_path_with_nothing_to_check_fails_the_gate() -> None:
    assert gate_fails([_run(Verdict.PASS), _run(Verdict.SKIP, Verdict.SKIP)], "error")
    assert gate_fails([RunReport("empty", "empty", [])], "fail")
