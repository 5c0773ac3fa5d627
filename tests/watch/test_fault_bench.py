"""The fault-injection benchmark's bookkeeping: what it counts and how it rewrites the README."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("torch")

from trainmedic.watch.events import Action, Event


@pytest.fixture(scope="module")
def faults() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "faults.py"
    spec = importlib.util.spec_from_file_location("bench_faults", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_recomputed_steps_add_up_each_rollbacks_distance_to_its_checkpoint(faults: ModuleType) -> None:
    actions = [
        Action(70, "rollback", "diverging", {"to_step": 40}),
        Action(64, "skip", "nan"),
        Action(75, "rollback", "diverging", {"to_step": 60}),
    ]
    assert faults.recomputed_steps(actions) == 30 + 15


def test_detection_latency_counts_from_the_fault_and_ignores_earlier_and_info(faults: ModuleType) -> None:
    events = [Event(50, "loss_spike", "warn", "before"), Event(101, "plateau", "info", "info only")]
    actions = [Action(103, "clip", "zclip")]
    assert faults.detection_latency(events, actions, 100) == 3
    assert faults.detection_latency(events, [], 100) is None


def test_a_stopped_run_or_a_far_loss_misses_the_target(faults: ModuleType) -> None:
    ok = faults.Outcome("watch", "completed", 200, 4.1, 1.0, recomputed=20)
    assert faults.judge(ok, 4.0, 200, 0.05) == (True, [])
    far = faults.Outcome("watch", "completed", 200, 4.4, 1.0, recomputed=21)
    met, why = faults.judge(far, 4.0, 200, 0.05)
    assert not met and len(why) == 2
    stopped = faults.Outcome("watch", "stopped", 90, float("nan"), 1.0, reason="budget")
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
