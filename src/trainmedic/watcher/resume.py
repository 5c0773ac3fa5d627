"""Process death: continue a killed run from its newest certified checkpoint.

A run killed at any moment (SIGKILL, a lost node, a pre-empted job) leaves checkpoints that may
be half written. The Trainer's own `resume_from_checkpoint=True` takes the highest-numbered
`checkpoint-N`, which may be exactly that half-written one; here the resume point is
`newest_certified(output_dir)`, a complete checkpoint whose weights were finite and that was
followed by clean steps. The watcher's treatment state comes back with it: ZClip statistics,
OOM split and run id through `Vitals` (from `checkpoint-N/trainmedic_state.json`), and the
learning-rate scale and treatment counts (budgets) here, so the run log continues the same run.

Two ways in:
- `watch(trainer, resume=True)`, or the environment variable `TRAINMEDIC_RESUME=1` (any of
  1/true/yes/on), which makes every `watch()` in the process behave as `resume=True`;
- `trainmedic resume OUTPUT_DIR`: reads the launch record of the run log's latest banner (argv,
  cwd, Python, launcher environment) and runs the same command again with `TRAINMEDIC_RESUME=1`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESUME_ENV = "TRAINMEDIC_RESUME"
_TRUE = ("1", "true", "yes", "on")


class ResumeError(Exception):
    """Nothing can be resumed; the message says what is missing and what to do."""


def resume_requested(resume: bool | None) -> bool:
    """`resume` when given, else whether `TRAINMEDIC_RESUME` asks for it."""
    if resume is not None:
        return resume
    return os.environ.get(RESUME_ENV, "").strip().lower() in _TRUE


def resolve_resume(
    trainer: Any,
    vitals: Any,
    resume: bool | None,
    resume_from_checkpoint: str | bool | None,
    say: Callable[[str], None],
) -> str | bool | None:
    """What `watch` hands to `trainer.train(resume_from_checkpoint=...)`.

    An explicit `resume_from_checkpoint` wins. With resume asked for, the newest certified
    checkpoint of `trainer.args.output_dir` (its treatment state put back into `vitals`), or
    None, said out loud, when there is none and the run starts from scratch.
    """
    if resume_from_checkpoint is not None or not resume_requested(resume):
        return resume_from_checkpoint
    from trainmedic.watcher.checkpoints import newest_certified

    output_dir = Path(trainer.args.output_dir)
    ckpt = newest_certified(output_dir)
    if ckpt is None:
        say(f"[trainmedic] resume: no certified checkpoint in {output_dir}; starting from scratch")
        return None
    from trainmedic.watcher.treatment_state import restore_treatment

    smaller = restore_treatment(vitals, ckpt, trainer.args)
    say(f"[trainmedic] resume: continuing from {ckpt.name} (the newest certified checkpoint)")
    if smaller:
        use_micro_batches(trainer, smaller)
        say(
            f"[trainmedic] resume: {smaller}, as the run had fallen back to after running out of memory "
            "(same effective batch)"
        )
    return str(ckpt)


def use_micro_batches(trainer: Any, batch: dict[str, int]) -> None:
    """Train on with these `per_device_train_batch_size`/`gradient_accumulation_steps`; the
    Trainer keeps its own copy of the batch size from when it was made."""
    for key, value in batch.items():
        setattr(trainer.args, key, value)
    trainer._train_batch_size = trainer.args.train_batch_size


# ------------------------------------------------------------------------- `trainmedic resume`


@dataclass
class ResumePlan:
    """What `trainmedic resume` will do: which checkpoint, which command, where."""

    output_dir: Path
    checkpoint: Path
    command: list[str]
    cwd: Path
    run_id: str | None
    banner_log: Path
    skipped: list[str] = field(default_factory=list)  # newer checkpoints passed over, and why

    @property
    def step(self) -> int:
        return int(self.checkpoint.name.rsplit("-", 1)[1])

    def describe(self) -> str:
        run = f"run {self.run_id}" if self.run_id else "the run"
        lines = [f"Resuming {run} in {self.output_dir} from {self.checkpoint.name} (step {self.step}),"]
        lines.append("the newest certified checkpoint.")
        lines += [f"  passing over {s}" for s in self.skipped]
        lines.append(f"Command (as launched, from {self.banner_log.name}):")
        lines.append(f"  cd {shlex.quote(str(self.cwd))}")
        lines.append(f"  {RESUME_ENV}=1 {shlex.join(self.command)}")
        return "\n".join(lines)

    def run(self) -> int:
        """Run the command with `TRAINMEDIC_RESUME=1`; its exit status (128 + N if killed by N)."""
        env = {**os.environ, RESUME_ENV: "1"}
        try:
            code = subprocess.run(self.command, cwd=self.cwd, env=env, check=False).returncode
        except OSError as exc:
            raise ResumeError(f"cannot start {self.command[0]}: {exc.strerror or exc}") from None
        return 128 + abs(code) if code < 0 else code


def plan_resume(output_dir: str | os.PathLike[str]) -> ResumePlan:
    """Find the resume point and the launch command of the run in `output_dir` (ResumeError if not)."""
    from trainmedic.record.hf import checkpoints
    from trainmedic.watcher.checkpoints import certificate_problem, inspect_checkpoint

    out = Path(output_dir)
    if not out.is_dir():
        raise ResumeError(f"{out}: no such directory (give the run's output_dir)")
    banner, log = latest_banner(out)
    launch = banner.get("launch")
    if not isinstance(launch, dict):
        raise ResumeError(
            f"{log}: the run log does not record how the run was launched (written by an older "
            f"trainmedic); run your training command again yourself with {RESUME_ENV}=1"
        )
    skipped: list[str] = []
    ckpt = None
    for _, c in checkpoints(out):  # newest first
        problem = certificate_problem(c)
        if problem is None:
            ckpt = c
            break
        if problem == "not certified":  # say why: a save cut short, or clean steps that never ran
            found = inspect_checkpoint(c, finite=False)
            problem = (
                found.why_not() if found.problems else "not certified (killed before its clean steps ran)"
            )
        skipped.append(f"{c.name}: {problem}")
    if ckpt is None:
        seen = f" ({'; '.join(skipped[:3])})" if skipped else " (there are no checkpoint-N directories)"
        raise ResumeError(
            f"{out}: no certified checkpoint to resume from{seen}. A checkpoint is certified after "
            "clean steps follow its save; start the run again from the beginning instead"
        )
    command, cwd = launch_command(launch, log)
    rid = banner.get("run_id")
    return ResumePlan(out, ckpt, command, cwd, str(rid) if rid is not None else None, log, skipped)


def latest_banner(output_dir: Path) -> tuple[dict[str, Any], Path]:
    """The newest trainmedic banner in `output_dir/logs/train-*.jsonl`, and its file."""
    logs = sorted((output_dir / "logs").glob("train-*.jsonl"))
    if not logs:
        raise ResumeError(
            f"{output_dir}: no run log (logs/train-*.jsonl); only runs started under trainmedic's "
            "watch() can be resumed by `trainmedic resume`"
        )
    best: tuple[str, int, dict[str, Any], Path] | None = None
    order = 0
    for path in logs:
        try:
            lines = path.read_bytes().splitlines()
        except OSError:
            continue
        for line in lines:
            if b'"banner"' not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn line: the crash this command is for
            if isinstance(rec, dict) and rec.get("type") == "banner" and rec.get("writer") == "trainmedic":
                order += 1
                key = (str(rec.get("timestamp") or ""), order, rec, path)
                if best is None or key[:2] > best[:2]:
                    best = key
    if best is None:
        raise ResumeError(f"{output_dir / 'logs'}: no trainmedic banner in the run logs; nothing to resume")
    return best[2], best[3]


def launch_command(launch: dict[str, Any], log: Path) -> tuple[list[str], Path]:
    """The command line (and directory) that starts the run the way it was first started."""
    argv = [str(a) for a in launch.get("argv") or []]
    orig = [str(a) for a in launch.get("orig_argv") or argv]
    python = str(launch.get("python") or "")
    cwd = launch.get("cwd")
    if not argv or argv[0] in ("", "-") or not python:
        raise ResumeError(
            f"{log}: the run was started interactively (no script to run again); "
            f"rerun your training code with {RESUME_ENV}=1"
        )
    if not cwd or not Path(cwd).is_dir():
        raise ResumeError(f"{log}: the directory the run was started in ({cwd}) no longer exists")
    env = launch.get("env") or {}
    world = _int(env.get("WORLD_SIZE"))
    if world is not None and world > 1:
        local = _int(env.get("LOCAL_WORLD_SIZE"))
        if local != world:
            raise ResumeError(
                f"{log}: the run used {world} processes on several machines; start your launcher "
                f"again on every machine with {RESUME_ENV}=1"
            )
        # torchrun started each rank as `python -u script ...`: start torchrun again instead
        return [python, "-m", "torch.distributed.run", f"--nproc_per_node={world}", *argv], Path(cwd)
    return [python, *orig[1:]], Path(cwd)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
