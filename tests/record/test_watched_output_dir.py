"""A Hugging Face output dir that also holds trainmedic's run log: detected by name, read from the log."""

from __future__ import annotations

import json
import math
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import trainmedic.probes.live_events  # noqa: F401  (registers the probe, as the report order will)
from trainmedic.cli import app
from trainmedic.record.detect import Layout, detect
from trainmedic.record.jsonlog import read_logs
from trainmedic.record.load import load_run
from trainmedic.watcher import runlog
from trainmedic.watcher.runlog import RunLog

runner = CliRunner()


def touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors format by hand (8-byte header length, JSON header, raw data): no extra deps."""
    header: dict[str, Any] = {}
    blobs, offset = [], 0
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def write_checkpoint(root: Path, step: int, history_every: int = 10) -> Path:
    """A complete checkpoint (trainer state + weights) and the root trainer state, no optimizer."""
    ckpt = root / f"checkpoint-{step}"
    history = [
        {"step": s, "loss": 5.0, "learning_rate": 1e-3} for s in range(history_every, step + 1, history_every)
    ]
    state = json.dumps({"global_step": step, "max_steps": step, "log_history": history})
    touch(ckpt / "trainer_state.json", state)
    touch(root / "trainer_state.json", state)
    rng = np.random.default_rng(0)
    write_safetensors(ckpt / "model.safetensors", {"w": rng.normal(size=(4, 4))})
    return ckpt


def write_log(out: Path, run_id: str = "a1b2", steps: int = 60, **extra: Any) -> Path:
    with RunLog.open(out, run_id=run_id, max_steps=steps) as log:
        for s in range(1, steps + 1):
            log.step(s, loss=2.0 / math.sqrt(s), lr=2e-4, grad_norm=0.5, grad_norm_after_clip=0.5, **extra)
        log.run_complete(steps, "completed", "reached max_steps", steps)
        return log.path


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[datetime]:
    now = [datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)]
    monkeypatch.setattr(runlog, "_now", lambda: now[0])
    return now


# ---------------------------------------------------------------------- detection (names only)


def test_output_dir_with_a_run_log_is_a_watched_output_dir(tmp_path: Path) -> None:
    touch(tmp_path / "checkpoint-50" / "trainer_state.json")
    log = touch(tmp_path / "logs" / "train-a1b2-20261122T100000.jsonl")
    touch(tmp_path / "logs" / "notes.jsonl")  # not a run log name
    found = detect(tmp_path)
    assert found.layout is Layout.WATCHED_HF_OUTPUT_DIR
    assert found.files == [log]


def test_run_log_beside_a_postmortem_is_watched_even_with_dlm_style_names(tmp_path: Path) -> None:
    touch(tmp_path / "logs" / "train-000001-20261122T100000.jsonl")
    assert detect(tmp_path).layout is Layout.DLM_STORE  # dlm's own layout is unchanged
    touch(tmp_path / "trainmedic-postmortem.json", "{}")
    assert detect(tmp_path).layout is Layout.WATCHED_HF_OUTPUT_DIR


def test_run_log_alone_with_a_non_numeric_id_is_watched(tmp_path: Path) -> None:
    touch(tmp_path / "logs" / "train-a1b2-20261122T100000.jsonl")
    assert detect(tmp_path).layout is Layout.WATCHED_HF_OUTPUT_DIR


def test_hf_output_dir_with_other_logs_is_a_plain_output_dir(tmp_path: Path) -> None:
    touch(tmp_path / "checkpoint-50" / "trainer_state.json")
    touch(tmp_path / "logs" / "events.jsonl")
    assert detect(tmp_path).layout is Layout.HF_OUTPUT_DIR


def test_run_logs_are_ordered_by_start_time_not_run_id(tmp_path: Path) -> None:
    later = touch(tmp_path / "logs" / "train-aaa-20261122T120000.jsonl")
    earlier = touch(tmp_path / "logs" / "train-zzz-20261122T100000.jsonl")
    assert detect(tmp_path).files == [earlier, later]
    assert detect(tmp_path / "logs").files == [earlier, later]


# ---------------------------------------------------------------------- reading


def test_curves_come_from_the_run_log_and_weights_from_the_checkpoint(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 60)
    write_log(tmp_path)
    run = load_run(tmp_path)
    assert run.layout == "watched HF output dir"
    assert run.train_loss.steps.tolist() == list(range(1, 61))  # every step, not every 10th
    assert run.train_loss.values[0] == 2.0  # the raw loss, not trainer_state's 5.0
    assert run.adapter is not None and set(run.adapter.header) == {"w"}
    assert run.label == "run a1b2, checkpoint-60 (newest complete of 1)"
    assert run.completed is True and run.max_steps == 60
    assert not any(p.fatal for p in run.problems)


def test_logs_without_a_trainmedic_banner_are_not_a_live_record(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 60)
    touch(
        tmp_path / "logs" / "train-a1b2-20261122T100000.jsonl",
        json.dumps({"type": "step", "step": 1, "loss": 9}),
    )
    run = load_run(tmp_path)
    assert run.layout == "HF output dir"
    assert run.train_loss.values[0] == 5.0  # trainer_state's curve
    assert any("no trainmedic banner" in n for n in run.notes)


def test_watched_run_that_saved_nothing_yet_is_read_from_its_log(tmp_path: Path) -> None:
    with RunLog.open(tmp_path, run_id="early") as log:
        log.step(1, loss=3.0, lr=1e-4, grad_norm=1.0)
        log.step(2, loss=math.nan, lr=1e-4, grad_norm=math.nan, skipped=True)
        log.run_complete(2, "crashed", "RuntimeError: boom", 2)
    touch(tmp_path / "trainmedic-postmortem.json", "{}")
    run = load_run(tmp_path)
    assert run.layout == "watched HF output dir"
    assert run.label == "run early, output dir"
    assert run.adapter is None and run.completed is False
    assert math.isnan(run.train_loss.values[1])


def test_checkpoint_past_the_judged_run_is_noted(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 500)
    write_log(tmp_path, steps=30)
    run = load_run(tmp_path)
    assert any("checkpoint-500 is past the judged run's last logged step 30" in n for n in run.notes)


def test_the_latest_run_by_start_time_is_judged(tmp_path: Path, clock: list[datetime]) -> None:
    write_log(tmp_path, run_id="zzz", steps=20)
    clock[0] = clock[0].replace(hour=12)
    write_log(tmp_path, run_id="aaa", steps=10)
    run = load_run(tmp_path)
    assert run.label.startswith("run aaa") and len(run.train_loss) == 10
    assert [o.label for o in run.other_runs] == ["run zzz"]


def test_dpo_extras_are_read_from_the_run_log(tmp_path: Path) -> None:
    extra = {"rewards/margins": 0.25, "rewards/accuracies": 0.75, "epoch": 0.5}
    write_log(tmp_path, steps=5, **extra)
    run = load_run(tmp_path)
    assert set(run.extra) == {"rewards/margins", "rewards/accuracies"}
    assert run.extra["rewards/margins"].steps.tolist() == [1, 2, 3, 4, 5]
    assert run.extra["rewards/accuracies"].values.tolist() == [0.75] * 5


def test_extras_are_only_read_from_trainmedic_logs(tmp_path: Path) -> None:
    log = touch(
        tmp_path / "x.jsonl", json.dumps({"type": "step", "step": 1, "loss": 1.0, "reward": 2.0}) + "\n"
    )
    assert read_logs([log]).extra == {}


def test_eval_records_merge_with_step_eval_losses_latest_wins(tmp_path: Path) -> None:
    lines = [
        {"type": "banner", "writer": "trainmedic", "run_id": "e"},
        {"type": "step", "step": 1, "loss": 2.0, "val_loss": 9.0},
        {"type": "eval", "step": 1, "eval_loss": 1.5},  # later than the step record's value: wins
        {"type": "eval", "step": 2, "eval_runtime": 3.0},  # no eval_loss: nothing to read
        {"type": "step", "step": 2, "loss": 1.0},
        {"type": "eval", "step": 2, "eval_loss": 1.25},
    ]
    log = touch(
        tmp_path / "logs" / "train-e-20261122T100000.jsonl", "".join(json.dumps(x) + "\n" for x in lines)
    )
    run = load_run(log)
    assert run.eval_loss.steps.tolist() == [1, 2]
    assert run.eval_loss.values.tolist() == [1.5, 1.25]
    assert run.train_loss.steps.tolist() == [1, 2]  # eval records are not steps


def test_malformed_event_and_action_records_are_named_by_line(tmp_path: Path) -> None:
    lines = [
        {"type": "banner", "writer": "trainmedic", "run_id": "m"},
        {"type": "step", "step": 1, "loss": 2.0},
        {"type": "event", "step": 1, "rule": "loss_spike", "severity": "critical"},
        {"type": "event", "step": "one", "rule": "x", "severity": "fail"},
        {"type": "action", "step": 1, "reason": "no name"},
        {"type": "action", "step": 1.0, "action": "clip"},
        {"type": "mystery", "step": 1},
    ]
    log = touch(tmp_path / "a.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    run = load_run(log)
    assert [(e["rule"], e["severity"]) for e in run.events] == [("loss_spike", "warn")]
    assert [(a["step"], a["action"]) for a in run.actions] == [(1, "clip")]
    assert [(p.line, p.fatal) for p in run.problems] == [(3, False), (4, True), (5, True)]


def test_torn_line_before_a_resume_banner_is_tolerated_other_garbage_is_not(tmp_path: Path) -> None:
    banner = json.dumps({"type": "banner", "writer": "trainmedic", "run_id": "t"})
    step = json.dumps({"type": "step", "step": 2, "loss": 1.0})
    log = touch(tmp_path / "a.jsonl", f'{banner}\n{{"type":"step","st\n{banner}\n{step}\nnot json\n{step}\n')
    problems = [(p.line, p.fatal) for p in load_run(log).problems]
    assert problems == [(2, False), (5, True)]


# ---------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from trainmedic.toy.artifacts import write_hf_run
    from trainmedic.toy.shapes import TINY

    out = write_hf_run(tmp_path_factory.mktemp("watched") / "out", TINY, logged_steps=10, every=10)
    with RunLog.open(out, run_id="cli", config={"zclip_z": 2.5}, max_steps=100) as log:
        for s in range(1, 101):
            bad = s == 37
            log.step(
                s,
                loss=math.nan if bad else 2.0 * math.exp(-s / 30) + 0.5,
                lr=2e-4,
                grad_norm=0.5,
                skipped=bad,
            )
            if bad:
                log.event(s, "nonfinite_loss", "fail", "loss is NaN at step 37", {"loss": math.nan})
                log.action(s, "skip", "non-finite loss")
            if s in (50, 80):
                log.action(s, "clip", "ZClip z > 2.5", {"z": 3.1})
        log.run_complete(100, "completed", "reached max_steps", 100)
    return out


def test_check_reports_the_watched_layout_and_the_watchers_events(watched: Path, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    result = runner.invoke(app, ["check", str(watched), "--json", str(report)])
    assert "watched HF output dir" in result.output, result.output
    assert "live_events" in result.output
    (data,) = json.loads(report.read_text())["runs"]
    assert data["layout"] == "watched HF output dir"
    (finding,) = [f for f in data["findings"] if f["kind"] == "live_events"]
    assert finding["verdict"] == "warn"
    assert finding["message"] == (
        "watcher: 1 non-finite loss (step 37, skipped), 2 grad clips, 1 skipped update; run completed"
    )
    assert finding["evidence"]["events"] == [
        {"step": 37, "label": "watcher: non-finite loss (skipped)", "severity": "treated"}
    ]
    assert len(data["curves"]["train_loss"]["steps"]) == 100


def test_check_on_a_plain_output_dir_skips_live_events(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from trainmedic.toy.artifacts import write_hf_run
    from trainmedic.toy.shapes import TINY

    out = write_hf_run(tmp_path / "plain", TINY, logged_steps=10, every=10)
    report = tmp_path / "r.json"
    runner.invoke(app, ["check", str(out), "--json", str(report)])
    (data,) = json.loads(report.read_text())["runs"]
    assert data["layout"] == "HF output dir"
    (finding,) = [f for f in data["findings"] if f["kind"] == "live_events"]
    assert finding["verdict"] == "skip"


# ------------------------------------------------------------- a checkpoint of a watched run
def write_treated_run(out: Path, run_id: str = "tmtreated") -> Path:
    """A watched run whose step 37 went NaN and was skipped: the run log says so, while every
    checkpoint's trainer_state.json holds the NaN as the Trainer logged it."""
    with RunLog.open(out, run_id=run_id, max_steps=60) as log:
        for s in range(1, 61):
            loss = math.nan if s == 37 else 2.0 / math.sqrt(s)
            log.step(s, loss=loss, lr=2e-4, grad_norm=0.5, grad_norm_after_clip=0.5, skipped=s == 37)
            if s == 37:
                log.event(s, "nonfinite_loss", "fail", "loss is nan at step 37")
                log.action(s, "skip", "non-finite loss")
        log.run_complete(60, "completed", "reached max_steps", 60)
    for n in (20, 40, 60):
        ckpt = write_checkpoint(out, n)
        history = [
            {"step": s, "loss": math.nan if s >= 37 else 2.0 / math.sqrt(s), "grad_norm": 0.5}
            for s in range(1, n + 1)
        ]
        state = {"global_step": n, "max_steps": 60, "log_history": history}
        (ckpt / "trainer_state.json").write_text(json.dumps(state))  # NaN literals, as HF writes them
        (ckpt / "trainmedic_state.json").write_text(json.dumps({"run_id": run_id}))
    return out


