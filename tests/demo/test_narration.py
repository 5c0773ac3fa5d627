"""The demo's narration and fault plan, without training: what a reader of the terminal sees."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

from rich.console import Console

from trainmedic.demo.faults import FaultPlan
from trainmedic.demo.progress import Narrator
from trainmedic.watcher.events import Action, Event


def _narrator(tmp_path: Path) -> tuple[Narrator, SimpleNamespace, io.StringIO]:
    buffer = io.StringIO()
    vitals = SimpleNamespace(events=[], actions=[])
    narrator = Narrator(Console(file=buffer, width=120, color_system=None)).follow(vitals, tmp_path)
    return narrator, vitals, buffer


def _lines(buffer: io.StringIO) -> list[str]:
    return [" ".join(line.split()) for line in buffer.getvalue().splitlines() if line.strip()]


def test_each_new_record_is_told_once_with_its_step_and_kind(tmp_path: Path) -> None:
    narrator, vitals, buffer = _narrator(tmp_path)
    vitals.events.append(Event(7, "loss_spike", "warn", "severe loss spike at step 7"))
    narrator.echo("[trainmedic] step 7: WARN severe loss spike at step 7")
    vitals.actions.append(Action(7, "clip", "ZClip: rescaled"))
    vitals.actions.append(Action(7, "skip", "loss spike beyond 12 sigma"))
    narrator.echo("[trainmedic] step 7: update skipped: loss spike beyond 12 sigma")
    narrator.echo("[trainmedic] preflight ok: 2 batch(es)")
    assert _lines(buffer) == [
        "step 7 detected severe loss spike at step 7",
        "step 7 treated update skipped: loss spike beyond 12 sigma",
        "watcher preflight ok: 2 batch(es)",
    ]


def test_the_watchers_start_and_end_lines_are_left_to_the_demo(tmp_path: Path) -> None:
    narrator, _, buffer = _narrator(tmp_path)
    narrator.echo("[trainmedic] watching out: run log out/logs/train-tm1-20260101T000000.jsonl")
    narrator.echo("[trainmedic] completed after 9 steps (reached the end): 0 event(s); run log out/x.jsonl")
    narrator.echo("[trainmedic] completed after 9 steps, a note that names no log")
    assert _lines(buffer) == ["watcher completed after 9 steps, a note that names no log"]


def test_a_certified_checkpoint_is_announced_once_at_the_step_it_was_certified(tmp_path: Path) -> None:
    narrator, _, buffer = _narrator(tmp_path)
    ckpt = tmp_path / "checkpoint-20"
    ckpt.mkdir()
    (ckpt / "trainmedic-certified.json").write_text(
        json.dumps({"clean_window": [21, 30], "certified_at_step": 30})
    )
    (tmp_path / "checkpoint-40").mkdir()
    (tmp_path / "checkpoint-40" / "trainmedic-certified.json").write_text("{torn")
    args = SimpleNamespace(output_dir=str(tmp_path))
    narrator.on_step_end(args, None, None)
    narrator.fault(31, "a poisoned batch")
    assert _lines(buffer) == [
        "step 30 watcher checkpoint-20 certified: steps 21-30 after it ran clean",
        "step 31 fault a poisoned batch",
    ]


def test_faults_land_after_the_warm_up_and_the_burst_after_a_certified_checkpoint() -> None:
    plan = FaultPlan.for_steps(100, save_steps=20, certify_after=10)
    assert 25 < plan.nan_step < plan.lr_jump_step < plan.poison_start
    checkpoint = (plan.poison_start - 1 - 10) // 20 * 20
    assert checkpoint > plan.lr_jump_step and plan.poison_start > checkpoint + 10
    assert plan.poison_start + plan.poison_batches <= 100
    with pytest.raises(ValueError, match="at least 60 steps"):
        FaultPlan.for_steps(40, save_steps=20, certify_after=10)
