"""Process death: a run killed with SIGKILL (even mid-save) continues from its newest certified
checkpoint via `trainmedic resume OUTPUT_DIR`, and its run log reads as one run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from trainmedic.cli import app
from trainmedic.watcher.resume import (
    RESUME_ENV,
    ResumePlan,
    launch_command,
    resolve_resume,
    resume_requested,
)
from trainmedic.watcher.runlog import RunLog

SCRIPT = '''
import json, os, sys, time
from pathlib import Path
from transformers import TrainerCallback
from trainmedic.toy.training import toy_trainer
from trainmedic.watcher import Vitals, WatchConfig, watch

out, base, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
vitals = Vitals(WatchConfig(certify_after=5), echo=print)
trainer = toy_trainer(
    out, base=base, steps=60, batch_size=1, seq_len=16, save_strategy="steps", save_steps=10
)


class Probe(TrainerCallback):
    """Runs after Vitals: records the treatment state the run (re)starts with."""

    def on_train_begin(self, args, state, control, **kwargs):
        probe = {"step": state.global_step, "zclip": vitals.zclip.state_dict(), "run_id": vitals.run_id}
        (out / f"probe-{os.getpid()}.json").write_text(json.dumps(probe))


class HangAt(TrainerCallback):
    """Blocks after step `at` has run and been logged, so the test can kill it there."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            (out / "at-step").write_text(str(self.at))
            time.sleep(600)


trainer.add_callback(Probe())
if mode.startswith("hang-at-") and not os.environ.get("TRAINMEDIC_RESUME"):
    trainer.add_callback(HangAt(int(mode.rsplit("-", 1)[1])))
if mode == "hang-in-save" and not os.environ.get("TRAINMEDIC_RESUME"):
    original = trainer._save_optimizer_and_scheduler

    def save_optimizer(output_dir):
        if trainer.state.global_step == 40:  # the weights are written; the optimizer is half written
            (Path(output_dir) / "optimizer.pt").write_bytes(b"PK\\x03\\x04" + bytes(64))
            (out / "in-save").write_text(str(output_dir))
            time.sleep(600)
        return original(output_dir)

    trainer._save_optimizer_and_scheduler = save_optimizer
