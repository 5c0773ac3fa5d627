"""The fault-injection benchmark: its bookkeeping, how it rewrites the README, and scenarios 8
(SIGKILL mid-save, then resume in a fresh process) and 9 (two ranks, NaN on one) run for real on
a short run."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from trainmedic.watcher.events import Action, Event  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def faults() -> ModuleType:
    # the bench's modules import each other by name, as they do when run as scripts from bench/
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_faults", BENCH / "faults.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.fixture(scope="module")
def setup(faults: ModuleType) -> ModuleType:
    return sys.modules["fault_setup"]  # imported by faults.py: the setup and bookkeeping it shares


@pytest.fixture(scope="module")
def shared(faults: ModuleType, setup: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The base and the data, built once here, so the worker processes only load them."""
    from trainmedic.toy.base import load_base, toy_base

    torch.set_num_threads(1)
    base = toy_base()
    data = setup.save_data(*setup.load_data(load_base(base)[1]), tmp_path_factory.mktemp("faults") / "data")
    return lambda steps: faults.fault_procs.Shared(base, data, steps)


def test_recomputed_steps_add_up_each_rollbacks_distance_to_its_checkpoint(setup: ModuleType) -> None:
    actions = [
        Action(70, "rollback", "diverging", {"to_step": 40}),
        Action(64, "skip", "nan"),
        Action(75, "rollback", "diverging", {"to_step": 60}),
    ]
    assert setup.recomputed_steps(actions) == 30 + 15


def test_detection_latency_counts_from_the_fault_and_ignores_earlier_and_info(setup: ModuleType) -> None:
    events = [Event(50, "loss_spike", "warn", "before"), Event(101, "plateau", "info", "info only")]
    actions = [Action(103, "clip", "zclip")]
    assert setup.detection_latency(events, actions, 100) == 3
    assert setup.detection_latency(events, [], 100) is None


def test_a_stopped_run_or_a_far_loss_misses_the_target(faults: ModuleType, setup: ModuleType) -> None:
    ok = setup.Outcome("watch", "completed", 200, 4.1, 1.0, recomputed=20)
    assert faults.judge(ok, 4.0, 200, 0.05) == (True, [])
    far = setup.Outcome("watch", "completed", 200, 4.4, 1.0, recomputed=21)
    met, why = faults.judge(far, 4.0, 200, 0.05)
    assert not met and len(why) == 2
    stopped = setup.Outcome("watch", "stopped", 90, float("nan"), 1.0, reason="budget")
    met, why = faults.judge(stopped, 4.0, 200, 0.10)
    assert not met and "stopped at step 90" in why[0] and "no finite eval loss" in why[1]


