import io

import pytest
from rich.console import Console

from trainmedic.findings import Finding, RunReport, Verdict
from trainmedic.report import terminal


def _console() -> Console:
    return Console(record=True, no_color=True, width=120, file=io.StringIO())


def _failing() -> RunReport:
    return RunReport(
        path="store/bad",
        layout="dlm store",
        findings=[
            Finding("training_drift", "training_drift", Verdict.FAIL, "loss rose 3.0 -> 10.0", 0.0),
            Finding("gradient_ghost", "gradient_ghost", Verdict.WARN, "layer 7 is 4.1x its neighbours", 0.7),
            Finding(
                "adapter_weights", "adapter_weights", Verdict.ERROR, "adapter_model.safetensors: bad header"
            ),
            Finding("overfit", "overfit", Verdict.SKIP, "no eval loss logged"),
            Finding("nonfinite", "nonfinite", Verdict.PASS, "all values finite", 1.0),
        ],
        run_label="run 3f2a (adapter v0002)",
        sources=["store/bad/logs/train-1.jsonl", "store/bad/adapter/versions/v0002/training_state.pt"],
        notes=["logs/train-1.jsonl:41: torn last line (tolerated)"],
        other_runs=[{"run_id": "older"}],
    )


def _healthy(path: str = "runs/ok") -> RunReport:
    return RunReport(path, "HF checkpoint", [Finding("nonfinite", "nonfinite", Verdict.PASS, "all finite")])


def _text(reports: list[RunReport], **kwargs) -> str:
    console = _console()
    terminal.render(reports, console, **kwargs)
    return console.export_text()


def test_single_run_shows_header_table_headline_and_notes():
    out = _text([_failing()])
    for needle in ("store/bad", "dlm store", "run 3f2a (adapter v0002)", "2 file(s)", "1 other run(s)"):
        assert needle in out
    for f in _failing().findings:
        assert f.name in out and f.verdict.value.upper() in out and f.message in out
    assert "ERROR: adapter_weights" in out
    assert "torn last line (tolerated)" in out
    assert "1 run: 1 error" in out and "gate fails (--fail-on fail)" in out


def test_several_runs_give_one_row_each_and_summary_counts():
    reports = [_healthy(f"runs/ok{i}") for i in range(9)]
    reports += [RunReport(f"runs/w{i}", "x", [Finding("p", "p", Verdict.WARN, "meh")]) for i in range(2)]
    reports.append(_failing())
    out = _text(reports)
    assert "12 runs: 9 pass, 2 warn, 1 error" in out
    assert all(f"runs/ok{i}" in out for i in range(9))
    assert "training_drift" not in out  # no per-run tables without verbose
    row = next(line for line in out.splitlines() if "ERROR" in line and "adapter_weights" in line)
    assert "ERROR: " not in row  # the verdict column says ERROR; the why column names the probe


def test_the_overview_fits_80_columns_without_cutting_a_word() -> None:
    reports = [_failing(), _healthy("a/very/long/path/to/some/output-dir-of-a-run/checkpoint-1200")]
    buffer = io.StringIO()
    terminal.render(reports, Console(file=buffer, width=80, color_system=None))
    text = buffer.getvalue()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    assert "adapter_weights" in text and "…" not in text


def test_verbose_adds_each_runs_table():
    out = _text([_healthy(), _failing()], verbose=True)
    assert "layer 7 is 4.1x its neighbours" in out and "all finite" in out
    assert "2 runs: 1 pass, 1 error" in out


def test_nothing_to_check_never_reads_as_pass():
    skipped = RunReport("empty", "unknown", [Finding("drift", "drift", Verdict.SKIP, "no logs")])
    out = _text([skipped, RunReport("bare", "unknown", []), _healthy()])
    assert out.count("nothing to check") >= 3  # two rows plus the summary
    assert "3 runs: 1 pass, 2 nothing to check" in out
    assert "gate fails" in out  # a PATH with nothing to check fails the gate
    single = _text([RunReport("bare", "unknown", [])])
    assert "PASS" not in single and "nothing to check" in single


def test_markup_in_data_prints_literally():
    report = RunReport(
        "runs/[bold]x[/bold]", "x", [Finding("p", "p", Verdict.FAIL, "value [red]9[/red] > [/] limit")]
    )
    out = _text([report])
    assert "runs/[bold]x[/bold]" in out and "value [red]9[/red] > [/] limit" in out


def test_plain_non_terminal_output_has_no_escape_codes():
    buf = io.StringIO()
    console = Console(file=buf, width=100, force_terminal=False)
    terminal.render([_failing(), _healthy()], console, fail_on="warn")
    text = buf.getvalue()
    assert "\x1b[" not in text
    assert "2 runs: 1 pass, 1 error" in text and "--fail-on warn" in text


def test_color_terminal_colours_verdicts():
    buf = io.StringIO()
    console = Console(file=buf, width=120, force_terminal=True, color_system="standard")
    terminal.render([_failing()], console)
    assert "\x1b[" in buf.getvalue()


def test_unknown_fail_on_is_rejected():
    with pytest.raises(ValueError, match="fail_on"):
        _text([_healthy()], fail_on="pass")


def test_undecodable_file_names_do_not_crash_a_utf8_stream(tmp_path):
    report = RunReport("runs/\udcff", "x", [Finding("p", "p", Verdict.PASS, "ok \udc80")], notes=["n \udcfe"])
    with open(tmp_path / "out.txt", "w", encoding="utf-8") as fh:
        terminal.render([report, report], Console(file=fh, width=100), verbose=True)
    text = (tmp_path / "out.txt").read_text(encoding="utf-8")
    assert "runs/\\udcff" in text and "ok \\udc80" in text
