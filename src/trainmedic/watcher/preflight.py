"""Preflight: the first batches through forward and backward, before the long run starts.

A shape, dtype or data error, a NaN loss, a gradient that reaches no trainable parameter or a
batch that does not fit in memory should cost seconds, not the minutes a real run takes to get
there. The batches come from the trainer's own train dataloader and go through its own
`compute_loss` (so TRL's losses are exercised) and `backward()`; no optimizer or scheduler is
created or stepped, and all that was touched is put back: `.grad`, buffers, train/eval mode, RNG
states, the trainer's plain bookkeeping (TRL's metrics, token counters), the accelerator's loaders.

Not `training_step`: it backpropagates through `accelerator.backward` (under DeepSpeed that needs
the engine `train()` builds; under fp16 it goes through the grad scaler), and `watch` wraps it to
capture losses, so the preflight's would leak into the first step's vitals. The path here is
`training_step` without those. DeepSpeed/FSDP shard the model only inside `train()`: there it declines.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import random
import resource
import sys
import time
from collections.abc import Mapping, Sequence, Sized
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainmedic.watcher.events import Event, finite_or_none
from trainmedic.watcher.grads import grads_of, total_norm

KINDS = ("data", "shape", "dtype", "nonfinite", "no_gradient", "memory", "error")  # by the fix each needs
_PLAIN_CHARS = 1_000_000  # larger plain data on the trainer is neither copied nor restored
_NOT_PLAIN = object()


@dataclass
class BatchMeasure:
    """One preflight batch: its loss, fp32 gradient norm, wall time and memory."""

    index: int
    loss: float | None
    grad_norm: float | None
    seconds: float
    peak_memory_mb: float | None
    extra_memory_mb: float | None  # how far the batch pushed memory above where it started
    supervised_tokens: int | None = None


@dataclass
class PreflightReport:
    """What the preflight found. `ok` is False when any problem was found; nothing is raised."""

    ok: bool
    problems: list[tuple[str, str]] = field(default_factory=list)  # (kind, message)
    batches: list[BatchMeasure] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    memory: str = ""  # what peak_memory_mb / extra_memory_mb measure on this device
    seconds: float = 0.0
    skipped: str | None = None

    @property
    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.problems]

    @property
    def losses(self) -> list[float | None]:
        return [b.loss for b in self.batches]

    def summary(self) -> str:
        if self.skipped:
            return f"preflight skipped: {self.skipped}"
        if self.problems:
            listed = "; ".join(f"[{kind}] {message}" for kind, message in self.problems)
            return f"preflight found {len(self.problems)} problem(s): {listed}"
        peaks = [b.peak_memory_mb for b in self.batches if b.peak_memory_mb is not None]
        peak = f", peak memory {max(peaks):.0f} MB" if peaks else ""
        return (
            f"preflight ok: {len(self.batches)} batch(es), loss {_fmt(self.losses)}, "
            f"grad norm {_fmt([b.grad_norm for b in self.batches])}, "
            f"{_fmt([b.seconds for b in self.batches])} s/batch{peak}; "
            f"{self.trainable_params:,} of {self.total_params:,} parameters trainable"
        )

    def events(self) -> list[Event]:
        """The problems as watch events (step 0, severity fail), for the run log and the result."""
        evidence = {
            "losses": [finite_or_none(b.loss) for b in self.batches],
            "norms": [finite_or_none(b.grad_norm) for b in self.batches],
        }
        return [Event(0, f"preflight_{kind}", "fail", message, evidence) for kind, message in self.problems]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (strict): a non-finite loss or norm is null and named in the batch's `nonfinite`."""
        rows = [
            asdict(b) | {"loss": finite_or_none(b.loss), "grad_norm": finite_or_none(b.grad_norm)}
            for b in self.batches
        ]
        for row, b in zip(rows, self.batches, strict=True):
            row["nonfinite"] = [
                k for k in ("loss", "grad_norm") if getattr(b, k) is not None and row[k] is None
            ]
        problems = [{"kind": k, "message": m} for k, m in self.problems]
        return {"schema_version": 1, **asdict(self), "problems": problems, "batches": rows}


