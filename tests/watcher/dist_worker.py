"""One rank of a watched toy run under `torchrun` (CPU, gloo); launched by test_distributed.py.

    torchrun --nproc_per_node 2 dist_worker.py SCENARIO BASE OUT REPORTS STEP

SCENARIO is `nan` (a NaN loss on rank 1 only at optimizer step STEP), `diverge` (learning rate
x100 on every rank from step STEP, checkpoints every 10 steps) or `oom` (rank 1 only runs out of
memory above 4 rows from its STEP-th forward of decoder layer 1). Each rank writes what it saw
and did to REPORTS/rank-R.json, then leaves through `os._exit(0)`: gloo sometimes aborts at
interpreter exit after a finished run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from trainmedic.watcher import WatchConfig, watch
from trainmedic.watcher.checkpoints import Certifier

SCENARIOS = ("nan", "diverge", "oom")


class Clock(TrainerCallback):
    """The optimizer step running now (1-based), for faults keyed on a step."""

    def __init__(self) -> None:
        self.step = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step = state.global_step + 1


class LrBlowUp(TrainerCallback):
    """Learning rate x100 at step `at` (once: a rollback resumes below it with a lower rate)."""

    def __init__(self, trainer: Any, at: int) -> None:
        self.trainer, self.at, self.fired = trainer, at, False

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step + 1 == self.at and not self.fired:
            self.fired = True
            sched = self.trainer.lr_scheduler
            sched.base_lrs = [lr * 100 for lr in sched.base_lrs]
            for group in self.trainer.optimizer.param_groups:
                group["lr"] *= 100


class FakeOom:
    """A CUDA-style OOM whenever decoder layer 1 sees more than `fits` rows, from call `start` on."""

    def __init__(self, model: Any, fits: int, start: int) -> None:
        self.fits, self.start, self.calls, self.raised = fits, start, 0, 0
        layer = next(m for name, m in model.named_modules() if name.endswith("layers.1"))
        layer.register_forward_hook(self._forward)

    def _forward(self, module: Any, args: Any, output: Any) -> None:
        self.calls += 1
        hidden = output[0] if isinstance(output, tuple) else output
        if self.calls >= self.start and int(hidden.shape[0]) > self.fits:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


def poison_loss(trainer: Any, clock: Clock, at: int) -> None:
    original = trainer.compute_loss

    def compute_loss(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if clock.step != at:
            return out
        loss = out[0] if isinstance(out, tuple) else out
        poisoned = loss * float("nan")
        return (poisoned, *out[1:]) if isinstance(out, tuple) else poisoned

    trainer.compute_loss = compute_loss


def fingerprint(model: Any) -> str:
    """A hash of the trainable weights: equal on every rank while the ranks stay in step."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def main(scenario: str, base: Path, out: Path, reports: Path, at: int) -> None:
    from trainmedic.toy.base import load_base
    from trainmedic.toy.data import lm_dataset
    from trainmedic.toy.training import toy_trainer

    torch.set_num_threads(1)  # two processes on a small CPU: one thread each
    rank = int(os.environ["RANK"])
    kw: dict[str, Any] = {"use_cpu": True, "ddp_backend": "gloo", "batch_size": 4, "seed": 0}
    config = None
    if scenario == "diverge":
        _, tokenizer = load_base(base)
        # more data than the steps need: the skipped window's batches are dropped, not replayed
        kw |= {"save_strategy": "steps", "save_steps": 10, "train_dataset": lm_dataset(tokenizer, n=512)}
        config = WatchConfig(certify_after=5, cap_lr_jumps=False)  # let the LR fault reach the loss
    steps = {"nan": 20, "diverge": 40, "oom": 12}[scenario]
    trainer = toy_trainer(out, base=base, steps=steps, **kw)
    clock = Clock()
    trainer.add_callback(clock)
    oom = None
    if scenario == "nan" and rank == 1:
        poison_loss(trainer, clock, at)
    elif scenario == "diverge":
        trainer.add_callback(LrBlowUp(trainer, at))
    elif scenario == "oom" and rank == 1:
        oom = FakeOom(trainer.model, fits=2, start=at)
    # no preflight for the OOM: its forwards would shift which call the fault starts at
    result = watch(trainer, config, echo=lambda line: None, preflight=0 if scenario == "oom" else 2)
    certifiers = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Certifier)]
    report = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "status": result.status,
        "reason": result.reason,
        "steps": result.steps,
        "actions": [[a.step, a.action] for a in result.actions],
        "rollback_to": [a.detail.get("to_step") for a in result.actions if a.action == "rollback"],
        "events": [[e.step, e.rule] for e in result.events if e.severity != "info"],
        "log_path": str(result.log_path) if result.log_path else None,
        "postmortem_path": str(result.postmortem_path) if result.postmortem_path else None,
        "oom_raised": oom.raised if oom is not None else 0,
        # checkpoints this process certified (wrote a marker for): rank 0's only
        "certified_here": sorted(n for c in certifiers for n in c.certified),
        "weights": fingerprint(trainer.model),
    }
    tmp = reports / f".rank-{rank}.json.tmp"
    tmp.write_text(json.dumps(report))
    tmp.rename(reports / f"rank-{rank}.json")


if __name__ == "__main__":
    name, base_dir, out_dir, report_dir, step = sys.argv[1:6]
    if name not in SCENARIOS:
        raise SystemExit(f"unknown scenario {name!r}; expected one of {', '.join(SCENARIOS)}")
    main(name, Path(base_dir), Path(out_dir), Path(report_dir), int(step))
    sys.stdout.flush()
    sys.stderr.flush()
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