print(watch(trainer, vitals=vitals, echo=print).summary(), flush=True)
'''


@pytest.fixture(scope="module")
def base() -> Path:
    pytest.importorskip("torch")
    from trainmedic.toy.base import toy_base

    return toy_base()


def _start(groups: Any, tmp_path: Path, base: Path, mode: str) -> tuple[subprocess.Popen[bytes], Path]:
    script = tmp_path / "train_toy.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != RESUME_ENV}
    proc = groups.start(
        [sys.executable, str(script), str(out), str(base), mode],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, out


def _wait_for(path: Path, proc: subprocess.Popen[bytes], limit: float) -> None:
    """Wait for the script to reach its marker: the event itself, not a guess of how long it takes
    (the limit only catches a hang, on a machine many times slower than a quiet one)."""
    deadline = time.monotonic() + limit
    while not path.exists():
        assert proc.poll() is None, f"the training script ended (rc {proc.returncode}) before {path.name}"
        assert time.monotonic() < deadline, f"{path} did not appear in {limit:.0f} s"
        time.sleep(0.05)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def _resume_cli(groups: Any, out: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != RESUME_ENV}
    # `trainmedic resume` starts the training script as its own child: the group takes both
    return groups.run([sys.executable, "-m", "trainmedic.cli", "resume", str(out)], env=env)


def _logged_steps(out: Path) -> list[int]:
    steps = []
    for log in sorted((out / "logs").glob("train-*.jsonl")):
        for line in log.read_bytes().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # the torn last line of the killed writer
            if rec.get("type") == "step":
                steps.append(int(rec["step"]))
    return steps


def _check_finished_as_one_run(out: Path, resumed_from: Path, saved_zclip: dict[str, Any]) -> None:
    from trainmedic.record.load import load_run

    run = load_run(out)
    assert run.other_runs == []
    assert run.train_loss.steps.tolist() == list(range(1, 61))
    assert run.completed is True
    probes = [json.loads(p.read_text()) for p in sorted(out.glob("probe-*.json"), key=os.path.getmtime)]
    first, resumed = probes[0], probes[-1]
    assert first["step"] == 0
    assert resumed["step"] == int(resumed_from.name.rsplit("-", 1)[1])
    assert resumed["zclip"] == saved_zclip
    assert resumed["run_id"] == first["run_id"] is not None
    banners = [
        json.loads(line)
        for log in (out / "logs").glob("train-*.jsonl")
        for line in log.read_bytes().splitlines()
        if b'"banner"' in line
    ]
    assert {b["run_id"] for b in banners} == {first["run_id"]}
    assert sorted(b["resumed_from_step"] or 0 for b in banners) == [0, resumed["step"]]


def test_sigkill_at_a_random_moment_then_resume_finishes_all_steps_as_one_run(
    base: Path, tmp_path: Path, groups: Any
) -> None:
    from trainmedic.watcher.checkpoints import newest_certified

    # a random step after the first certification; the script waits there, so the kill can't miss
    at = random.Random().randint(16, 55)
    proc, out = _start(groups, tmp_path, base, f"hang-at-{at}")
    _wait_for(out / "at-step", proc, groups.timeout)
    _kill(proc)
    died_at = max(_logged_steps(out))
    assert died_at == at, f"killed at step {at}, log ends at {died_at}"
    ckpt = newest_certified(out)
    assert ckpt is not None
    saved = json.loads((ckpt / "trainmedic_state.json").read_text())["zclip"]

    done = _resume_cli(groups, out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"from {ckpt.name}" in done.stdout
    _check_finished_as_one_run(out, ckpt, saved)


def test_sigkill_during_a_checkpoint_save_resumes_from_the_certified_one_before_it(
    base: Path, tmp_path: Path, groups: Any
) -> None:
    from trainmedic.watcher.checkpoints import certificate_problem, inspect_checkpoint, newest_certified

    proc, out = _start(groups, tmp_path, base, "hang-in-save")
    _wait_for(out / "in-save", proc, groups.timeout)
    _kill(proc)
    half = out / "checkpoint-40"
    assert half.is_dir()
    assert "incomplete" in inspect_checkpoint(half, finite=False).why_not()
    ckpt = newest_certified(out)
    assert ckpt is not None and ckpt.name == "checkpoint-30"  # certified at step 35
    saved = json.loads((ckpt / "trainmedic_state.json").read_text())["zclip"]

    dry = CliRunner().invoke(app, ["resume", str(out), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "from checkpoint-30" in dry.output
    assert "passing over checkpoint-40: incomplete" in dry.output
    assert f"{RESUME_ENV}=1" in dry.output and "train_toy.py" in dry.output
    assert len(list((out / "logs").glob("*.jsonl"))) == 1  # a dry run starts nothing

    done = _resume_cli(groups, out)
    assert done.returncode == 0, done.stdout + done.stderr
    _check_finished_as_one_run(out, ckpt, saved)
    assert certificate_problem(half) in (None, "not certified")  # saved again, complete this time


# -- the parts, without training -------------------------------------------------------------------
def test_resume_without_a_run_log_is_a_usage_error_that_says_what_is_missing(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["resume", str(tmp_path)])
    assert result.exit_code == 2
    assert "no run log" in result.output


def test_resume_without_a_certified_checkpoint_is_a_usage_error(tmp_path: Path) -> None:
    RunLog.open(tmp_path).close()
    (tmp_path / "checkpoint-10").mkdir()
    result = CliRunner().invoke(app, ["resume", str(tmp_path)])
    assert result.exit_code == 2
    assert "no certified checkpoint" in result.output
    assert "checkpoint-10" in result.output


def test_resume_of_a_log_without_a_launch_record_says_to_rerun_by_hand(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    banner = {"type": "banner", "writer": "trainmedic", "run_id": "tmold", "timestamp": "2025-01-01T00:00:00"}
    (tmp_path / "logs" / "train-tmold-20250101T000000.jsonl").write_text(json.dumps(banner) + "\n")
    result = CliRunner().invoke(app, ["resume", str(tmp_path)])
    assert result.exit_code == 2
    assert "does not record how the run was launched" in result.output


def test_every_banner_records_the_launch_command(tmp_path: Path) -> None:
    with RunLog.open(tmp_path) as log:
        path = log.path
    banner = json.loads(path.read_text().splitlines()[0])
    launch = banner["launch"]
    assert launch["argv"] == sys.argv
    assert launch["python"] == sys.executable
    assert launch["cwd"] == os.getcwd()


def test_a_torchrun_launch_is_relaunched_with_torchrun_and_multi_node_is_refused(tmp_path: Path) -> None:
    launch = {
        "argv": ["train.py", "--lr", "1e-4"],
        "orig_argv": ["/venv/bin/python", "-u", "train.py", "--lr", "1e-4"],
        "cwd": str(tmp_path),
        "python": "/venv/bin/python",
        "env": {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0"},
    }
    command, cwd = launch_command(launch, tmp_path / "log.jsonl")
    assert command == [
        "/venv/bin/python",
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "train.py",
        "--lr",
        "1e-4",
    ]
    assert cwd == tmp_path
    single = {**launch, "env": {}}
    assert launch_command(single, tmp_path)[0] == ["/venv/bin/python", "-u", "train.py", "--lr", "1e-4"]
    from trainmedic.watcher.resume import ResumeError

    with pytest.raises(ResumeError, match="several machines"):
        launch_command({**launch, "env": {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}}, tmp_path)


def test_the_resumed_command_runs_with_the_resume_variable_and_its_exit_code_is_returned(
    tmp_path: Path,
) -> None:
    code = f"import os, sys; sys.exit(7 if os.environ.get({RESUME_ENV!r}) == '1' else 1)"
    plan = ResumePlan(
        tmp_path, tmp_path / "checkpoint-5", [sys.executable, "-c", code], tmp_path, "tm1", tmp_path
    )
    assert plan.run() == 7


def test_resume_env_variable_asks_for_resume_and_an_explicit_checkpoint_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(RESUME_ENV, raising=False)
    assert resume_requested(None) is False
    monkeypatch.setenv(RESUME_ENV, "1")
    assert resume_requested(None) is True
    assert resume_requested(False) is False
    trainer = SimpleNamespace(args=SimpleNamespace(output_dir=str(tmp_path)))
    said: list[str] = []
    assert resolve_resume(trainer, None, None, None, said.append) is None
    assert "starting from scratch" in said[0]
    assert (
        resolve_resume(trainer, None, None, "somewhere/checkpoint-3", said.append) == "somewhere/checkpoint-3"
    )