def preflight(trainer: Any, *, batches: int = 2) -> PreflightReport:
    """Forward and backward on the first `batches` training batches; the model is left untouched.

    Ordinary problems (bad data, shape/dtype errors, NaN, no gradient, out of memory) are
    reported in the returned `PreflightReport`, never raised. KeyboardInterrupt and SystemExit
    propagate, after the model's state has been put back.
    """
    if batches < 1:
        raise ValueError(f"preflight needs batches >= 1, got {batches}")
    start = time.perf_counter()
    report = PreflightReport(ok=True)
    model = getattr(trainer, "model", None)
    if model is None:
        report.skipped = "the trainer builds its model inside train() (model_init): nothing to check yet"
    elif getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        report.skipped = "DeepSpeed/FSDP shard the model only inside train(): run preflight without them"
    else:
        _Flight(trainer, model, report).run(batches)
    report.ok = not report.problems
    report.seconds = time.perf_counter() - start
    return report


class _Flight:
    """One preflight: the trainer, its model, and the report it fills in."""

    def __init__(self, trainer: Any, model: torch.nn.Module, report: PreflightReport) -> None:
        self.trainer, self.model, self.report, self.problems = trainer, model, report, report.problems
        self.device = torch.device(trainer.args.device)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        report.memory = _MEMORY_CUDA if self.device.type == "cuda" else _MEMORY_CPU
        report.trainable_params = sum(p.numel() for p in self.trainable)
        report.total_params = sum(p.numel() for p in model.parameters())
        if not self.trainable:
            self.problems.append(("no_gradient", _FROZEN.format(n=report.total_params)))

    def run(self, batches: int) -> None:
        snapshot = _Snapshot(self.trainer, self.model)
        loader: Any = (None, None)
        try:
            snapshot.clear_grads()
            self.model.train()
            loader = self._loader()
            iterator = loader[1]
            for i in range(batches if iterator is not None else 0):
                batch, problem = _next_batch(iterator, i)
                if _any_rank(problem is not None, self.device):
                    self.problems.append(problem or ("data", f"another process could not build batch {i}"))
                    break
                if _any_rank(batch is None, self.device):  # the data ran out: fewer batches, nothing wrong
                    break
                fatal = self._batch(batch, i)
                snapshot.clear_grads()
                if fatal:
                    gc.collect()
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                if _any_rank(fatal, self.device):
                    break
        finally:
            _close(*loader)
            touched = snapshot.restore()
        if touched:
            changed = ", ".join(touched[:3])
            self.problems.append(
                ("error", f"the forward pass changed {changed} in place: preflight cannot undo it")
            )

    def _loader(self) -> tuple[Any, Any]:
        """The trainer's own train dataloader and an iterator over it (None, None when it fails)."""
        dataset = getattr(self.trainer, "train_dataset", None)
        if isinstance(dataset, Sized) and len(dataset) == 0:
            self.problems.append(("data", "the training dataset is empty: there is nothing to train on"))
            return None, None
        loader = None
        try:
            loader = self.trainer.get_train_dataloader()
            return loader, iter(loader)
        except Exception as exc:
            self.problems.append(("data", f"could not build the training dataloader: {_say(exc)}"))
            return loader, None

    def _batch(self, batch: Any, i: int) -> bool:
        """Forward, backward, measure into the report. Returns whether the run could not go on."""
        trainer, problems = self.trainer, self.problems
        empty, supervised = _inspect(trainer, batch, i)
        if empty is not None:
            problems.append(("data", empty))
            return True
        if supervised == 0:
            problems.append(("data", _NO_LABELS.format(i=i)))
        peak, t0 = _Peak(self.device), time.perf_counter()
        loss_value: float | None = None
        norm: float | None = None
        fatal = False
        try:
            inputs = trainer._prepare_inputs(batch)
            count = getattr(trainer, "_get_num_items_in_batch", None)
            n_items = count([batch], self.device) if count is not None else None
            offload = getattr(trainer, "maybe_activation_offload_context", None) or contextlib.nullcontext()
            autocast = trainer.accelerator.autocast()
            with torch.enable_grad(), offload, trainer.compute_loss_context_manager(), autocast:
                loss = trainer.compute_loss(self.model, inputs, num_items_in_batch=n_items)
            loss = loss[0] if isinstance(loss, tuple) else loss
            loss = loss.mean() if getattr(trainer.args, "n_gpu", 1) > 1 else loss
            loss_value = float(loss.detach().float())
            backward = bool(self.trainable) and loss.requires_grad
            if self.trainable and not backward:
                problems.append(("no_gradient", _DETACHED.format(i=i)))
            if backward:
                loss.backward()
                grads = grads_of(self.trainable)
                norm = float(total_norm(grads)) if grads else None
            if supervised != 0:  # a batch with no supervised token is already reported: its NaN follows
                self._judge(i, loss_value, norm, backward)
        except Exception as exc:
            problems.append(_classify(exc, i))
            fatal = True
        peak_mb, extra_mb = peak.stop()
        seconds = time.perf_counter() - t0
        self.report.batches.append(BatchMeasure(i, loss_value, norm, seconds, peak_mb, extra_mb, supervised))
        return fatal

    def _judge(self, i: int, loss: float, norm: float | None, backward: bool) -> None:
        problems = self.problems
        if not math.isfinite(loss):
            problems.append(("nonfinite", f"batch {i}: the loss is {loss} before any update"))
        elif norm is not None and not math.isfinite(norm):
            named = self.model.named_parameters()
            bad = [n for n, p in named if p.grad is not None and not p.grad.isfinite().all()]
            where = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            problems.append(("nonfinite", f"batch {i}: the gradient norm is {norm} (non-finite in {where})"))
        if backward and not any(kind == "no_gradient" for kind, _ in problems):
            if norm is None:
                problems.append(("no_gradient", _NO_GRAD.format(i=i)))
            elif norm == 0.0:
                problems.append(("no_gradient", _ZERO_GRAD.format(i=i)))


