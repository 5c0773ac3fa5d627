"""Fault scenarios 8 and 9, which need processes of their own (`fault_worker.py` runs in them).

8. A process is SIGKILLed in the middle of writing a checkpoint; a fresh process then resumes
   the way a user would: plain, the same script with `train(resume_from_checkpoint=True)`;
   watch, `trainmedic resume OUTPUT_DIR`, which runs the launch command from the run log again
   with `TRAINMEDIC_RESUME=1`. Steps recomputed: the steps the killed process had done beyond
   the step the resumed one started from (plus any rollback's).
9. `torchrun --nproc_per_node 2` (CPU, gloo), a NaN loss on rank 1 only; both ranks report, and
   the row says whether they agree (same ending, same actions, same weights).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fault_setup import FAULT_STEP, INTERVENTIONS, SAVE_STEPS, Outcome
from trainmedic.watcher.resume import RESUME_ENV

HERE = Path(__file__).resolve().parent
WORKER = HERE / "fault_worker.py"
KILLED_AT = "killed-at"  # written by the worker just before it kills itself
TIMEOUT_S = 600  # one process; a healthy full-length one takes well under a minute


@dataclass
class Proc:
    returncode: int | None  # None: timed out (and killed with its whole process group)
    output: str

    def tail(self, lines: int = 3) -> str:
        return " / ".join(line.strip() for line in self.output.strip().splitlines()[-lines:])


def launch(cmd: list[str], extra_env: dict[str, str] | None = None) -> Proc:
    """Run `cmd` in a session of its own (a hang is ended with every process it started)."""
    env = {k: v for k, v in os.environ.items() if k != RESUME_ENV}
    env |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
    pipe, both = subprocess.PIPE, subprocess.STDOUT
    proc = subprocess.Popen(
        cmd, cwd=HERE.parent, env=env, stdout=pipe, stderr=both, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return Proc(None, f"{output}\n(timed out after {TIMEOUT_S} s)")
    return Proc(proc.returncode, output)


@dataclass(frozen=True)
class Shared:
    """What every worker is given: the toy base, the data saved by `fault_setup.save_data`, the
    run's length and its torch threads."""

    base: Path
    data: Path
    steps: int
    threads: int = 1

    def worker(self, scenario: str, mode: str, tmp: Path, at: int) -> list[str]:
        """The worker's command line (after the interpreter or launcher): it trains in tmp/out
        and reports in tmp/reports."""
        args = [scenario, mode, str(tmp / "out"), str(tmp / "reports"), "--base", str(self.base)]
        args += ["--data", str(self.data), "--steps", str(self.steps), "--threads", str(self.threads)]
        return [str(WORKER), *args, "--at", str(at)]


