"""Keep the Trainer's own logged metrics true after a treated step.

The Trainer sums each step's loss into one on-device running total (`trainer._tr_loss`) and logs
its mean every `logging_steps`; `grad_norm` is the last step's norm. A step whose update the
watcher skipped (a NaN loss, a poisoned batch) would otherwise put its loss into that mean, and a
NaN stays there for ever (the Trainer resets the total with `tr_loss -= tr_loss`), so every
`report_to` logger and `train_loss` would show NaN for a run the watcher healed.

`AppliedWindow` counts the losses of the updates that were applied since the Trainer last logged
(host floats the watcher already has: no extra device sync) and, while the window holds a treated
step, rewrites the running total to `mean of applied losses x steps in the window`. The logged
mean is then exactly the applied steps' mean. A treated step's grad norm tensor, which the Trainer
logs as is, takes the last applied update's norm. What was treated shows in `trainmedic/*` metrics.
"""

from __future__ import annotations

import math
from typing import Any


class AppliedWindow:
    """The applied updates of the current logging window (reset when the Trainer logs)."""

    def __init__(self) -> None:
        self.applied_sum = 0.0
        self.applied_n = 0
        self.treated = 0
        self.treated_loss_max: float | None = None  # the largest finite loss of a treated step
        self.last_applied_loss: float | None = None
        self.last_applied_norm: float | None = None

    def reset(self) -> None:
        """The Trainer logged (or a new `train()` began): a new window starts."""
        self.applied_sum, self.applied_n, self.treated = 0.0, 0, 0
        self.treated_loss_max = None

    def applied(self, loss: float | None, norm: float | None) -> None:
        if loss is not None and math.isfinite(loss):
            self.applied_sum += loss
            self.applied_n += 1
            self.last_applied_loss = loss
        if norm is not None and math.isfinite(norm):
            self.last_applied_norm = norm

    def skipped(self, loss: float | None, logged_norm: Any) -> None:
        """A step whose update was skipped; `logged_norm` is the tensor the Trainer will log."""
        self.treated += 1
        if loss is not None and math.isfinite(loss):
            self.treated_loss_max = (
                loss if self.treated_loss_max is None else max(self.treated_loss_max, loss)
            )
        if logged_norm is not None and hasattr(logged_norm, "fill_"):
            logged_norm.fill_(self.last_applied_norm if self.last_applied_norm is not None else 0.0)

    def repair(self, trainer: Any, global_step: int) -> bool:
        """At the end of a step: rewrite the Trainer's running loss while the window holds a treated
        step. Returns False when there is nothing to do or the Trainer keeps no such total."""
        if not self.treated:
            return False
        total = getattr(trainer, "_tr_loss", None)
        last_logged = getattr(trainer, "_globalstep_last_logged", None)
        if total is None or not hasattr(total, "fill_") or not isinstance(last_logged, int):
            return False
        if self.applied_n:
            mean = self.applied_sum / self.applied_n
        elif self.last_applied_loss is not None:
            mean = self.last_applied_loss
        else:
            return False  # nothing applied yet in this run: no true value to show
        total.fill_(mean * max(global_step - last_logged, 0))
        return True

    def metrics(self) -> dict[str, float]:
        """What was treated in this window, for the Trainer's logs."""
        out = {"trainmedic/treated_steps": float(self.treated)}
        if self.treated_loss_max is not None:
            out["trainmedic/treated_loss_max"] = self.treated_loss_max
        return out
