"""Extra saves on the watcher's own schedule, so rollbacks stay short whatever `save_steps` is.

A rollback can only go back to a certified checkpoint, and a checkpoint certifies `certify_after`
steps after it was saved: with the Trainer saving every 500 steps a rollback may recompute 500
or more. `checkpoint_every` asks the Trainer for a save every N steps as well; the Certifier
treats those saves like any other (pending, certified, rotated under the user's limit).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


class SaveCadence(TrainerCallback):
    """Sets `control.should_save` every `every` optimizer steps, on top of the Trainer's schedule."""

    def __init__(self, every: int) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a whole number >= 1, got {every!r}")
        self.every = every

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if int(state.global_step) % self.every == 0:
            control.should_save = True
        return control
