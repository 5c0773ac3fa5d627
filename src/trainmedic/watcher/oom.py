"""Out of memory inside a training step: split the micro-batch and go on, without a restart.

`OomGuard` wraps a Trainer's `training_step`. When a micro-batch runs out of memory it frees what
it can, throws away whatever part of that micro-batch's gradient the failed backward had already
added, splits the micro-batch in two along the batch dimension and accumulates the halves, so the
optimizer step sees the same gradient and the same effective batch (Composer's approach). The
split is remembered: later micro-batches are cut the same way up front, so the OOM is paid once.
A piece that still fails is halved again, down to single examples.

What makes the halves add up to the whole is how the Trainer scales the loss:
- normalised by `num_items_in_batch` (a token count over the whole optimizer step): each half's
  loss is its own token sum over that same count, so the halves simply add;
- otherwise a per-micro-batch mean divided by the accumulation steps: each half's mean is weighted
  by its share of the micro-batch, in label tokens when the labels are per token (what a causal
  LM averages over), else in examples.

Throwing away a partial gradient: a backward that fails midway has already accumulated into some
parameters and not into others. Before each piece the guard copies the trainable gradients that
earlier micro-batches left (none at the first micro-batch of a step: then it just resets them to
`None`, free and exact) and copies them back on failure. For LoRA that copy is tiny; for full
fine-tuning it is a whole gradient, just when memory is short, so above `snapshot_limit_bytes`
the guard copies nothing and instead watches which parameters received a gradient: a failure
before any did (the forward, or early in the backward) is still split exactly; one after is
reported as not recoverable rather than trained on with a corrupted gradient.

When splitting cannot help (a single example, inputs with no batch dimension, a gradient that
cannot be restored) the guard raises `OomNotRecoverable`; the supervisor then rolls back and
resumes with `fallback_args(args)`: a smaller per-device batch and more accumulation steps.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch

from trainmedic.watcher.events import Action

logger = logging.getLogger("trainmedic")

# Lower-cased fragments of the messages allocators raise (CUDA/HIP/XPU/MPS, CPU on Linux and Windows,
# cuBLAS/cuDNN workspaces); torch.OutOfMemoryError is recognised by type.
OOM_MARKERS = (
    "out of memory",
    "can't allocate memory",
    "not enough memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
)
SMALLER_EXAMPLES = (
    "shorten the sequences (max_length), turn on gradient checkpointing, or train a smaller model"
)
IGNORE_INDEX = -100  # the label value losses skip, as in transformers
Weighting = Literal["auto", "tokens", "examples"]
Range = tuple[int, int, int]  # start, stop, split factor the piece belongs to


class OomNotRecoverable(RuntimeError):
    """Splitting cannot get this micro-batch through; roll back and resume with `fallback`."""

    def __init__(
        self, message: str, *, step: int, micro_batch: int | None, split: int, fallback: dict[str, int] | None
    ) -> None:
        super().__init__(message)
        self.step = step
        self.micro_batch = micro_batch
        self.split = split
        self.fallback = fallback


def is_oom(exc: BaseException) -> bool:
    """True for an allocator's out-of-memory error (GPU or CPU), not for `OomNotRecoverable`."""
    if isinstance(exc, OomNotRecoverable):
        return False
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in OOM_MARKERS)


def fallback_args(args: Any) -> dict[str, int]:
    """Training arguments for a rollback-and-resume with a smaller micro-batch and the same
    effective batch: the per-device batch divided by its smallest prime factor (halved when even)
    and the accumulation steps multiplied by it, so their product is unchanged."""
    batch = int(args.per_device_train_batch_size)
    accumulation = int(args.gradient_accumulation_steps)
    if batch <= 1:
        raise ValueError(
            f"per_device_train_batch_size is already 1, no smaller micro-batch: {SMALLER_EXAMPLES}"
        )
    factor = next(p for p in range(2, batch + 1) if batch % p == 0)
    return {
        "per_device_train_batch_size": batch // factor,
        "gradient_accumulation_steps": accumulation * factor,
    }


