"""Turn a Hugging Face `log_history` (trainer_state.json) into curves.

HF mixes record kinds in one list: training logs (`loss`, `grad_norm`, `learning_rate`),
evaluation logs (`eval_loss`, ...) and a final summary (`train_loss`, `train_runtime`). Only the
first two become curves; the summary's `train_loss` is a whole-run mean and is ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trainmedic.run import Series

# Keys TRL and friends add to training logs that are worth keeping as extra curves.
EXTRA_KEYS = (
    "entropy",
    "mean_token_accuracy",
    "rewards/margins",
    "rewards/accuracies",
    "rewards/chosen",
    "rewards/rejected",
    "reward",
    "kl",
)


@dataclass
class LogCurves:
    train_loss: Series
    grad_norm: Series
    learning_rate: Series
    eval_loss: Series
    extra: dict[str, Series] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # entries that could not be used, with reasons
    notes: list[str] = field(default_factory=list)


def as_float(value: Any) -> float | None:
    """A logged number as float; None for anything that is not a number (bool, str, dict...)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def curves_from_log_history(entries: list[Any]) -> LogCurves:
    """Collect per-step curves from `log_history`; later entries for the same step win."""
    cols: dict[str, dict[int, float]] = {}
    skipped: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            skipped.append(f"log_history[{i}] is {type(entry).__name__}, not an object")
            continue
        step = entry.get("step")
        if isinstance(step, bool) or not isinstance(step, int | float) or not math.isfinite(step):
            skipped.append(f"log_history[{i}] has no usable 'step'")
            continue
        is_summary = "train_runtime" in entry or "train_loss" in entry
        for key in ("loss", "grad_norm", "learning_rate", "eval_loss", *EXTRA_KEYS):
            if key not in entry or (is_summary and key == "loss"):
                continue
            val = as_float(entry[key])
            if val is None:
                skipped.append(f"log_history[{i}].{key} is not a number: {entry[key]!r:.40}")
                continue
            cols.setdefault(key, {})[int(step)] = val

    notes = _unfilter_nan_losses(cols)

    def series(key: str) -> Series:
        col = cols.get(key, {})
        steps = sorted(col)
        return Series.of(steps, [col[s] for s in steps])

    return LogCurves(
        train_loss=series("loss"),
        grad_norm=series("grad_norm"),
        learning_rate=series("learning_rate"),
        eval_loss=series("eval_loss"),
        extra={k: series(k) for k in EXTRA_KEYS if k in cols},
        skipped=skipped,
        notes=notes,
    )


def _unfilter_nan_losses(cols: dict[str, dict[int, float]]) -> list[str]:
    """Put back the NaN that `logging_nan_inf_filter` (on by default) hid.

    The Trainer adds nothing to its running loss for a non-finite step, so a logging window whose
    steps were all NaN logs a loss of exactly 0.0. Next to a non-finite gradient norm of the same
    step that zero is no measurement: a run gone NaN would otherwise read as a loss falling to 0.
    """
    loss, norm = cols.get("loss", {}), cols.get("grad_norm", {})
    hidden = [s for s, g in norm.items() if not math.isfinite(g) and loss.get(s) == 0.0]
    for s in hidden:
        loss[s] = math.nan
    if not hidden:
        return []
    return [
        f"{len(hidden)} logged loss(es) of exactly 0 at steps with a non-finite gradient norm (first at "
        f"step {min(hidden)}) read as NaN: the Trainer's logging_nan_inf_filter logs 0 for all-NaN windows"
    ]
