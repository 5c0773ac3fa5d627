"""`trainmedic heal` end to end: a round, its table and checks, then `trainmedic check` on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from trainmedic.cli import app

runner = CliRunner()
FAST_FLAGS = ["--lr", "5e-3", "--epochs", "2", "--batch-size", "4", "--min-train", "4", "--max-len", "96"]


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture
def kept(tmp_path: Path, records: Any) -> Path:
    path = tmp_path / "kept.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records(16)), encoding="utf-8")
    return path


def test_heal_trains_prints_the_round_and_check_reads_it(base_dir: Path, tmp_path: Path, kept: Path) -> None:
    out = tmp_path / "round-1"
    args = ["--base", str(base_dir), "--data", str(kept), "--out", str(out), *FAST_FLAGS]
    code, output = invoke("heal", *args)
    assert code == 0, output
    assert "preflight ok" in output  # trained under watch
    for expected in ("step", "nll", "divergence", "grad norm", "heal_nll", "PASS  nll_falls", "PASS  watch"):
        assert expected in output
    assert "divergence kl_rev, lam 1, tau 0.1, 16 example(s), 8 step(s)" in output
    code, output = invoke("check", str(out))
    assert code == 0, output
    assert "watched HF output dir" in output


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--layers", "1:9"], "--layers 1:9 is outside the model"),
        (["--layers", "two"], "--layers must be START:END (two integers)"),
        (["--lam", "0"], "--lam must be a positive number"),
        (["--tau", "-0.5"], "--tau must be a positive number"),
        (["--divergence", "kl"], "--divergence must be one of"),
        (["--watch", "nervous"], "--watch: unknown preset"),
    ],
)
def test_bad_flags_exit_2_with_the_flag_named(
    base_dir: Path, tmp_path: Path, kept: Path, flags: list[str], expected: str
) -> None:
    out = tmp_path / "round"
    code, output = invoke("heal", "--base", str(base_dir), "--data", str(kept), "--out", str(out), *flags)
    assert code == 2, output
    assert expected in output and "Traceback" not in output
    assert not out.exists()


def test_a_malformed_line_exits_2_naming_file_and_line(base_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "filter[v2]").mkdir()
    data = tmp_path / "filter[v2]" / "kept.jsonl"  # brackets must survive the terminal's markup
    data.write_text(json.dumps({"prompt": "p", "completion": "c"}) + '\n{"prompt": "p", "completion": ""}\n')
    code, output = invoke("heal", "--base", str(base_dir), "--data", str(data), "--out", str(tmp_path / "o"))
    assert code == 2
    assert f"{data}:2: empty 'completion'" in output.replace("\n", "")


def test_the_defaults_in_the_help_are_the_round_defaults() -> None:
    import re

    import typer.main

    from trainmedic.heal import RoundConfig

    command = typer.main.get_command(app).commands["heal"]  # type: ignore[attr-defined]
    defaults = RoundConfig()
    checked = 0
    for param in command.params:
        found = re.search(r"\(default ([^)]+)\)", getattr(param, "help", "") or "")
        field = param.name
        if found is None or not hasattr(defaults, field) or getattr(defaults, field) is None:
            continue
        assert float(found.group(1)) == float(getattr(defaults, field)), field
        checked += 1
    assert checked == 8