def free_memory() -> None:
    """Release what the failed piece left behind: unreachable tensors, then the allocator's cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


class OomGuard:
    """Splits micro-batches that run out of memory; `attach(trainer)` installs it.

    `split` is the number of pieces every micro-batch is cut into (1 until the first OOM);
    `on_action` receives an `Action(step, "oom_split", ...)` for each OOM survived.
    """

    def __init__(
        self,
        on_action: Callable[[Action], None] | None = None,
        *,
        snapshot_limit_bytes: int | None = 1 << 30,
        weighting: Weighting = "auto",
    ) -> None:
        self.on_action = on_action
        self.snapshot_limit_bytes = snapshot_limit_bytes
        self.weighting: Weighting = weighting
        self.split = 1
        self.ooms = 0
        self.actions: list[Action] = []
        self._trainer: Any = None
        self._previous: Any = None
        self._had_own = False
        self._last_error = ""
        self._wrapper: Callable[..., torch.Tensor] | None = None
        self._params: list[torch.nn.Parameter] | None = None
        self._hooks: list[Any] = []
        self._touched = False

    # -- wiring ----------------------------------------------------------------------------------
    def attach(self, trainer: Any) -> OomGuard:
        """Wrap `trainer.training_step` (whatever is installed now) with the guard."""
        self._trainer = trainer
        self._previous = trainer.training_step
        self._had_own = "training_step" in vars(trainer)

        def training_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            return self._guarded(model, inputs, args, kwargs)

        self._wrapper = training_step
        trainer.training_step = training_step
        return self

    def detach(self) -> None:
        """Put back the `training_step` found at `attach` and drop the gradient hooks."""
        trainer = self._trainer
        if trainer is not None and vars(trainer).get("training_step") is self._wrapper:
            if self._had_own:
                trainer.training_step = self._previous
            else:
                del trainer.training_step
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def state_dict(self) -> dict[str, int]:
        return {"split": self.split, "ooms": self.ooms}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the learned split on resume, so a resumed run does not hit the same OOM again."""
        self.split = max(1, int(state.get("split", 1)))
        self.ooms = int(state.get("ooms", 0))

    # -- the step --------------------------------------------------------------------------------
    def _guarded(
        self, model: Any, inputs: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> torch.Tensor:
        size = _batch_size(inputs)
        if not size or getattr(self._trainer, "is_deepspeed_enabled", False):
            # nothing to split, or DeepSpeed, which accumulates gradients (and counts micro-batches)
            # inside its engine, out of the guard's reach: an OOM raises OomNotRecoverable
            loss = self._attempt(model, inputs, args, kwargs, share=1.0, rows=0, size=None, last=True)
            assert loss is not None
            return loss
        num_items = args[0] if args else kwargs.get("num_items_in_batch")
        counts = None if self._sum_normalised(num_items) else self._counter(inputs, size)
        pending = deque(r for r in _ranges(0, size, self.split, self.split) if _weight(counts, r))
        total: torch.Tensor | None = None
        while pending:
            start, stop, factor = pending.popleft()
            piece = inputs if (start, stop) == (0, size) else _slice(inputs, start, stop, size)
            share = _weight(counts, (start, stop, factor))
            loss = self._attempt(
                model, piece, args, kwargs, share=share, rows=stop - start, size=size, last=not pending
            )
            del piece
            if loss is None:  # out of memory: cut this piece in two, and any as large still waiting
                self.split = max(self.split, 2 * factor)
                self._report(size, stop - start)
                parts = [
                    s
                    for r in [(start, stop, factor), *pending]
                    for s in _ranges(r[0], r[1], self.split // r[2], self.split)
                ]
                pending = deque(r for r in parts if _weight(counts, r))
                free_memory()
                continue
            total = loss if total is None else total + loss
        assert total is not None  # at least one piece has a nonzero share
        return total

    def _attempt(
        self,
        model: Any,
        piece: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        share: float,
        rows: int,
        size: int | None,
        last: bool,
    ) -> torch.Tensor | None:
        """Run one piece. On OOM put the gradients back as they were and return None, or raise
        `OomNotRecoverable` when halving is not possible."""
        params = self._trainable(model)
        saved = self._save(params)
        sync = contextlib.nullcontext() if last else self._no_sync(model)
        try:
            with sync, _scaled_loss(self._trainer, share):
                loss: torch.Tensor = self._previous(model, piece, *args, **kwargs)
            return loss
        except BaseException as exc:
            if not is_oom(exc):
                raise
            if not self._restore(params, saved):
                why = (
                    "the backward had already added part of this micro-batch's gradient to those of "
                    "earlier micro-batches, which are too large to copy (snapshot_limit_bytes), so the "
                    "step cannot be finished exactly"
                )
                raise self._hopeless(exc, size, why) from exc
            if size is None:
                why = "this micro-batch cannot be split (no batch dimension found, or DeepSpeed)"
                raise self._hopeless(exc, size, why) from exc
            if rows <= 1:
                cut = f", already cut into {self.split} pieces" if self.split > 1 else ""
                why = f"a single example does not fit (micro-batch of {size}{cut})"
                raise self._hopeless(exc, size, why, smaller_batch_helps=False) from exc
            self._last_error = _short(exc)
            _no_second_buffer_sync(model)
        return None

    # -- gradients -------------------------------------------------------------------------------
    def _trainable(self, model: Any) -> list[torch.nn.Parameter]:
        if self._params is None:
            self._params = [p for p in model.parameters() if p.requires_grad]
        return self._params

    def _save(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor | None] | None:
        """What `_restore` needs: the prior gradients (None = there were none), or None when they
        are too large to copy, in which case the touched-parameter hooks stand in."""
        grads = [p.grad for p in params]
        self._touched = False
        if all(g is None for g in grads):
            return [None] * len(grads)
        nbytes = sum(g.numel() * g.element_size() for g in grads if g is not None)
        if self.snapshot_limit_bytes is not None and nbytes > self.snapshot_limit_bytes:
            if not self._hooks:
                self._hooks = [p.register_post_accumulate_grad_hook(self._touch) for p in params]
            return None
        return [None if g is None else g.detach().clone() for g in grads]

    def _touch(self, param: torch.Tensor) -> None:
        self._touched = True

    def _restore(self, params: list[torch.nn.Parameter], saved: list[torch.Tensor | None] | None) -> bool:
        """Put the gradients back as they were before the failed piece; False if that is impossible."""
        if saved is None:
            return not self._touched
        for p, g in zip(params, saved, strict=True):
            if g is None:
                p.grad = None
            elif p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)  # in place: a DDP bucket view must stay the same tensor
        return True

    # -- loss scaling ----------------------------------------------------------------------------
    def _sum_normalised(self, num_items: Any) -> bool:
        """Mirror `Trainer.training_step`: is the loss already normalised over the whole step?"""
        trainer = self._trainer
        declared = getattr(trainer, "loss_is_scaled_for_ga", None)
        if declared is not None:
            return bool(declared)
        accepts = bool(getattr(trainer, "model_accepts_loss_kwargs", False))
        return (accepts and num_items is not None) or getattr(trainer, "compute_loss_func", None) is not None

    def _counter(self, inputs: Mapping[str, Any], size: int) -> torch.Tensor:
        """What each example weighs in the micro-batch's mean loss: its label tokens when the labels
        are per token (a token mean), else 1 (a mean over examples)."""
        ones = torch.ones(size, dtype=torch.long)
        if self.weighting == "examples":
            return ones
        labels = inputs.get("shift_labels")
        if labels is None:
            labels = inputs.get("labels")
            if isinstance(labels, torch.Tensor) and getattr(self._trainer, "_loss_shifts_labels", False):
                labels = labels[..., 1:]
        if not isinstance(labels, torch.Tensor) or labels.ndim < 2 or labels.shape[0] != size:
            if self.weighting == "tokens":
                raise ValueError("OomGuard(weighting='tokens') needs per-token `labels` in the inputs")
            return ones
        per_example = labels.ne(IGNORE_INDEX).flatten(1).sum(dim=1).cpu()
        return per_example if int(per_example.sum()) > 0 else ones

    def _no_sync(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        """Pieces before the last accumulate locally, so a split step syncs once, like an unsplit one."""
        accelerator = getattr(self._trainer, "accelerator", None)
        if accelerator is None or not getattr(accelerator, "sync_gradients", False):
            return contextlib.nullcontext()
        ctx: contextlib.AbstractContextManager[Any] = accelerator.no_sync(model=model)
        return ctx

    # -- reporting -------------------------------------------------------------------------------
    def _step(self) -> int:
        state = getattr(self._trainer, "state", None)
        return int(getattr(state, "global_step", 0)) + 1

    def _report(self, size: int, rows: int) -> None:
        self.ooms += 1
        step = self._step()
        reason = (
            f"out of memory on {rows} of the {size} examples of a micro-batch: memory freed, their partial "
            f"gradient dropped; they run again in pieces of at most {math.ceil(rows / 2)} that add up to the "
            f"same gradient and effective batch; later micro-batches are cut into {self.split} up front"
        )
        detail = {"split": self.split, "micro_batch": size, "failed_rows": rows, "error": self._last_error}
        action = Action(step, "oom_split", reason, detail)
        self.actions.append(action)
        if self.on_action is not None:
            self.on_action(action)
        else:
            logger.warning("[trainmedic] step %d: OOM_SPLIT (%s)", step, reason)

    def _hopeless(
        self, exc: BaseException, size: int | None, why: str, *, smaller_batch_helps: bool = True
    ) -> OomNotRecoverable:
        """The error for the supervisor: with `fallback` arguments when a smaller per-device batch
        can help (not when one example alone does not fit: a smaller batch still holds one)."""
        step = self._step()
        args = getattr(self._trainer, "args", None)
        try:
            fallback = fallback_args(args) if args is not None and smaller_batch_helps else None
        except ValueError:
            fallback = None
        then = SMALLER_EXAMPLES
        if fallback:
            then = f"roll back and resume with {fallback}; if one example still does not fit, {then}"
        message = (
            f"out of memory at step {step} and splitting cannot help: {why}. Next: {then}. ({_short(exc)})"
        )
        return OomNotRecoverable(message, step=step, micro_batch=size, split=self.split, fallback=fallback)


def _no_second_buffer_sync(model: Any) -> None:
    """Keep the ranks' collectives in step after an OOM on one rank only.

    DDP broadcasts the module buffers (rotary tables, norms' statistics) at the start of a forward
    that follows a synchronised one, and the failed forward already did: the other ranks, which
    ran this micro-batch once, broadcast once. Re-running its pieces must not broadcast again, or
    the extra broadcast pairs with another rank's gradient all-reduce and every rank waits forever.
    The last piece's backward still syncs the gradients once, like an unsplit micro-batch.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model.require_forward_param_sync = False


@contextlib.contextmanager
def _scaled_loss(trainer: Any, share: float) -> Iterator[None]:
    """Weight a piece's mean loss by its share of the micro-batch, where the Trainer computes it."""
    if share == 1.0 or trainer is None:
        yield
        return
    own = "compute_loss" in vars(trainer)
    previous = trainer.compute_loss

    def compute_loss(*args: Any, **kwargs: Any) -> Any:
        out = previous(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] * share, *out[1:])
        return out * share

    trainer.compute_loss = compute_loss
    try:
        yield
    finally:
        if own:
            trainer.compute_loss = previous
        else:
            del trainer.compute_loss


def _batch_size(inputs: Any) -> int | None:
    """The micro-batch size: the first dimension of `input_ids`, else of the first tensor."""
    if not isinstance(inputs, Mapping):
        return None
    first = inputs.get("input_ids")
    if not isinstance(first, torch.Tensor) or first.ndim == 0:
        first = next((v for v in inputs.values() if isinstance(v, torch.Tensor) and v.ndim > 0), None)
    return None if first is None else int(first.shape[0])


def _slice(inputs: Mapping[str, Any], start: int, stop: int, size: int) -> dict[str, Any]:
    """Rows `start:stop` of every tensor whose first dimension is the batch; the rest as is."""
    return {
        k: v[start:stop] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == size else v
        for k, v in inputs.items()
    }


def _ranges(start: int, stop: int, parts: int, factor: int) -> list[Range]:
    """`start:stop` cut into `parts` contiguous pieces of near-equal size (never empty)."""
    n = stop - start
    parts = max(1, min(parts, n))
    bounds = [start + (n * i) // parts for i in range(parts + 1)]
    return [(a, b, factor) for a, b in itertools.pairwise(bounds) if b > a]


def _weight(counts: torch.Tensor | None, r: Range) -> float:
    """The piece's share of the micro-batch's mean loss (1.0 when the losses simply add); a piece
    with no label token weighs 0 and is not run (its mean would be 0/0)."""
    if counts is None:
        return 1.0
    return int(counts[r[0] : r[1]].sum()) / int(counts.sum())


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text[:300]
