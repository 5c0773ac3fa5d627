"""What a rollback needs from the per-step callback: the request, and a learning-rate change that
really takes effect on resume."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RollbackRequest:
    step: int  # where the run stopped
    onset: int  # where the trouble began: roll back to a certified checkpoint before it
    reason: str


def scale_lr(optimizer: Any, scheduler: Any, factor: float) -> None:
    """Multiply the learning rate the run will really use from now on.

    Resuming restores the optimizer's `lr`/`initial_lr` and the scheduler's `base_lrs` from the
    checkpoint, so changing `args.learning_rate` does nothing; these are what must change.
    """
    if factor == 1.0 or optimizer is None:
        return
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
