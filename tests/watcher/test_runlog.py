"""The live watcher's run log: what it writes, how it survives crashes, how `check` reads it back."""

from __future__ import annotations

import json
import math
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from trainmedic.record.load import load_run
from trainmedic.watcher import runlog
from trainmedic.watcher.runlog import RunLog, encode


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[datetime]:
    """Pins the time a log is opened at (it names the file): tests set `clock[0]`."""
    now = [datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)]
    monkeypatch.setattr(runlog, "_now", lambda: now[0])
    return now


def _loss(step: int) -> float:
    return 2.0 * math.exp(-step / 20) + 0.5


def _write_run(out: Path, run_id: str = "r1", steps: range = range(1, 61), nan_at: int = 37) -> Path:
    with RunLog.open(out, run_id=run_id, config={"lr": 2e-4}, versions={"torch": "x"}, max_steps=60) as log:
        for s in steps:
            bad = s == nan_at
            log.step(
                s,
                loss=math.nan if bad else _loss(s),
                lr=2e-4,
                grad_norm=math.inf if bad else 0.5,
                grad_norm_after_clip=0.5,
                skipped=bad,
                tokens=128,
                time=0.03,
                epoch=s / 60,
            )
            if bad:
                log.event(s, "nonfinite_loss", "fail", "loss is NaN", {"loss": math.nan})
                log.action(s, "skip", "non-finite loss", {"grad_norm": math.inf})
            if s % 20 == 0:
                log.eval(s, {"eval_loss": 1.0 + s / 1000, "eval_runtime": 0.5})
        log.run_complete(steps[-1], "completed", "reached max_steps", len(steps))
        return log.path


def test_records_round_trip_through_check(tmp_path: Path) -> None:
    path = _write_run(tmp_path)
    assert path.parent == tmp_path / "logs"
    assert path.name.startswith("train-r1-") and path.suffix == ".jsonl"
    run = load_run(tmp_path)
    assert run.layout == "watched HF output dir"
    assert run.train_loss.steps.tolist() == list(range(1, 61))
    assert math.isnan(run.train_loss.values[36])
    assert run.train_loss.values[0] == pytest.approx(_loss(1))
    assert math.isinf(run.grad_norm.values[36])
    assert run.learning_rate.values.tolist() == [2e-4] * 60
    assert run.eval_loss.steps.tolist() == [20, 40, 60]
    assert run.eval_loss.values.tolist() == pytest.approx([1.02, 1.04, 1.06])
    detections = [e for e in run.events if e["type"] == "event"]
    assert [(e["step"], e["rule"], e["severity"]) for e in detections] == [(37, "nonfinite_loss", "fail")]
    assert math.isnan(detections[0]["evidence"]["loss"])
    assert [(a["step"], a["action"], a["reason"]) for a in run.actions] == [(37, "skip", "non-finite loss")]
    (end,) = [e for e in run.events if e["type"] == "run_complete"]
    assert (end["status"], end["step"], end["steps"]) == ("completed", 60, 60)
    assert run.completed is True and run.max_steps == 60
    assert run.problems == []


def test_non_finite_values_are_bare_literals_never_dropped(tmp_path: Path) -> None:
    path = _write_run(tmp_path)
    line = next(x for x in path.read_text().splitlines() if '"step":37' in x and '"type":"step"' in x)
    assert '"loss":NaN' in line and '"grad_norm":Infinity' in line
    assert encode({"type": "x", "v": -math.inf}) == b'{"type":"x","v":-Infinity}\n'
    assert encode({"type": "x", "nested": [{"v": math.nan}]}) == b'{"type":"x","nested":[{"v":NaN}]}\n'


def test_banner_names_writer_run_and_versions(tmp_path: Path) -> None:
    path = _write_run(tmp_path)
    banner = json.loads(path.read_text().splitlines()[0])
    assert banner["type"] == "banner" and banner["writer"] == "trainmedic"
    assert banner["run_id"] == "r1" and banner["max_steps"] == 60 and banner["resumed_from_step"] is None
    assert banner["config"] == {"lr": 2e-4}
    assert banner["versions"]["torch"] == "x"  # what the caller gave wins over package metadata
    assert banner["versions"]["python"].count(".") == 2
    step = json.loads(path.read_text().splitlines()[1])
    assert list(step)[:10] == [
        "type",
        "step",
        "loss",
        "lr",
        "grad_norm",
        "grad_norm_after_clip",
        "skipped",
        "tokens",
        "time",
        "timestamp",
    ]
    assert step["epoch"] == pytest.approx(1 / 60)


