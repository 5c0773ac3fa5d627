from trainmedic.findings import Finding, RunReport, Verdict
from trainmedic.report import markdown


def _reports() -> list[RunReport]:
    failing = RunReport(
        "store/bad",
        "dlm store",
        [
            Finding("training_drift", "training_drift", Verdict.FAIL, "loss | rose 3.0 -> 10.0", 0.05),
            Finding("overfit", "overfit", Verdict.SKIP, "no eval loss"),
        ],
        run_label="run abc",
        notes=["torn | last line"],
    )
    healthy = RunReport(
        "runs/ok", "HF checkpoint", [Finding("nonfinite", "nonfinite", Verdict.PASS, "finite")]
    )
    return [failing, healthy, RunReport("empty", "unknown", [])]


def _table_rows(text: str) -> list[list[str]]:
    """Split GFM table rows on unescaped pipes, the way GitHub does."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells, cell, i = [], "", 1
            while i < len(line):
                if line[i] == "\\" and i + 1 < len(line):
                    cell += line[i : i + 2]
                    i += 2
                    continue
                if line[i] == "|":
                    cells.append(cell.strip())
                    cell = ""
                else:
                    cell += line[i]
                i += 1
            rows.append(cells)
    return rows


def test_summary_and_per_run_tables_keep_their_column_count():
    text = markdown.render(_reports())
    rows = _table_rows(text)
    summary = [r for r in rows if len(r) == 5]
    per_run = [r for r in rows if len(r) == 4]
    assert len(summary) == 4  # header + 3 runs
    assert len(per_run) == 2 + 2 + 1  # two headers + three findings
    assert len(rows) == len(summary) + len(per_run)


def test_pipes_and_markup_in_messages_are_escaped():
    text = markdown.render(_reports())
    assert r"loss \| rose 3.0 -\> 10.0" in text
    assert r"torn \| last line" in text
    assert markdown.escape("<script>*x*</script> a_b [l](u)") == r"\<script\>\*x\*\</script\> a\_b \[l\](u)"
    assert markdown.escape("two\nlines") == "two lines"


def test_verdicts_summary_line_and_nothing_to_check():
    text = markdown.render(_reports(), fail_on="warn")
    assert "3 runs: 1 pass, 1 fail, 1 nothing to check" in text
    assert "gate fails (`--fail-on warn`)" in text
    assert "**fail**" in text and "**pass**" in text and "**skip**" in text
    assert "*nothing to check*" in text
    assert "0.05" in text
    assert text.endswith("\n") and not text.endswith("\n\n")
