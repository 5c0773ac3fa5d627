"""The faults the demo injects into a real toy fine-tune, the same way into both of its runs.

Three things that go wrong in real fine-tuning, each at a step chosen from the run's length:

- a NaN batch: one micro-batch whose loss comes out NaN (a bad sample, an fp overflow);
- a learning rate that jumps too high: x100, in the optimizer and the scheduler alike, as a
  mis-set resume or a scheduler bug would leave it;
- a burst of poisoned batches: consecutive micro-batches with random labels. They are poisoned
  *data*: a batch met in the burst stays poisoned wherever it comes back, so a rollback that
  skips the data window that hurt never meets it again, and one that replays it would.

The NaN batch and the jump fire once, on the first pass through their step; a poisoned batch
hurts every time it is trained on. Each says so through `announce` at that moment, so the
terminal shows cause, detection and treatment in the order they happened.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback

LR_JUMP = 100.0
Announce = Callable[[int, str], None]  # (step, what was done to it)
POISON_BATCHES = 5


@dataclass(frozen=True)
class FaultPlan:
    """Where each fault hits (1-based optimizer steps)."""

    nan_step: int
    lr_jump_step: int
    poison_start: int
    poison_batches: int = POISON_BATCHES

    @classmethod
    def for_steps(cls, steps: int, save_steps: int, certify_after: int) -> FaultPlan:
        """Spread the faults over the run, each after the watcher's warm-up (ZClip needs 25 steps of
        statistics) and the burst just after a checkpoint has been certified, so a rollback has a
        recent healthy place to go back to."""
        if steps < 60:
            raise ValueError(f"the demo's faults need a run of at least 60 steps, not {steps}")
        nan_step = max(30, round(steps * 0.3))
        lr_jump_step = max(nan_step + 8, round(steps * 0.45))
        # the first checkpoint from 60 % of the run on, after the jump: certified just before the burst
        checkpoint = -(-max(round(steps * 0.6), lr_jump_step + 1) // save_steps) * save_steps
        poison_start = checkpoint + certify_after + 1
        if poison_start + POISON_BATCHES + 10 > steps:
            raise ValueError(f"a run of {steps} steps leaves no room after the poisoned burst")
        return cls(nan_step, lr_jump_step, poison_start)

    def describe(self) -> list[str]:
        last = self.poison_start + self.poison_batches - 1
        return [
            f"step {self.nan_step}: a batch whose loss is NaN",
            f"step {self.lr_jump_step}: the learning rate jumps x{LR_JUMP:g}",
            f"steps {self.poison_start}-{last}: {self.poison_batches} poisoned batches (random labels)",
        ]


class Clock(TrainerCallback):
    """The optimizer step now running (1-based); faults are keyed on it."""

    def __init__(self) -> None:
        self.step = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.step = state.global_step + 1
        return control


def inject(trainer: Any, plan: FaultPlan, announce: Announce, *, seed: int = 0) -> None:
    """Install the plan's faults into an un-started `trainer` (a transformers `Trainer`)."""
    clock = Clock()
    trainer.add_callback(clock)
    _nan_batch(trainer, clock, plan.nan_step, announce)
    trainer.add_callback(LrJump(trainer, plan.lr_jump_step, announce))
    poison_steps = range(plan.poison_start, plan.poison_start + plan.poison_batches)
    _poisoned_data(trainer, clock, poison_steps, announce, torch.Generator().manual_seed(seed))


def _nan_batch(trainer: Any, clock: Clock, step: int, announce: Announce) -> None:
    original = trainer.compute_loss
    fired: list[int] = []

    def compute_loss(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if clock.step != step or fired:
            return out
        fired.append(step)
        announce(step, "this batch's loss comes out NaN")
        if isinstance(out, tuple):
            return (out[0] * math.nan, *out[1:])
        return out * math.nan

    trainer.compute_loss = compute_loss


class LrJump(TrainerCallback):
    """Multiplies the rate in the optimizer and in the scheduler, so it stays jumped."""

    def __init__(self, trainer: Any, step: int, announce: Announce) -> None:
        self.trainer, self.step, self.announce = trainer, step, announce
        self.fired = False

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step + 1 != self.step or self.fired:
            return control
        self.fired = True
        scheduler, optimizer = self.trainer.lr_scheduler, self.trainer.optimizer
        scheduler.base_lrs = [lr * LR_JUMP for lr in scheduler.base_lrs]
        for group in optimizer.param_groups:
            group["lr"] *= LR_JUMP
        rate = optimizer.param_groups[0]["lr"]
        self.announce(self.step, f"the learning rate jumps x{LR_JUMP:g}, to {rate:.3g}")
        return control


def _poisoned_data(trainer: Any, clock: Clock, steps: range, announce: Announce, generator: Any) -> None:
    original = trainer.training_step
    poisoned: set[tuple[int, ...]] = set()
    first_pass: set[int] = set()

    def training_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        key = tuple(int(t) for t in inputs["input_ids"][0].tolist())
        if clock.step in steps and clock.step not in first_pass:
            first_pass.add(clock.step)  # the first pass through the burst decides which batches are bad
            poisoned.add(key)
        if key in poisoned:
            announce(clock.step, "a poisoned batch (random labels)")
            shape = inputs["labels"].shape
            labels = torch.randint(0, int(model.config.vocab_size), shape, generator=generator)
            inputs = {**inputs, "labels": labels}
        return original(model, inputs, *args, **kwargs)

    trainer.training_step = training_step