def test_torn_last_line_after_a_crash_is_tolerated(tmp_path: Path) -> None:
    log = RunLog.open(tmp_path, run_id="c")
    for s in range(1, 11):
        log.step(s, loss=_loss(s), lr=1e-4, grad_norm=0.4)
    log.close()
    with log.path.open("ab") as fh:  # the process died half-way through writing step 11
        fh.write(b'{"type":"step","step":11,"loss":0.7')
    run = load_run(tmp_path)
    assert run.train_loss.steps.tolist() == list(range(1, 11))
    assert run.completed is False  # banner, but no run_complete
    assert [p.fatal for p in run.problems] == [False]
    assert "truncated" in run.problems[0].message and run.problems[0].line == 12


def test_reopening_in_the_same_second_appends_after_a_torn_line(
    tmp_path: Path, clock: list[datetime]
) -> None:
    log = RunLog.open(tmp_path, run_id="same")
    log.step(1, loss=1.0, lr=1e-4, grad_norm=0.4)
    log.close()
    with log.path.open("ab") as fh:
        fh.write(b'{"type":"step","ste')
    again = RunLog.open(tmp_path, run_id="same", resumed_from_step=1)
    again.step(2, loss=0.9, lr=1e-4, grad_norm=0.4)
    again.close()
    assert again.path == log.path
    run = load_run(tmp_path)
    assert run.train_loss.steps.tolist() == [1, 2]
    assert [(p.fatal, p.line, "resume banner" in p.message) for p in run.problems] == [(False, 3, True)]


def test_append_never_truncates_an_existing_file(tmp_path: Path, clock: list[datetime]) -> None:
    log = RunLog.open(tmp_path, run_id="keep")
    log.step(1, loss=1.0, lr=1e-4, grad_norm=0.4)
    log.close()
    before = log.path.read_bytes()
    again = RunLog.open(tmp_path, run_id="keep")  # same second: same file name
    again.step(2, loss=0.9, lr=1e-4, grad_norm=0.4)
    again.close()
    assert again.path == log.path
    assert log.path.read_bytes().startswith(before)
    assert log.path.read_bytes().count(b'"type":"banner"') == 2
    assert load_run(tmp_path).train_loss.steps.tolist() == [1, 2]


def test_resumed_run_with_the_same_run_id_dedupes_latest_wins(tmp_path: Path, clock: list[datetime]) -> None:
    with RunLog.open(tmp_path, run_id="res", max_steps=10) as log:
        for s in range(1, 8):
            log.step(s, loss=float(s), lr=1e-4, grad_norm=0.4)
        log.run_complete(7, "crashed", "RuntimeError: boom", 7)
        first = log.path
    clock[0] += timedelta(minutes=5)  # the resumed process starts later: a new file
    with RunLog.open(tmp_path, run_id="res", max_steps=10, resumed_from_step=5) as log:
        for s in range(6, 11):
            log.step(s, loss=100.0 + s, lr=1e-4, grad_norm=0.4)
        log.run_complete(10, "completed", "reached max_steps", 5)
        second = log.path
    assert first != second
    banners = [json.loads(x) for x in second.read_text().splitlines() if '"banner"' in x]
    assert [(b["run_id"], b["resumed_from_step"]) for b in banners] == [("res", 5)]
    run = load_run(tmp_path)
    assert run.other_runs == []  # one training run across both files
    assert run.train_loss.steps.tolist() == list(range(1, 11))
    assert run.train_loss.values.tolist() == [1, 2, 3, 4, 5, 106, 107, 108, 109, 110]
    ends = [(e["status"], bool(e.get("superseded"))) for e in run.events if e["type"] == "run_complete"]
    assert ends == [("crashed", True), ("completed", False)]
    assert run.completed is True


def test_resume_that_is_still_running_is_not_complete(tmp_path: Path) -> None:
    with RunLog.open(tmp_path, run_id="open") as log:
        log.step(1, loss=1.0, lr=1e-4, grad_norm=0.4)
        log.run_complete(1, "crashed", "killed", 1)
        log.banner(resumed_from_step=1)
        log.step(2, loss=0.9, lr=1e-4, grad_norm=0.4)
    run = load_run(tmp_path)
    assert run.completed is False
    assert [e.get("superseded") for e in run.events if e["type"] == "run_complete"] == [True]


