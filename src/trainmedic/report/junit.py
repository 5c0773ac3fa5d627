"""JUnit XML: one test suite per run, one test case per probe, for CI test-report views.

FAIL is a `<failure>`, ERROR an `<error>`, SKIP `<skipped>`; WARN fails only under
`--fail-on warn`, otherwise it passes with its message in `<system-out>`. A run where nothing
applied gets one skipped case saying so, so it can't show up as an empty green suite.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

from trainmedic.findings import Finding, RunReport, Verdict
from trainmedic.gate import fail_threshold

# Characters XML 1.0 cannot hold at all, even escaped; ElementTree would write them regardless.
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _x(text: object) -> str:
    return _INVALID_XML.sub("\ufffd", str(text))


def _seconds(value: float) -> str:
    return f"{value:.6f}" if math.isfinite(value) else "0"


def _outcome(f: Finding, warn_fails: bool) -> str:
    """'failure', 'error', 'skipped' or 'passed'."""
    if f.verdict is Verdict.FAIL or (f.verdict is Verdict.WARN and warn_fails):
        return "failure"
    return {Verdict.ERROR: "error", Verdict.SKIP: "skipped"}.get(f.verdict, "passed")


def _case(parent: ET.Element, f: Finding, classname: str, warn_fails: bool) -> str:
    case = ET.SubElement(
        parent, "testcase", classname=_x(classname), name=_x(f.name), time=_seconds(f.duration_s)
    )
    outcome = _outcome(f, warn_fails)
    detail = f"{f.verdict.value.upper()}: {f.message}" + (
        "" if f.score is None else f" (score {f.score:.2f})"
    )
    if outcome == "passed":
        ET.SubElement(case, "system-out").text = _x(detail)
    else:
        node = ET.SubElement(case, outcome, message=_x(f.message))
        if outcome != "skipped":
            node.set("type", f.verdict.value)
        node.text = _x(detail)
    return outcome


def _suite(parent: ET.Element, report: RunReport, warn_fails: bool) -> dict[str, int]:
    suite = ET.SubElement(parent, "testsuite", name=_x(report.path))
    props = ET.SubElement(suite, "properties")
    for key, value in (
        ("layout", report.layout),
        ("run_label", report.run_label),
        ("headline", report.headline()),
    ):
        ET.SubElement(props, "property", name=key, value=_x(value))
    classname = report.layout or report.run_label or "run"
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    findings = report.findings
    if not findings:
        findings = [Finding("nothing to check", "none", Verdict.SKIP, report.headline())]
    for f in findings:
        outcome = _case(suite, f, classname, warn_fails)
        counts["tests"] += 1
        counted = {"failure": "failures", "error": "errors", "skipped": "skipped"}.get(outcome)
        if counted:
            counts[counted] += 1
    for key, n in counts.items():
        suite.set(key, str(n))
    suite.set("time", _seconds(report.duration_s))
    if report.notes:
        ET.SubElement(suite, "system-out").text = _x("\n".join(f"note: {n}" for n in report.notes))
    return counts


def render(reports: list[RunReport], *, fail_on: str = "fail") -> str:
    """The XML document as text (UTF-8 declared)."""
    warn_fails = fail_threshold(fail_on) is Verdict.WARN
    root = ET.Element("testsuites", name="trainmedic check")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for report in reports:
        for key, n in _suite(root, report, warn_fails).items():
            totals[key] += n
    for key, n in totals.items():
        root.set(key, str(n))
    root.set("time", _seconds(sum(r.duration_s for r in reports)))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
