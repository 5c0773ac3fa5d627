"""The heal round's `Trainer`: the plain Hugging Face Trainer with the barrier in `compute_loss`.

The barrier lives in `compute_loss` so that everything that calls it (the Trainer's own
`training_step`, watch's preflight, its OOM split) trains the same objective. The optimizer is the
Trainer's AdamW over the trainable parameters, which are the new adapter's only (so `wd` mode's
weight decay, set in the training arguments, reaches nothing else). Each micro-batch's
per-example terms are kept so the round table can show nll and divergence per optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from trainmedic.heal.adapters import original_model
from trainmedic.heal.expectations import StepRow
from trainmedic.heal.loss import KL_MODES, Divergence, heal_loss


class HealTrainer(Trainer):
    """`compute_loss` = mean over examples of `nll + lam * relu(D - tau)`, D against the original."""

    # compute_loss returns the micro-batch mean; the Trainer must still divide by accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        divergence: Divergence,
        lam: float,
        tau: float,
        frozen: list[torch.nn.Parameter],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # our loss ignores num_items_in_batch
        self.divergence: Divergence = divergence
        self.lam, self.tau = lam, tau
        self.frozen = frozen
        self.rows: dict[int, StepRow] = {}  # by step: after a rollback the rerun step wins
        self._micro: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        labels = inputs["labels"]
        forward = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
        outputs = model(**forward)
        ref_logits = None
        if self.divergence in KL_MODES:
            peft_model = self.accelerator.unwrap_model(self.model)
            with original_model(peft_model, self.frozen):
                ref_logits = peft_model(**forward).logits
        parts = heal_loss(
            outputs.logits, labels, mode=self.divergence, lam=self.lam, tau=self.tau, ref_logits=ref_logits
        )
        if model.training:
            self._micro.append((parts.nll, parts.divergence, parts.per_example, parts.fired))
        return (parts.loss, outputs) if return_outputs else parts.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.rows:
            last = self.rows[max(self.rows)]
            logs.update(
                {"heal/nll": last.nll, "heal/divergence": last.divergence, "heal/barrier_fired": last.fired}
            )
        super().log(logs, start_time)

    # -- the step table: filled by StepTable at the step's edges ---------------------------------
    def begin_step(self) -> None:
        self._micro = []  # drops whatever the preflight computed before the first step

    def end_step(self, step: int, grad_norm: float | None, seconds: float | None) -> None:
        if not self._micro:
            return
        nll, div, loss, fired = (torch.cat([m[i] for m in self._micro]).float() for i in range(4))
        self.rows[step] = StepRow(
            step=step,
            nll=float(nll.mean()),
            divergence=float(div.mean()),
            loss=float(loss.mean()),
            grad_norm=grad_norm,
            fired=float(fired.mean()),
            examples=int(nll.numel()),
            seconds=seconds,
        )
        self._micro = []


class StepTable(TrainerCallback):
    """Closes each step's row with the grad norm the watcher measured (pre-clip, fp32).

    It must run after the watcher's own `on_step_end`; `watch` puts its callback first.
    """

    def __init__(self, trainer: HealTrainer, vitals: Any) -> None:
        self.trainer = trainer
        self.vitals = vitals

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.trainer.begin_step()
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        last = self.vitals.last
        mine = last is not None and last.step == state.global_step
        self.trainer.end_step(
            state.global_step, last.grad_norm if mine else None, last.time if mine else None
        )
        return control