def _gate(path: Path, tmp_path: Path) -> tuple[int, dict[str, Any]]:
    report = tmp_path / f"{path.name}.json"
    result = runner.invoke(app, ["check", str(path), "--json", str(report)])
    (data,) = json.loads(report.read_text())["runs"]
    return result.exit_code, data


def test_a_checkpoint_of_a_watched_run_is_judged_with_its_run_log(tmp_path: Path) -> None:
    out = write_treated_run(tmp_path / "out")
    assert detect(out / "checkpoint-40").layout is Layout.WATCHED_HF_CHECKPOINT
    code, whole = _gate(out, tmp_path)
    assert code == 0, whole
    for n in (40, 60):  # saved after the treated step
        ckpt_code, data = _gate(out / f"checkpoint-{n}", tmp_path)
        assert ckpt_code == code, data
        assert data["layout"] == "watched HF checkpoint"
        verdicts = {f["kind"]: f["verdict"] for f in data["findings"]}
        assert verdicts["nonfinite"] == "warn" and verdicts["live_events"] == "warn", verdicts
        assert any(f"not from checkpoint-{n}/trainer_state.json" in note for note in data["notes"])
        assert data["run_label"].endswith(f"checkpoint-{n}"), data["run_label"]


def test_the_checkpoint_alone_would_fail_the_gate(tmp_path: Path) -> None:
    """The case the run log guards against: the checkpoint's own trainer state holds the NaN."""
    from trainmedic.record.hf import read_checkpoint

    out = write_treated_run(tmp_path / "out")
    run = read_checkpoint(out / "checkpoint-40")
    assert np.isnan(run.train_loss.values).any()


def test_a_checkpoint_names_the_run_that_saved_it_among_several(
    tmp_path: Path, clock: list[datetime]
) -> None:
    out = write_treated_run(tmp_path / "out", run_id="tmfirst")
    clock[0] = datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC)
    write_log(out, run_id="tmsecond", steps=10)  # a later, shorter run in the same dir
    _, data = _gate(out / "checkpoint-40", tmp_path)
    assert "run tmfirst" in data["run_label"], data["run_label"]
    assert len(data["other_runs"]) == 1
