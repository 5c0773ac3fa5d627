"""Terminal output: one table per run, or one row per run plus a summary for many.

Data strings go in as `rich.text.Text`, never as markup, so a message holding `[red]` or a
path with brackets prints as written. Colour only adds emphasis: every verdict is also a word,
so CI logs and `no_color` consoles read the same.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from trainmedic.findings import RunReport, Verdict
from trainmedic.gate import fail_threshold, gate_fails
from trainmedic.report.jsonio import summary_line, utf8_safe

STYLES = {
    Verdict.PASS: "green",
    Verdict.WARN: "yellow",
    Verdict.FAIL: "bold red",
    Verdict.ERROR: "bold magenta",
    Verdict.SKIP: "dim",
}
NOTHING = "nothing to check"
_MAX_SOURCES = 4


def verdict_text(verdict: Verdict) -> Text:
    return Text(verdict.value.upper(), style=STYLES[verdict])


def run_verdict_text(report: RunReport) -> Text:
    """The run's worst verdict; a run where nothing applied says so instead of looking clean."""
    if not report.checked_anything:
        return Text(NOTHING, style="dim italic")
    return verdict_text(report.worst)


def _headline(report: RunReport) -> Text:
    style = "dim italic" if not report.checked_anything else STYLES[report.worst]
    return Text(utf8_safe(report.headline()), style=style)


def _findings_table(report: RunReport) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False)
    table.add_column("probe", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for f in report.findings:
        table.add_row(Text(utf8_safe(f.name)), verdict_text(f.verdict), Text(utf8_safe(f.message)))
    return table


def _field(label: str, value: str) -> Text:
    return Text.assemble((f"  {label:<8}", "dim"), utf8_safe(value))


def _relative(source: str, root: str) -> str:
    """A source file named relative to the checked PATH: the PATH is already in the header."""
    prefix = root.rstrip("/") + "/"
    return source[len(prefix) :] if source.startswith(prefix) else source


def _sources(report: RunReport, verbose: bool) -> str:
    names = [_relative(s, report.path) for s in report.sources]
    shown = names if verbose else names[:_MAX_SOURCES]
    more = len(report.sources) - len(shown)
    text = ", ".join(shown) + (f" (+{more} more)" if more else "")
    return f"{len(report.sources)} file(s): {text}" if report.sources else "no files"


def _other_run(other: object) -> str:
    """'run 1 (adapter v0001): 9 points, steps 10-90, final loss 0.5135' from a TrainingRunInfo dict."""
    if not isinstance(other, dict):
        return str(other)
    parts = [f"{other.get('steps', '?')} points"]
    if "first_step" in other and "last_step" in other:
        parts.append(f"steps {other['first_step']}-{other['last_step']}")
    final = other.get("final_loss")
    if isinstance(final, int | float):
        parts.append(f"final loss {final:.4g}")
    return f"{other.get('label', 'run')}: " + ", ".join(parts)


def render_run(report: RunReport, console: Console, *, verbose: bool = False) -> None:
    """One run in full: where, what was judged, the table, the headline and the notes."""
    console.print(Text.assemble(("trainmedic check ", "bold"), (utf8_safe(report.path), "bold cyan")))
    console.print(_field("layout", report.layout or "not recognised"))
    if report.run_label:
        console.print(_field("judged", report.run_label))
    console.print(_field("read", _sources(report, verbose)))
    if report.other_runs:
        console.print(_field("also", f"{len(report.other_runs)} other run(s) here, not judged"))
        if verbose:
            for other in report.other_runs:
                console.print(Text(utf8_safe(f"    - {_other_run(other)}"), style="dim"))
    if report.findings:
        console.print(_findings_table(report))
    else:
        console.print(Text("  no probe produced a result", style="dim"))
    console.print(Text.assemble(("  => ", "bold"), _headline(report)))
    if report.notes:
        console.print(Text("  notes:", style="dim"))
        for note in report.notes:
            console.print(Text(utf8_safe(f"    - {note}")), overflow="fold")


def _overview_table(reports: list[RunReport]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    # Paths read best unbroken and the headline gives way first; on a narrow terminal (80 columns
    # when the output is a file) a long path folds too, so the headline keeps room for its words.
    table.add_column("run", overflow="fold")
    table.add_column("layout")
    table.add_column("verdict", no_wrap=True)
    table.add_column("why", overflow="fold")
    for r in reports:
        table.add_row(Text(utf8_safe(r.path)), Text(utf8_safe(r.layout)), run_verdict_text(r), _why(r))
    return table


def _why(report: RunReport) -> Text:
    """The headline less the verdict the row already shows: the probes that drove it."""
    text = _headline(report)
    head, sep, rest = text.plain.partition(": ")
    if sep and (head == "nothing to check" or head.lower() == report.worst.value):
        text = Text(rest, style=text.style)
    return text


def _gate_line(reports: list[RunReport], fail_on: str) -> Text:
    threshold = fail_threshold(fail_on).value
    if gate_fails(reports, fail_on):
        return Text.assemble(("gate fails", "bold red"), f" (--fail-on {threshold})")
    return Text.assemble(("gate passes", "green"), f" (--fail-on {threshold})")


def render(
    reports: list[RunReport], console: Console, *, fail_on: str = "fail", verbose: bool = False
) -> None:
    """Print the reports; `verbose` adds each run's own table when there are several."""
    fail_threshold(fail_on)
    if not reports:
        console.print(Text("no runs were checked", style="dim"))
        return
    if len(reports) == 1:
        render_run(reports[0], console, verbose=verbose)
    else:
        if verbose:
            for r in reports:
                render_run(r, console, verbose=True)
                console.print()
        console.print(_overview_table(reports))
    console.print(Text.assemble(summary_line(reports, fail_on), " · ", _gate_line(reports, fail_on)))
