"""Splitting step records into training runs, and deduping resumed runs by step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trainmedic.record.jsonlog import Marker, read_logs
from trainmedic.record.segments import dedupe_latest, fill_latest_run, run_label, split_runs
from trainmedic.run import Run


def banner(pos: int, run_id: object = None) -> Marker:
    fields = {} if run_id is None else {"run_id": run_id}
    return Marker(pos, "banner", 0, pos + 1, fields)


def spans(steps: list[int], markers: list[Marker] | None = None) -> list[tuple[int, int]]:
    return [(s.start, s.end) for s in split_runs(np.array(steps, dtype=np.int64), markers or [])]


def test_one_monotonic_run_is_one_segment() -> None:
    assert spans([1, 2, 3, 4]) == [(0, 4)]


def test_restart_without_banner_starts_a_new_run() -> None:
    assert spans([10, 20, 30, 10, 20]) == [(0, 3), (3, 5)]
    assert spans([5, 6, 7, 2, 3]) == [(0, 3), (3, 5)]


def test_resume_inside_the_run_stays_in_the_run() -> None:
    assert spans([1, 2, 3, 4, 5, 3, 4, 5, 6]) == [(0, 9)]


def test_two_banners_make_two_runs() -> None:
    assert spans([10, 20, 30, 40], [banner(0, 1), banner(2, 2)]) == [(0, 2), (2, 4)]


def test_banner_with_the_same_run_id_continues_the_run() -> None:
    assert spans([1, 2, 3, 4], [banner(0, "a"), banner(2, "a")]) == [(0, 4)]


def test_banner_without_run_id_after_steps_starts_a_new_run() -> None:
    assert spans([1, 2, 3, 4], [banner(0), banner(2)]) == [(0, 2), (2, 4)]


def test_banner_of_a_run_with_no_steps_is_its_own_run() -> None:
    segs = split_runs(np.array([1, 2], dtype=np.int64), [banner(0, 1), banner(2, 2)])
    assert [(s.start, s.end, s.run_id) for s in segs] == [(0, 2, 1), (2, 2, 2)]


def test_run_complete_attaches_to_its_run() -> None:
    done = Marker(2, "run_complete", 0, 4, {"adapter_version": 1})
    segs = split_runs(np.array([1, 2, 1, 2], dtype=np.int64), [banner(0, 1), done, banner(2, 2)])
    assert segs[0].complete == {"adapter_version": 1}
    assert segs[1].complete is None


def test_dedupe_latest_wins() -> None:
    s = dedupe_latest(np.array([1, 2, 3, 2, 3, 4]), np.array([1.0, 2.0, 3.0, 20.0, 30.0, 40.0]))
    assert s.steps.tolist() == [1, 2, 3, 4]
    assert s.values.tolist() == [1.0, 20.0, 30.0, 40.0]


def test_dedupe_keeps_monotonic_input_unchanged() -> None:
    s = dedupe_latest(np.array([1, 5, 9]), np.array([3.0, 2.0, 1.0]))
    assert s.steps.tolist() == [1, 5, 9]
    assert s.values.tolist() == [3.0, 2.0, 1.0]


def test_many_restarts_are_fast_and_correct() -> None:
    steps = np.tile(np.arange(1, 11, dtype=np.int64), 20_000)  # 20k runs of 10 steps
    segs = split_runs(steps, [])
    assert len(segs) == 20_000
    assert all(len(s) == 10 for s in segs)


def _write(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_resumed_runs_dedupe_latest_wins(tmp_path: Path) -> None:
    recs = [{"type": "step", "step": i, "loss": float(i)} for i in range(1, 7)]
    recs += [{"type": "step", "step": i, "loss": 100.0 + i} for i in range(4, 9)]  # resumed at step 4
    run = Run(tmp_path, "JSONL log")
    fill_latest_run(run, read_logs([_write(tmp_path / "a.jsonl", recs)]), run_label)
    assert run.train_loss.steps.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert run.train_loss.values.tolist() == [1, 2, 3, 104, 105, 106, 107, 108]
    assert run.other_runs == []


def test_eval_only_record_does_not_hide_the_train_loss_at_that_step(tmp_path: Path) -> None:
    recs = [
        {"type": "step", "step": 1, "loss": 2.0},
        {"type": "step", "step": 2, "loss": 1.0},
        {"type": "step", "step": 2, "eval_loss": 1.5},
    ]
    run = Run(tmp_path, "JSONL log")
    fill_latest_run(run, read_logs([_write(tmp_path / "a.jsonl", recs)]), run_label)
    assert run.train_loss.values.tolist() == [2.0, 1.0]
    assert run.eval_loss.steps.tolist() == [2]


def test_restart_without_banner_judges_the_latest_and_lists_the_first(tmp_path: Path) -> None:
    recs = [{"type": "step", "step": i, "loss": 1.0 / i} for i in range(1, 11)]
    recs += [{"type": "step", "step": i, "loss": float(i)} for i in range(1, 6)]
    a = _write(tmp_path / "a.jsonl", recs)
    run = Run(tmp_path, "JSONL log")
    fill_latest_run(run, read_logs([a]), run_label)
    assert run.label == "run 2"
    assert run.train_loss.values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    (other,) = run.other_runs
    assert (other.label, other.steps, other.first_step, other.last_step) == ("run 1", 10, 1, 10)
    assert other.final_loss == 0.1
    assert other.files == [str(a)]
    assert any("2 training runs" in n for n in run.notes)


def test_two_banners_label_runs_by_run_id(tmp_path: Path) -> None:
    recs: list[dict[str, object]] = [{"type": "banner", "run_id": "alpha"}]
    recs += [{"type": "step", "step": i, "loss": 1.0} for i in range(1, 4)]
    recs += [{"type": "banner", "run_id": "beta", "max_steps": 300}]
    recs += [{"type": "step", "step": i, "loss": 2.0} for i in range(4, 8)]  # no restart: banner alone splits
    recs += [{"type": "run_complete", "run_id": "beta"}]
    run = Run(tmp_path, "JSONL log")
    fill_latest_run(run, read_logs([_write(tmp_path / "a.jsonl", recs)]), run_label)
    assert run.label == "run beta"
    assert run.train_loss.steps.tolist() == [4, 5, 6, 7]
    assert run.completed is True
    assert run.max_steps == 300
    assert [o.label for o in run.other_runs] == ["run alpha"]