def test_the_readme_table_is_replaced_between_its_markers_and_nothing_else(
    faults: ModuleType, tmp_path: Path
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nother section\n")
    faults.write_readme("| first |\n", readme)
    faults.write_readme("| second |\n", readme)
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nother section\n")
    assert text.count(faults.HEADING) == 1 and "| second |" in text and "| first |" not in text


def test_the_kill_lands_mid_run_in_a_save_with_a_certifiable_checkpoint_before_it(faults: ModuleType) -> None:
    procs = faults.fault_procs
    assert procs.kill_step(200) == 100
    assert procs.kill_step(60) == 40  # checkpoint-20 certifies at step 30, before the kill
    assert procs.kill_step(40) is None  # no save after a certifiable one: the row says "not run"
    outcome = procs.kill_in_save("watch", procs.Shared(Path("unused"), Path("unused"), 40))
    assert outcome.ended == "not run" and "more than 40 steps" in outcome.ending()


def test_interventions_are_counted_over_every_process_in_the_run_log(
    faults: ModuleType, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    first = [{"type": "banner"}, {"type": "action", "step": 5, "action": "clip"}, {"type": "step", "step": 6}]
    second = [
        {"type": "action", "step": 9, "action": "clip"},
        {"type": "action", "step": 9, "action": "skip"},
    ]
    killed = "".join(json.dumps(r) + "\n" for r in first) + '{"type": "action", "st'  # torn by the kill
    (logs / "train-a-1.jsonl").write_text(killed)
    (logs / "train-a-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in second))
    assert faults.fault_procs.logged_interventions(tmp_path) == Counter({"clip": 2, "skip": 1})


def test_a_worker_outcome_survives_strict_json_with_a_nan_eval_loss(setup: ModuleType) -> None:
    outcome = setup.Outcome("plain", "completed", 40, math.nan, 1.5, interventions=Counter(skip=1))
    text = json.dumps(outcome.to_json(), allow_nan=False)
    back = setup.Outcome.from_json(json.loads(text))
    assert math.isnan(back.eval_loss) and back.interventions == Counter(skip=1) and back.steps == 40


def test_process_rows_show_resume_recompute_and_why_latency_does_not_apply(
    faults: ModuleType, setup: ModuleType
) -> None:
    clean = faults.SCENARIOS[0]
    eight = next(s for s in faults.SCENARIOS if s.number == 8)
    ok = setup.Outcome("plain", "completed", 200, 4.0, 1.0)
    torn = "checkpoint-100 as the kill left it: incomplete: no trainer_state.json"
    plain = setup.Outcome("plain", "crashed", 0, None, 1.0, 100, "FileNotFoundError: x", notes=[torn])
    plain.finished = "killed in the save of step 100; ... (the torn one): crashed (FileNotFoundError)"
    watched = setup.Outcome("watch", "completed", 200, 4.02, 1.0, 100, started_at=80, recomputed=20)
    watched.latency_note, watched.notes = "n/a (process death)", [torn]
    table = faults.render([(clean, ok, ok), (eight, plain, watched)], 200, 1, 1.0)
    rows = [line for line in table.splitlines() if line.startswith("| 8 |") or "n/a (process death)" in line]
    assert "(the torn one): crashed (FileNotFoundError) | — | — |" in rows[0]
    assert "| 20 (10.0%) | none | n/a (process death) |" in rows[1] and rows[1].endswith("| met |")
    assert table.count(torn) == 1  # the same evidence from both runs is said once


@pytest.mark.slow
def test_sigkill_mid_save_plain_resume_takes_the_torn_checkpoint_watch_a_certified_one(
    faults: ModuleType, shared: Any
) -> None:
    # 50 steps: the kill lands in the save of step 40. The watcher also saves every 5 steps
    # (checkpoint_every=5): checkpoint-25 was certified after steps 26-35, checkpoint-30 not yet
    plain = faults.fault_procs.kill_in_save("plain", shared(50))
    assert "killed in the save of step 40" in plain.ending()
    assert "went on from checkpoint-40 (the torn one)" in plain.ending(), plain
    assert any("checkpoint-40 as the kill left it: incomplete" in n for n in plain.notes)
    watched = faults.fault_procs.kill_in_save("watch", shared(50))
    assert watched.ended == "completed" and watched.steps == 50, watched
    assert watched.started_at == 25 and watched.recomputed == 15
    assert "`trainmedic resume` went on from checkpoint-25: completed (50)" in watched.ending()
    assert watched.eval_loss is not None and math.isfinite(watched.eval_loss)


@pytest.mark.slow
def test_nan_on_rank_1_plain_poisons_both_ranks_and_watch_skips_it_on_both(
    faults: ModuleType, shared: Any
) -> None:
    plain = faults.fault_procs.nan_on_rank_1("plain", shared(40))
    assert plain.ending() == "completed (40) on both ranks", plain
    assert plain.eval_loss is not None and math.isnan(plain.eval_loss)  # the NaN reached rank 0 too
    watched = faults.fault_procs.nan_on_rank_1("watch", shared(40))
    assert watched.ending() == "completed (40) on both ranks", watched
    assert watched.interventions["skip"] == 1 and watched.latency == 0 and watched.fault_step == 20
    assert watched.eval_loss is not None and math.isfinite(watched.eval_loss)
    (note,) = watched.notes
    assert "torchrun exit 0" in note and "the same actions (skip at step 20)" in note and "identical" in note