def _next_batch(iterator: Any, i: int) -> tuple[Any, tuple[str, str] | None]:
    try:
        return next(iterator), None
    except StopIteration:
        return None, ("data", "the training dataloader produced no batches") if i == 0 else None
    except Exception as exc:
        return None, ("data", f"the collator failed while building the first training batches: {_say(exc)}")


def _inspect(trainer: Any, batch: Any, i: int) -> tuple[str | None, int | None]:
    """Why the batch is empty (or None), and how many labels (after the causal shift) are not -100."""
    if not isinstance(batch, Mapping):
        return None, None
    if not batch:
        return _EMPTY.format(i=i), None
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.numel() == 0:
            return f"batch {i} holds no examples: its '{key}' tensor has shape {tuple(value.shape)}", None
    labels = batch.get("shift_labels", batch.get("labels"))
    if not isinstance(labels, torch.Tensor) or labels.dim() == 0:
        return None, None
    if "shift_labels" not in batch and getattr(trainer, "_loss_shifts_labels", False):
        labels = labels[..., 1:]
    return None, int((labels != -100).sum())


_CLASSES = (  # (kind, words in the error, what the message says about it)
    ("data", ("index out of range", "out of bounds"), "a token id beyond the model's vocabulary? {said}"),
    ("data", ("unexpected keyword argument",), "the batch has a column the model does not accept: {said}"),
    ("dtype", ("dtype", "scalar type", "expected floating", "not implemented for"), "wrong type: {said}"),
    ("shape", ("shape", "size", "dimension", "must match", "mat1 and mat2"), "shapes do not fit: {said}"),
)


def _classify(exc: BaseException, i: int) -> tuple[str, str]:
    """Name an exception from forward/backward by what to do about it."""
    text, said = str(exc).lower(), _say(exc)
    if isinstance(exc, torch.OutOfMemoryError | MemoryError) or "out of memory" in text:
        return "memory", _OOM.format(i=i, said=said)
    for kind, words, template in _CLASSES:
        if any(w in text for w in words):
            return kind, f"batch {i}: " + template.format(said=said)
    return "error", f"batch {i}: forward/backward failed: {said}"


