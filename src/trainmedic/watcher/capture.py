"""Where the Trainer computes what the watcher needs, a thin wrapper on the trainer instance.

Callbacks never see the raw per-micro-batch loss (only a windowed, NaN-filtered mean at logging
steps), so the loss is taken from `training_step` itself, kept on the device (no extra sync per
micro-batch), and summed into the optimizer step's loss. The same wiring hands trainmedic's
metrics to the Trainer's own logs, computes the fp32 gradient norm once where the Trainer asks for
it, and drops the data window a rollback skips.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from trainmedic.watcher.grads import grads_of, total_norm

if TYPE_CHECKING:
    from trainmedic.watcher.vitals import Vitals


def wire(vitals: Vitals, trainer: Any) -> None:
    """Wrap `trainer`'s training_step, log, _get_grad_norm and get_batch_samples for `vitals`."""
    original_step = trainer.training_step
    original_log = trainer.log
    original_norm = getattr(trainer, "_get_grad_norm", None)

    def training_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = original_step(model, inputs, *args, **kwargs)
        detached = loss.detach().float().reshape(())
        vitals._loss = detached if vitals._loss is None else vitals._loss + detached
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        if isinstance(mask, torch.Tensor):
            n = mask.sum()
            vitals._tokens = n if vitals._tokens is None else vitals._tokens + n
        vitals._collect_trl_metrics(trainer)
        return loss

    def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs or "train_loss" in logs:
            logs.update(vitals.metrics())
        original_log(logs, *args, **kwargs)
        if "loss" in logs:
            vitals.window.reset()  # the Trainer drained its running loss into this log

    def get_grad_norm(model: Any, grad_norm: Any = None) -> Any:
        # With the Trainer's clipping off it computes the norm only to log it: compute ours
        # (fp32, over the trainable parameters) once, and let it log that.
        if grad_norm is not None or original_norm is None or vitals._params is None:
            return original_norm(model, grad_norm=grad_norm) if original_norm is not None else grad_norm
        vitals._unscale_fp16()
        vitals._norm = total_norm(grads_of(vitals._params))
        return vitals._norm

    original_batches = getattr(trainer, "get_batch_samples", None)

    def get_batch_samples(epoch_iterator: Any, num_batches: int, *args: Any, **kwargs: Any) -> Any:
        # after a rollback, drop the micro-batches that led to the trouble (PaLM's recipe); a
        # window that runs past the end of the epoch goes on at the start of the next one
        while vitals.skip_batches > 0:
            try:
                next(epoch_iterator)
            except StopIteration:
                break
            vitals.skip_batches -= 1
        return original_batches(epoch_iterator, num_batches, *args, **kwargs)  # type: ignore[misc]

    trainer.training_step = training_step
    trainer.log = log
    if original_batches is not None:
        trainer.get_batch_samples = get_batch_samples
    if original_norm is not None:
        trainer._get_grad_norm = get_grad_norm