def test_stopped_or_crashed_runs_are_not_completed(tmp_path: Path) -> None:
    with RunLog.open(tmp_path, run_id="s") as log:
        log.step(1, loss=1.0, lr=1e-4, grad_norm=0.4)
        log.action(1, "stop", "divergence")
        log.run_complete(1, "stopped", "divergence confirmed", 1)
    assert load_run(tmp_path).completed is False


def test_odd_value_types_are_written_as_json(tmp_path: Path) -> None:
    with RunLog.open(tmp_path, run_id="t", config={"path": tmp_path, 3: "int key"}) as log:
        log.step(
            1, loss=np.float32(0.5), lr=np.float64(1e-4), grad_norm=np.float32("nan"), tokens=np.int64(7)
        )
        log.event(1, "loss_spike", "warn", "spike", {"z": np.float32(7.5), "hist": np.arange(3)})
        path = log.path
    lines = path.read_text().splitlines()
    banner = json.loads(lines[0])
    assert banner["config"] == {"path": str(tmp_path), "3": "int key"}
    step = json.loads(lines[1])
    assert step["loss"] == 0.5 and step["tokens"] == 7 and math.isnan(step["grad_norm"])
    assert json.loads(lines[2])["evidence"] == {"z": 7.5, "hist": [0, 1, 2]}


def test_bad_arguments_and_closed_logs_raise_clearly(tmp_path: Path) -> None:
    log = RunLog.open(tmp_path, run_id="x")
    with pytest.raises(ValueError, match="severity"):
        log.event(1, "r", "critical", "m")
    with pytest.raises(ValueError, match="status"):
        log.run_complete(1, "done", "m", 1)
    with pytest.raises(ValueError, match="type"):
        log.write({"step": 1})
    log.close()
    log.close()  # idempotent
    assert log.closed
    with pytest.raises(ValueError, match="closed"):
        log.step(1, loss=1.0, lr=1e-4, grad_norm=0.4)
    with pytest.raises(ValueError, match="empty"):
        RunLog.open(tmp_path, run_id="")


def test_run_id_with_path_characters_stays_inside_logs(tmp_path: Path) -> None:
    with RunLog.open(tmp_path, run_id="../evil run/1") as log:
        log.step(1, loss=1.0, lr=1e-4, grad_norm=0.4)
    assert log.path.parent == tmp_path / "logs"
    assert json.loads(log.path.read_text().splitlines()[0])["run_id"] == "../evil run/1"


def test_writer_does_not_import_torch() -> None:
    code = (
        "import sys, trainmedic.watcher.runlog, trainmedic.watcher.postmortem; print('torch' in sys.modules)"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_thousands_of_step_records_are_written_finite_and_not(tmp_path: Path) -> None:
    n = 5000
    with RunLog.open(tmp_path, run_id="many") as log:
        for s in range(n):
            log.step(
                s,
                loss=1.0 + s * 1e-6,
                lr=2e-4,
                grad_norm=0.5,
                grad_norm_after_clip=0.5,
                tokens=2048,
                time=0.03,
            )
        for s in range(n, 2 * n):
            log.step(s, loss=math.nan, lr=2e-4, grad_norm=math.inf, grad_norm_after_clip=0.5, skipped=True)
    assert log.records == 2 * n + 1
    assert os.path.getsize(log.path) > 2 * n * 100
    run = load_run(tmp_path)
    assert len(run.train_loss) == 2 * n
    assert np.isnan(run.train_loss.values[n:]).all() and np.isfinite(run.train_loss.values[:n]).all()


def test_records_built_elsewhere_are_written_as_given_with_a_timestamp(tmp_path: Path) -> None:
    with RunLog.open(tmp_path, run_id="w") as log:
        log.write({"type": "event", "step": 4, "rule": "loss_spike", "severity": "warn", "message": "m"})
        log.write({"type": "step", "step": 4, "loss": 1.0, "timestamp": "given"})
    first, second = (json.loads(x) for x in log.path.read_text().splitlines()[1:])
    assert first["rule"] == "loss_spike" and first["timestamp"].startswith("20")
    assert second["timestamp"] == "given"
    assert [e["rule"] for e in load_run(tmp_path).events if e["type"] == "event"] == ["loss_spike"]


def test_default_run_ids_are_fresh_and_never_look_like_dlm_numbers(tmp_path: Path) -> None:
    ids = set()
    for i in range(20):
        with RunLog.open(tmp_path / str(i)) as log:
            ids.add(log.run_id)
        assert not log.run_id.isdigit() and log.path.name.startswith(f"train-{log.run_id}-")
        assert load_run(tmp_path / str(i)).layout == "watched HF output dir"
    assert len(ids) == 20
