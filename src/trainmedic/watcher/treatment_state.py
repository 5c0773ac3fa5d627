"""The watcher's treatment state saved beside each checkpoint, so a rollback or a resume carries
on with the same ZClip statistics, budgets, learning-rate scale, skipped data and OOM split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from trainmedic.fsutil import atomic_write
from trainmedic.record.treatment import STATE_FILE, read_treatment


def save_treatment(vitals: Any, ckpt: Path, micro_batch: int, accumulation: int) -> None:
    payload: dict[str, Any] = {
        "zclip": vitals.zclip.state_dict(),
        "counts": dict(vitals.counts),
        "run_id": vitals.run_id,
        "lr_scale": vitals.lr_scale,
        "dropped": vitals.dropped,
        "micro_batch": micro_batch,  # the unit of `dropped`
        "accumulation": accumulation,  # with micro_batch: what an OOM fallback had changed them to
    }
    if vitals.oom is not None:
        payload["oom"] = vitals.oom.state_dict()
    atomic_write(ckpt / STATE_FILE, json.dumps(payload))


def restore_treatment(vitals: Any, ckpt: Path, args: Any) -> dict[str, int] | None:
    """Before a resume: what `Vitals` does not restore itself on a fresh start, the learning-rate
    scale (the checkpoint's optimizer already runs at it, so it must not be applied again) and
    the treatment counts that budgets are measured against. Returns the smaller micro-batch an
    OOM fallback had moved the run to, when `args` still has the larger."""
    payload = read_treatment(ckpt)
    if payload is None:
        return None
    scale = payload.get("lr_scale")
    if isinstance(scale, int | float) and not isinstance(scale, bool) and scale > 0:
        vitals.lr_scale = float(scale)
    counts = payload.get("counts")
    if isinstance(counts, dict):
        vitals.counts = Counter({str(k): int(v) for k, v in counts.items() if isinstance(v, int)})
    return fallen_back_batch(payload, args)


def load_treatment(vitals: Any, ckpt: Path, micro_batch: int) -> None:
    """At train begin: the ZClip statistics, run id, dropped data, learning-rate scale and OOM split
    saved with `ckpt`, `dropped` converted to micro-batches of `micro_batch` rows (a fallback
    after OOM resumes with smaller ones)."""
    payload = read_treatment(ckpt)
    if payload is None:
        return
    if isinstance(payload.get("zclip"), dict):
        vitals.zclip.load_state_dict(payload["zclip"])
    if isinstance(payload.get("run_id"), str):
        vitals.run_id = payload["run_id"]
    if isinstance(payload.get("dropped"), int):
        saved = payload.get("micro_batch")
        rows = saved if isinstance(saved, int) and saved > 0 else micro_batch
        vitals._checkpoint_dropped = max(0, payload["dropped"]) * rows // max(micro_batch, 1)
    if isinstance(payload.get("lr_scale"), int | float):
        vitals._checkpoint_lr_scale = float(payload["lr_scale"])
    if isinstance(payload.get("oom"), dict) and vitals.oom is not None:
        vitals.oom.load_state_dict(payload["oom"])
        vitals._agreed_split = vitals.oom.split  # rank 0 saved the split every rank had agreed on


def fallen_back_batch(payload: dict[str, Any], args: Any) -> dict[str, int] | None:
    """The smaller micro-batch a run had fallen back to after running out of memory, when the
    checkpoint was saved with one and the script asks for the larger original (same effective
    batch); None otherwise. A resumed run takes it up again instead of running out of memory."""
    saved, accumulation = payload.get("micro_batch"), payload.get("accumulation")
    if not isinstance(saved, int) or not isinstance(accumulation, int) or saved < 1 or accumulation < 1:
        return None
    now, now_accumulation = int(args.per_device_train_batch_size), int(args.gradient_accumulation_steps)
    if saved >= now or saved * accumulation != now * now_accumulation:
        return None
    return {"per_device_train_batch_size": saved, "gradient_accumulation_steps": accumulation}
