"""One self-contained HTML file: verdicts, curves with flagged events, per-layer charts.

Nothing is fetched (no CDN, fonts, scripts or images) so the file opens the same from a CI
artifact, an email or an air-gapped machine. Every string from the data is escaped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from typing import Any

import trainmedic
from trainmedic.findings import Finding, RunReport, Verdict
from trainmedic.gate import fail_threshold, gate_fails
from trainmedic.report import svg
from trainmedic.report.jsonio import summary_line, utf8_safe

SEVERITY_COLORS = {"warn": "#d97706", "fail": "#dc2626", "treated": "#0d9488"}
SEVERITY_WORDS = {"fail": "failure", "warn": "warning", "treated": "treated by the watcher"}
CURVE_COLORS = {
    "train_loss": "#2563eb",
    "eval_loss": "#ea580c",
    "grad_norm": "#7c3aed",
    "learning_rate": "#6b7280",
}
_MAX_EVIDENCE_ITEMS = 6

_CSS = """
:root{--fg:#1f2937;--muted:#6b7280;--line:#e5e7eb;--bg:#fff;--card:#f9fafb}
@media (prefers-color-scheme:dark){:root{--fg:#e5e7eb;--muted:#9ca3af;--line:#374151;
--bg:#111827;--card:#1f2937}}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
background:var(--bg);margin:0 auto;padding:1.5rem;max-width:1000px}
h1{font-size:1.4rem;margin:0 0 .3rem}h2{font-size:1.15rem;margin:0 0 .4rem;word-break:break-all}
.meta{color:var(--muted);margin:.1rem 0}
section.run{background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:1rem 1.2rem;margin:1.2rem 0}
table{border-collapse:collapse;width:100%;margin:.6rem 0}
th,td{text-align:left;padding:.35rem .5rem;border-bottom:1px solid var(--line);vertical-align:top}
th{font-weight:600;color:var(--muted)}
td.msg{word-break:break-word}
.badge{display:inline-block;padding:.05rem .5rem;border-radius:999px;font-size:.8rem;
font-weight:600;color:#fff;white-space:nowrap}
.v-pass{background:#16a34a}.v-warn{background:#d97706}.v-fail{background:#dc2626}
.v-error{background:#9d174d}.v-skip,.v-none{background:#9ca3af}
.headline{font-weight:600;margin:.4rem 0}
.gate-fail{color:#dc2626;font-weight:600}.gate-pass{color:#16a34a;font-weight:600}
svg.chart{display:block;margin:.6rem 0;max-width:100%;height:auto;background:var(--bg);
border:1px solid var(--line);border-radius:6px}
svg .grid{stroke:var(--line)}svg .axis{stroke:var(--muted)}
svg text{fill:var(--muted);font-size:11px}svg .chart-title{fill:var(--fg);font-weight:600;font-size:12px}
svg .series{stroke-width:1.6}
svg .bar{fill:#60a5fa}svg .bar.flagged{fill:#dc2626}
svg .event:hover circle{r:7}
details{margin:.3rem 0}summary{cursor:pointer;color:var(--muted)}
section.preface{border-left:4px solid #2563eb;padding:.2rem 1rem;margin:1rem 0}
caption{text-align:left;color:var(--muted);padding:.2rem 0}
p.legend{color:var(--muted);font-size:.85rem;margin:.1rem 0 .6rem}
.key{margin-right:1rem;white-space:nowrap}
.dot{display:inline-block;width:.7rem;height:.7rem;border-radius:50%;margin-right:.3rem;vertical-align:-1px}
dl.ev{display:grid;grid-template-columns:max-content auto;gap:.1rem .8rem;margin:.3rem 0;
font-size:.85rem}dl.ev dt{color:var(--muted)}dl.ev dd{margin:0;word-break:break-all}
ul{margin:.3rem 0;padding-left:1.3rem}
"""


@dataclass
class Preface:
    """What a page of runs is about, told before the verdicts (the demo's story: what was done to
    the runs and how they compare). Plain strings: everything is escaped when rendered."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    table_headers: list[str] = field(default_factory=list)
    table_rows: list[list[str]] = field(default_factory=list)
    table_caption: str = ""


def _preface(p: Preface) -> str:
    out = [f'<section class="preface"><h2>{_e(p.title)}</h2>']
    out.extend(f"<p>{_e(text)}</p>" for text in p.paragraphs)
    if p.items:
        out.append("<ul>" + "".join(f"<li>{_e(i)}</li>" for i in p.items) + "</ul>")
    if p.table_headers:
        head = "".join(f"<th>{_e(h)}</th>" for h in p.table_headers)
        rows = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in p.table_rows)
        caption = f"<caption>{_e(p.table_caption)}</caption>" if p.table_caption else ""
        out.append(f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    out.append("</section>")
    return "".join(out)


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _badge(report_or_verdict: RunReport | Verdict) -> str:
    if isinstance(report_or_verdict, RunReport):
        if not report_or_verdict.checked_anything:
            return '<span class="badge v-none">nothing to check</span>'
        verdict = report_or_verdict.worst
    else:
        verdict = report_or_verdict
    return f'<span class="badge v-{verdict.value}">{verdict.value}</span>'


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "null" if v is None else str(v).lower()
    if isinstance(v, int | float):
        return svg.value_label(v)
    return str(v)


def _evidence_rows(evidence: dict[str, Any]) -> list[tuple[str, str]]:
    """A short, readable digest of evidence: scalars and small lists; big items summarised."""
    rows = []
    for key, v in evidence.items():
        if key in ("events", "per_layer"):
            continue
        if isinstance(v, list):
            small = len(v) <= _MAX_EVIDENCE_ITEMS and all(not isinstance(x, list | dict) for x in v)
            text = "[" + ", ".join(_fmt(x) for x in v) + "]" if small else f"{len(v)} values"
        elif isinstance(v, dict):
            flat = all(not isinstance(x, list | dict) for x in v.values())
            if flat and len(v) <= _MAX_EVIDENCE_ITEMS:
                text = ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
            else:
                text = f"{len(v)} entries"
        else:
            text = _fmt(v)
        rows.append((str(key), text))
    return rows


def _finding_row(f: Finding) -> str:
    score = "" if f.score is None else f"{f.score:.2f}"
    rows = _evidence_rows(f.evidence)
    ev = ""
    if rows:
        items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows)
        ev = f'<details><summary>evidence</summary><dl class="ev">{items}</dl></details>'
    return (
        f"<tr><td>{_e(f.name)}</td><td>{_badge(f.verdict)}</td><td>{score}</td>"
        f'<td class="msg">{_e(f.message)}{ev}</td></tr>'
    )


def _events(report: RunReport) -> list[svg.Marker]:
    markers = []
    for f in report.findings:
        events = f.evidence.get("events")
        if not isinstance(events, list):
            continue
        for ev in events:
            if not isinstance(ev, dict):
                continue
            step = ev.get("step")
            if isinstance(step, bool) or not isinstance(step, int | float):
                continue
            sev = ev.get("severity")
            severity = sev if isinstance(sev, str) and sev in SEVERITY_COLORS else "warn"
            label = ev.get("label", "")
            markers.append(
                svg.Marker(
                    step=step,
                    tooltip=f"{f.name}: {label} (step {svg.value_label(step)}, {SEVERITY_WORDS[severity]})",
                    color=SEVERITY_COLORS[severity],
                    css_class=f"event ev-{severity}",
                )
            )
    return markers


def _not_shown(report: RunReport) -> list[str]:
    """Per probe, how many of its flagged events the report does not list (a probe keeps at most
    `max_events`, failures first)."""
    out = []
    for f in report.findings:
        events, total = f.evidence.get("events"), f.evidence.get("events_total")
        if isinstance(events, list) and isinstance(total, int) and total > len(events):
            out.append(
                f"{f.name}: {total - len(events)} more not shown ({len(events)} of {total}, failures first)"
            )
    return out


def _step_range(report: RunReport, markers: list[svg.Marker]) -> tuple[float, float] | None:
    """One step axis for every curve chart of a run, so charts line up and compare at a glance."""
    steps: list[float] = [float(m.step) for m in markers]
    for name in CURVE_COLORS:
        curve = report.curves.get(name)
        if isinstance(curve, dict) and isinstance(curve.get("steps"), list):
            found = [
                float(s) for s in curve["steps"] if isinstance(s, int | float) and not isinstance(s, bool)
            ]
            steps.extend(x for x in found if math.isfinite(x))
    return (min(steps), max(steps)) if steps else None


def _legend(markers: list[svg.Marker]) -> str:
    """What the marker colours mean, for the severities this run's charts show."""
    shown = [sev for sev in SEVERITY_COLORS if any(m.css_class == f"event ev-{sev}" for m in markers)]
    if not shown:
        return ""
    items = "".join(
        f'<span class="key"><span class="dot" style="background:{SEVERITY_COLORS[sev]}"></span>'
        f"{_e(SEVERITY_WORDS[sev])}</span>"
        for sev in shown
    )
    return f'<p class="legend">marked events: {items}</p>'


def _line(report: RunReport, name: str, label: str, dots: bool = False) -> svg.Line | None:
    curve = report.curves.get(name)
    if not isinstance(curve, dict):
        return None
    steps, values = curve.get("steps"), curve.get("values")
    if not isinstance(steps, list) or not isinstance(values, list) or not steps:
        return None
    return svg.Line(label, steps, values, CURVE_COLORS[name], dots=dots)


def _charts(report: RunReport) -> str:
    markers = _events(report)
    loss_lines = [
        ln
        for ln in (
            _line(report, "train_loss", "train loss"),
            _line(report, "eval_loss", "eval loss", dots=True),
        )
        if ln is not None
    ]
    parts = []
    x_range = _step_range(report, markers)
    if loss_lines or markers:
        title = "loss" + (f" · {len(markers)} flagged event(s)" if markers else "")
        parts.append(
            svg.line_chart(loss_lines, title=title, markers=markers, css_class="loss", x_range=x_range)
        )
        parts.append(_legend(markers))
    for name, label in (("grad_norm", "grad norm"), ("learning_rate", "learning rate")):
        ln = _line(report, name, label)
        if ln is not None:
            parts.append(
                svg.line_chart(
                    [ln], title=label, height=170, css_class=name.replace("_", "-"), x_range=x_range
                )
            )
    for f in report.findings:
        parts.append(_per_layer_chart(f))
    return "".join(p for p in parts if p)


def _per_layer_chart(f: Finding) -> str:
    pl = f.evidence.get("per_layer")
    if not isinstance(pl, dict):
        return ""
    layers, values = pl.get("layers"), pl.get("values")
    if not isinstance(layers, list) or not isinstance(values, list) or not layers:
        return ""
    raw = pl.get("flagged")
    flagged = {x for x in raw if isinstance(x, int | float | str)} if isinstance(raw, list) else set()
    highlight = [
        i for i, layer in enumerate(layers) if isinstance(layer, int | float | str) and layer in flagged
    ]
    metric = pl.get("metric", "value")
    title = f"{f.name}: {metric} per layer" + (f" · {len(highlight)} flagged" if highlight else "")
    return svg.bar_chart([str(x) for x in layers], values, title=title, highlight=highlight)


def _event_list(markers: list[svg.Marker], not_shown: list[str]) -> str:
    if not markers:
        return ""
    items = "".join(f"<li>{_e(m.tooltip)}</li>" for m in markers)
    more = "".join(f"<li>{_e(n)}</li>" for n in not_shown)
    cut = f" (and more: {len(not_shown)} probe(s) list only some)" if not_shown else ""
    return f"<details><summary>{len(markers)} flagged event(s){cut}</summary><ul>{items}{more}</ul></details>"


def _run_section(report: RunReport, index: int) -> str:
    meta = [f"layout: {_e(report.layout or 'unknown')}"]
    if report.run_label:
        meta.append(f"judged: {_e(report.run_label)}")
    if report.duration_s:
        meta.append(f"checked in {report.duration_s:.2f} s")
    out = [
        f'<section class="run" id="run-{index}">',
        f"<h2>{_e(report.path)}</h2>",
        f'<p class="meta">{" · ".join(meta)}</p>',
        f'<p class="headline">{_badge(report)} {_e(report.headline())}</p>',
    ]
    if report.findings:
        rows = "".join(_finding_row(f) for f in report.findings)
        out.append(
            "<table><thead><tr><th>probe</th><th>verdict</th><th>score</th><th>reason</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
    out.append(_charts(report))
    out.append(_event_list(_events(report), _not_shown(report)))
    if report.notes:
        out.append("<h3>Notes</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in report.notes) + "</ul>")
    if report.other_runs:
        items = "".join(f"<li>{_e(_describe(r))}</li>" for r in report.other_runs)
        out.append(f"<details><summary>{len(report.other_runs)} other run(s) here, not judged</summary>")
        out.append(f"<ul>{items}</ul></details>")
    if report.sources:
        items = "".join(f"<li>{_e(s)}</li>" for s in report.sources)
        out.append(
            f"<details><summary>{len(report.sources)} file(s) read</summary><ul>{items}</ul></details>"
        )
    out.append("</section>")
    return "".join(out)


def _describe(other: Any) -> str:
    if isinstance(other, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in other.items())
    return str(other)


def _summary_table(reports: list[RunReport]) -> str:
    rows = "".join(
        f'<tr><td><a href="#run-{i}">{_e(r.path)}</a></td><td>{_e(r.layout)}</td>'
        f"<td>{_badge(r)}</td><td>{_e(r.headline())}</td></tr>"
        for i, r in enumerate(reports, 1)
    )
    return (
        "<table><thead><tr><th>run</th><th>layout</th><th>verdict</th><th>headline</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def render(
    reports: list[RunReport],
    *,
    fail_on: str = "fail",
    generated_at: str | None = None,
    preface: Preface | None = None,
) -> str:
    """The complete HTML document; `preface` is told first (what the runs are and how they differ)."""
    threshold = fail_threshold(fail_on)
    failing = gate_fails(reports, fail_on)
    when = generated_at or datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    gate = (
        f'<span class="gate-fail">gate fails</span> (--fail-on {threshold.value})'
        if failing
        else f'<span class="gate-pass">gate passes</span> (--fail-on {threshold.value})'
    )
    body = [
        "<h1>trainmedic check</h1>",
        f'<p class="meta">{_e(summary_line(reports, fail_on))} · {gate}</p>',
        f'<p class="meta">trainmedic {_e(trainmedic.__version__)} · {_e(when)}</p>',
    ]
    if preface is not None:
        body.append(_preface(preface))
    if len(reports) > 1:
        body.append(_summary_table(reports))
    body.extend(_run_section(r, i) for i, r in enumerate(reports, 1))
    if not reports:
        body.append('<p class="meta">no runs were checked</p>')
    return utf8_safe(  # undecodable file names would otherwise stop the file being written
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>trainmedic report</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