def kill_step(steps: int) -> int | None:
    """The save the kill lands in: mid-run, with a certified checkpoint before it (None: too short)."""
    at = max(2 * SAVE_STEPS, (steps // 2) // SAVE_STEPS * SAVE_STEPS)
    return at if at < steps else None


def kill_in_save(mode: str, shared: Shared) -> Outcome:
    """Scenario 8 for one mode: kill in the save, then resume in a fresh process."""
    at = kill_step(shared.steps)
    if at is None:
        why = f"not run: needs more than {2 * SAVE_STEPS} steps"
        return Outcome(mode, "not run", 0, None, 0.0, finished=why, reason=why)
    tmp = Path(tempfile.mkdtemp(prefix=f"faults-8-{mode}-"))
    out, reports = tmp / "out", tmp / "reports"
    reports.mkdir()
    cmd = [sys.executable, *shared.worker("kill-in-save", mode, tmp, at)]
    start = time.perf_counter()
    try:
        first = launch(cmd)
        if first.returncode != -signal.SIGKILL or not (reports / KILLED_AT).exists():
            why = f"the first process was not killed in the save (exit {first.returncode}): {first.tail()}"
            return Outcome(mode, "crashed", 0, None, 0.0, reason=why, finished=f"not killed ({why})")
        torn = _torn(out / f"checkpoint-{at}")
        if mode == "plain":
            second = launch(cmd, {RESUME_ENV: "1"})
        else:
            second = launch([sys.executable, "-m", "trainmedic.cli", "resume", str(out)])
        outcome, picked = _report(reports / "rank-0.json", mode, second)
        outcome.seconds = time.perf_counter() - start
        outcome.fault_step = at
        outcome.latency_note = "n/a (process death)"
        if outcome.started_at is not None:
            outcome.recomputed += max(at - outcome.started_at, 0)
        if mode == "watch":
            outcome.interventions = logged_interventions(out)
        outcome.finished = _kill_story(outcome, at, picked)
        outcome.notes.append(f"checkpoint-{at} as the kill left it: {torn}")
        if outcome.ended == "crashed":
            outcome.notes.append(f"{mode} resume: {outcome.reason.replace(str(out), 'OUTPUT_DIR')}")
        return outcome
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def nan_on_rank_1(mode: str, shared: Shared) -> Outcome:
    """Scenario 9 for one mode: two ranks under torchrun, a NaN loss on rank 1 only."""
    at = min(FAULT_STEP, shared.steps // 2)
    tmp = Path(tempfile.mkdtemp(prefix=f"faults-9-{mode}-"))
    reports = tmp / "reports"
    reports.mkdir()
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    start = time.perf_counter()
    try:
        proc = launch([*run, *shared.worker("nan-on-rank-1", mode, tmp, at)])
        found = [reports / f"rank-{r}.json" for r in (0, 1)]
        if not all(p.exists() for p in found):
            why = f"torchrun exit {proc.returncode}, no report from every rank: {proc.tail()}"
            return Outcome(mode, "crashed", 0, None, time.perf_counter() - start, at, why)
        zero, one = (json.loads(p.read_text()) for p in found)
        outcome = Outcome.from_json(zero)
        outcome.seconds = time.perf_counter() - start
        same = {k: zero[k] == one[k] for k in ("ended", "steps", "actions", "weights")}
        agree = all(same.values())
        outcome.finished = f"{outcome.ending()} on both ranks" + (
            "" if agree else f", ranks disagree on {', '.join(k for k, v in same.items() if not v)}"
        )
        if proc.returncode != 0:
            outcome.finished += f", torchrun exit {proc.returncode}"
        acts = ", ".join(f"{a} at step {s}" for s, a in zero["actions"] if a != "clip") or "clips only"
        if mode == "plain":
            acts = "no watcher"
        same_acts = "the same actions" if same["actions"] else "different actions"
        weights = "identical" if same["weights"] else "different"
        outcome.notes.append(
            f"{mode}: torchrun exit {proc.returncode}; the ranks took {same_acts} ({acts}) and "
            f"ended with {weights} trainable weights"
        )
        return outcome
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def logged_interventions(out: Path) -> Counter[str]:
    """The watcher's treatments in the run log of `out`, over every process that wrote to it
    (the killed one's too); a torn last line, left by the kill, is skipped."""
    counts: Counter[str] = Counter()
    for log in sorted((out / "logs").glob("train-*.jsonl")):
        for line in log.read_bytes().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("type") == "action" and rec.get("action") in INTERVENTIONS:
                counts[str(rec["action"])] += 1
    return counts


def _report(path: Path, mode: str, proc: Proc) -> tuple[Outcome, str | None]:
    """The resumed process's outcome, and the checkpoint a plain resume picked."""
    if not path.exists():
        why = f"the resumed process wrote no report (exit {proc.returncode}): {proc.tail()}"
        return Outcome(mode, "crashed", 0, None, 0.0, reason=why), None
    data = json.loads(path.read_text())
    return Outcome.from_json(data), data.get("picked")


def _torn(ckpt: Path) -> str:
    if not ckpt.is_dir():
        return "not created"
    from trainmedic.watcher.checkpoints import inspect_checkpoint

    found = inspect_checkpoint(ckpt, finite=False)
    return found.why_not() if found.problems else "complete"


def _kill_story(o: Outcome, at: int, picked: str | None) -> str:
    """The finished cell: where it was killed, what the fresh process went on from, how it ended.
    `picked`: the checkpoint the plain Trainer takes (it may crash before training starts)."""
    if o.started_at is not None:
        began = f"checkpoint-{o.started_at}" if o.started_at else "step 0 (from scratch)"
    else:
        began = picked or "nothing"
    torn = " (the torn one)" if began == f"checkpoint-{at}" else ""
    how = "`trainmedic resume`" if o.mode == "watch" else "`train(resume_from_checkpoint=True)`"
    end = f"crashed ({o.reason.split(':')[0]})" if o.ended == "crashed" else o.ending()
    return f"killed in the save of step {at}; {how} went on from {began}{torn}: {end}"
