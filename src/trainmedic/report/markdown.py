"""GitHub-flavoured Markdown: a summary table, then one table per run (for PR comments, job summaries).

Data strings are backslash-escaped so a `|` cannot split a table cell and `<script>`, `*` or
`[x](y)` in a message render as the characters they are.
"""

from __future__ import annotations

import re

from trainmedic.findings import RunReport, Verdict
from trainmedic.gate import fail_threshold, gate_fails
from trainmedic.report.jsonio import summary_line, utf8_safe

ICONS = {
    Verdict.PASS: "✅",
    Verdict.WARN: "⚠️",
    Verdict.FAIL: "❌",
    Verdict.ERROR: "⛔",
    Verdict.SKIP: "➖",
}
_SPECIAL = re.compile(r"([\\`*_{}\[\]<>|~&])")
_SPACE = re.compile(r"\s+")


def escape(text: object) -> str:
    """One line of literal text, safe inside a table cell."""
    return _SPECIAL.sub(r"\\\1", _SPACE.sub(" ", str(text)).strip())


def verdict_cell(verdict: Verdict) -> str:
    return f"{ICONS[verdict]} **{verdict.value}**"


def run_verdict_cell(report: RunReport) -> str:
    if not report.checked_anything:
        return "➖ *nothing to check*"
    return verdict_cell(report.worst)


def _run_section(report: RunReport, index: int) -> list[str]:
    out = [f"### {index}. {escape(report.path)}", ""]
    meta = [f"layout: {escape(report.layout or 'not recognised')}"]
    if report.run_label:
        meta.append(f"judged: {escape(report.run_label)}")
    if report.sources:
        meta.append(f"{len(report.sources)} file(s) read")
    if report.other_runs:
        meta.append(f"{len(report.other_runs)} other run(s) here, not judged")
    out += [" · ".join(meta), "", f"{run_verdict_cell(report)} · {escape(report.headline())}", ""]
    if report.findings:
        out += ["| probe | verdict | score | reason |", "|---|---|---|---|"]
        for f in report.findings:
            score = "" if f.score is None else f"{f.score:.2f}"
            out.append(f"| {escape(f.name)} | {verdict_cell(f.verdict)} | {score} | {escape(f.message)} |")
        out.append("")
    if report.notes:
        out += ["Notes:", ""] + [f"- {escape(n)}" for n in report.notes] + [""]
    return out


def render(reports: list[RunReport], *, fail_on: str = "fail") -> str:
    """The whole document; ends with a newline."""
    threshold = fail_threshold(fail_on).value
    gate = "fails" if gate_fails(reports, fail_on) else "passes"
    out = [
        "## trainmedic check",
        "",
        f"{summary_line(reports, fail_on)} · gate {gate} (`--fail-on {threshold}`)",
        "",
    ]
    if reports:
        out += ["| # | run | layout | verdict | headline |", "|---|---|---|---|---|"]
        for i, r in enumerate(reports, 1):
            cells = [str(i), escape(r.path), escape(r.layout), run_verdict_cell(r), escape(r.headline())]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    for i, r in enumerate(reports, 1):
        out += _run_section(r, i)
    return utf8_safe("\n".join(out).rstrip("\n") + "\n")