def _say(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    ragged = ("expected sequence of length", "unable to create tensor", "inhomogeneous")
    hint = _RAGGED if any(w in text.lower() for w in ragged) else ""
    return f"{type(exc).__name__}: {text}{hint}"


class _Snapshot:
    """What a forward/backward may change, taken before the preflight and put back after it."""

    def __init__(self, trainer: Any, model: torch.nn.Module) -> None:
        self.trainer = trainer
        self.rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.modes = [(m, m.training) for m in model.modules()]
        self.named = list(model.named_parameters())
        self.grads = [p.grad for _, p in self.named]
        self.versions = [_version(p) for _, p in self.named]
        self.buffers = [(m, dict(m._buffers)) for m in model.modules()]
        self.values = [
            (b, _version(b), b.detach().clone()) for _, d in self.buffers for b in d.values() if b is not None
        ]
        self.attrs = {k: (v, _plain_copy(v)) for k, v in vars(trainer).items()}
        self.loaders = list(getattr(getattr(trainer, "accelerator", None), "_dataloaders", None) or [])

    def clear_grads(self) -> None:
        for _, p in self.named:
            p.grad = None

    def restore(self) -> list[str]:
        """Put everything back; returns the parameters changed in place (which cannot be undone)."""
        for (_, p), grad in zip(self.named, self.grads, strict=True):
            p.grad = grad
        for module, training in self.modes:
            module.training = training
        with torch.no_grad():
            for module, buffers in self.buffers:
                module._buffers.clear()
                module._buffers.update(buffers)
            for buffer, version, value in self.values:
                if _version(buffer) != version:
                    buffer.copy_(value)
        self._restore_trainer()
        random.setstate(self.rng[0])
        np.random.set_state(self.rng[1])
        torch.set_rng_state(self.rng[2])
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        return [n for (n, p), v in zip(self.named, self.versions, strict=True) if _version(p) != v]

    def _restore_trainer(self) -> None:
        state = vars(self.trainer)
        for key in [k for k in state if k not in self.attrs]:
            del state[key]  # caches the preflight created; train() creates them again
        for key, (original, saved) in self.attrs.items():
            if saved is _NOT_PLAIN:
                state[key] = original
            elif isinstance(original, dict | list):  # in place: others may hold a reference to it
                original.clear()
                (original.update if isinstance(original, dict) else original.extend)(copy.deepcopy(saved))
                state[key] = original
            else:
                state[key] = saved
        loaders = getattr(getattr(self.trainer, "accelerator", None), "_dataloaders", None)
        if isinstance(loaders, list):
            loaders[:] = self.loaders


def _plain_copy(value: Any) -> Any:
    """A deep copy of numbers, strings and small dicts/lists of them (TRL's metrics); else a marker."""
    try:
        small = len(json.dumps(value)) <= _PLAIN_CHARS  # only plain data serialises
    except (TypeError, ValueError):
        return _NOT_PLAIN
    return copy.deepcopy(value) if small else _NOT_PLAIN


def _version(t: torch.Tensor) -> int:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors keep no version counter
        return -1


def _close(loader: Any, iterator: Any) -> None:
    """Stop the half-read loader: accelerate counts a loader as active until it is exhausted."""
    for obj, method in ((iterator, "close"), (loader, "end")):
        with contextlib.suppress(Exception):
            getattr(obj, method, lambda: None)()


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Agree over all processes, so every rank stops at the same batch and none waits forever."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class _Peak:
    """Peak memory over one batch: torch's own counter on CUDA, the process high-water mark on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.cuda = device, device.type == "cuda" and torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.before = self._read(torch.cuda.memory_allocated)

    def stop(self) -> tuple[float, float]:
        peak = self._read(torch.cuda.max_memory_allocated)
        return peak, max(peak - self.before, 0.0)

    def _read(self, counter: Any) -> float:
        if not self.cuda:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
        torch.cuda.synchronize(self.device)
        return float(counter(self.device)) / 2**20


_MEMORY_CUDA = "CUDA: peak memory torch allocated during the batch (torch's peak counter is reset)"
_MEMORY_CPU = (
    "CPU: the process's peak resident memory (ru_maxrss) after the batch; extra is how far the batch "
    "raised that high-water mark, a lower bound on what it needed"
)
_FROZEN = (
    "no parameter is trainable (requires_grad is False on all {n:,}): the run would change nothing. "
    "Attach the adapter (e.g. peft.get_peft_model) or unfreeze the layers to train"
)
_NO_GRAD = "batch {i}: no gradient reached any trainable parameter: the forward never uses them"
_ZERO_GRAD = "batch {i}: the gradient is exactly zero on every trainable parameter: no update would move them"
_DETACHED = "batch {i}: the loss has no grad_fn (no trainable parameter in its graph, or made under no_grad)"
_NO_LABELS = (
    "batch {i} has no supervised tokens: every label is -100, so its loss is NaN or 0 and it teaches "
    "nothing (prompts longer than max_length, or a completion-only mask that hides everything?)"
)
_OOM = (
    "batch {i} ran out of memory ({said}): the run would fail at its first step. Lower per_device_train_"
    "batch_size (and raise gradient_accumulation_steps), shorten max_length, or use gradient checkpointing"
)
_RAGGED = (
    " (the examples have different lengths and the collator does not pad them: pad or truncate them"
    " to one length, or use a padding collator such as DataCollatorWithPadding)"
)
_EMPTY = "batch {i} is empty: no column reached the model (rename them or set remove_unused_columns=False)"


def _fmt(values: Sequence[float | None]) -> str:
    return "/".join("-" if v is None else f"{v:.4g}" for v in values) or "-"
