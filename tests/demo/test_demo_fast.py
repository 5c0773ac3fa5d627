"""The `--fast` demo end to end: real training, real faults, real `check` verdicts and report."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from rich.console import Console
from typer.testing import CliRunner

from trainmedic.cli import app
from trainmedic.demo import DemoResult, run_demo
from trainmedic.demo.faults import FaultPlan
from trainmedic.demo.runner import FAST_STEPS
from trainmedic.demo.runs import CERTIFY_AFTER, SAVE_STEPS
from trainmedic.findings import Verdict
from trainmedic.gate import gate_fails

PLAN = FaultPlan.for_steps(FAST_STEPS, SAVE_STEPS, CERTIFY_AFTER)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, str]:
    out = tmp_path_factory.mktemp("demo") / "demo-out"
    buffer = io.StringIO()
    result = run_demo(out, fast=True, console=Console(file=buffer, width=160, color_system=None))
    return result, buffer.getvalue()


def _lines_at(text: str, step: int) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines() if re.match(rf"\s*step\s+{step}\s", line)]


@pytest.mark.slow
def test_watched_run_passes_check_and_the_unwatched_one_fails_with_its_reason(
    demo: tuple[DemoResult, str],
) -> None:
    result, _ = demo
    watched, unwatched = result.reports["watched"], result.reports["unwatched"]
    assert result.ok
    assert not gate_fails([watched]), watched.headline()
    assert watched.layout == "watched HF output dir"
    live = next(f for f in watched.findings if f.name == "live_events")
    assert live.verdict in (Verdict.PASS, Verdict.WARN), live.message
    assert "rollback" in live.message and "run completed" in live.message

    assert gate_fails([unwatched])
    nonfinite = next(f for f in unwatched.findings if f.name == "nonfinite")
    assert nonfinite.verdict is Verdict.FAIL
    assert f"first at step {PLAN.nan_step}" in nonfinite.message
    weights = next(f for f in unwatched.findings if f.name == "adapter_weights")
    assert weights.verdict is Verdict.FAIL and "non-finite" in weights.message


@pytest.mark.slow
def test_each_fault_is_narrated_with_its_detection_and_treatment_in_order(
    demo: tuple[DemoResult, str],
) -> None:
    _, text = demo
    nan = _lines_at(text, PLAN.nan_step)
    tags = [line.split()[2] for line in nan]
    assert tags[:1] == ["fault"] and "detected" in tags and "treated" in tags, nan
    assert any("update skipped" in line for line in nan)
    jump = _lines_at(text, PLAN.lr_jump_step)
    assert any("learning rate brought back" in line for line in jump), jump
    assert "rolled back" in text and "certified" in text
    assert "completed 100 steps without a warning" in text  # what the plain Trainer had to say


@pytest.mark.slow
def test_heal_rounds_are_compared_and_checked(demo: tuple[DemoResult, str]) -> None:
    result, text = demo
    for name in ("heal nll", "heal kl_rev"):
        report = result.reports[name]
        assert report.layout == "watched HF output dir", report.layout
        assert not gate_fails([report]), report.headline()
    flat = " ".join(text.split())
    assert re.search(r"kl_rev \d+ steps in [0-9.]+ s, nll [0-9.]+ -> [0-9.]+, barrier pulled back on", flat)
    kl = re.search(r"KL to the original on prompts \(lower: stayed close\) - ([0-9.]+) ([0-9.]+)", flat)
    assert kl is not None, flat
    nll_round, kl_round = float(kl.group(1)), float(kl.group(2))
    assert 0 < kl_round < nll_round  # the anchor held the round closer to the original


@pytest.mark.slow
def test_report_is_written_names_both_runs_and_the_cli_agrees(demo: tuple[DemoResult, str]) -> None:
    result, text = demo
    page = result.report_html.read_text(encoding="utf-8")
    for run in ("watched-run", "unwatched-run", "heal-kl_rev", "heal-nll"):
        assert run in page
    assert "<svg" in page
    assert str(result.report_html) in " ".join(text.split())
    # the story comes first: what was injected, how each run ended, the heal comparison
    story = page[page.index('<section class="preface">') : page.index('<section class="run"')]
    for line in PLAN.describe():
        assert f"fault at {line}" in story
    assert "Watched: completed after" in story and "Unwatched: completed" in story
    assert "kl_rev round" in story and "KL to the original on prompts" in story
    runner = CliRunner()
    assert runner.invoke(app, ["check", str(result.out / "watched-run")]).exit_code == 0
    failed = runner.invoke(app, ["check", str(result.out / "unwatched-run")])
    assert failed.exit_code == 1 and "nonfinite" in failed.output


@pytest.mark.slow
def test_every_checkpoint_of_the_watched_run_gets_the_output_dirs_gate_result(
    demo: tuple[DemoResult, str],
) -> None:
    from trainmedic.check import check_paths
    from trainmedic.spec import default_spec

    result, _ = demo
    run = result.out / "watched-run"
    treated_at = PLAN.nan_step
    after = sorted(
        (p for p in run.glob("checkpoint-*") if int(p.name.rsplit("-", 1)[1]) >= treated_at),
        key=lambda p: int(p.name.rsplit("-", 1)[1]),
    )
    assert after, list(run.iterdir())
    whole, *ckpts = check_paths([run, *after], default_spec())
    assert not gate_fails([whole])
    for ckpt, report in zip(after, ckpts, strict=True):
        assert report.layout == "watched HF checkpoint", (ckpt, report.layout)
        assert not gate_fails([report]), (ckpt.name, report.headline())


def test_demo_refuses_a_directory_holding_someone_elses_files(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("mine")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--fast"])
    assert result.exit_code == 2
    assert "thesis.tex" in result.output
    assert (tmp_path / "thesis.tex").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]
