"""Turn a Hugging Face `log_history` (trainer_state.json) into curves.

HF mixes record kinds in one list: training logs (`loss`, `grad_norm`, `learning_rate`),
evaluation logs (`eval_loss`, ...) and a final summary (`train_loss`, `train_runtime`). Only the
first two become curves; the summary's `train_loss` is a whole-run mean and is ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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

    def series(key: str) -> Series:
        col = cols.get(key, {})
        steps = sorted(col)
        return Series.of(steps, [col[s] for s in steps])

    loss, grad_norm = series("loss"), series("grad_norm")
    hidden = hidden_nan_losses(loss, grad_norm)
    notes: list[str] = []
    if hidden.any():
        # The Trainer's logging_nan_inf_filter (on by default) adds nothing to its running loss for
        # a non-finite step, so a logging window whose steps were all NaN logs exactly 0.0.
        values = loss.values.copy()
        values[hidden] = math.nan
        loss = Series(loss.steps, values)
        notes.append(
            f"{int(hidden.sum())} logged loss(es) of exactly 0 at steps with a non-finite gradient norm "
            f"(first at step {int(loss.steps[hidden][0])}) read as NaN: the Trainer's "
            "logging_nan_inf_filter logs 0 for all-NaN windows"
        )
    return LogCurves(
        train_loss=loss,
        grad_norm=grad_norm,
        learning_rate=series("learning_rate"),
        eval_loss=series("eval_loss"),
        extra={k: series(k) for k in EXTRA_KEYS if k in cols},
        skipped=skipped,
        notes=notes,
    )


def hidden_nan_losses(loss: Series, grad_norm: Series) -> np.ndarray:
    """Which losses are a NaN logged as exactly 0.0: a zero beside a non-finite gradient norm of
    the same step is no measurement. dlm logs a NaN step that way, and so does the HF Trainer's
    `logging_nan_inf_filter` for a window whose steps were all NaN; read literally, a run gone NaN
    would show a loss falling to 0."""
    zero = loss.values == 0.0
    if not zero.any() or not len(grad_norm):
        return np.zeros(len(loss), dtype=bool)
    bad_grad_steps = grad_norm.steps[~np.isfinite(grad_norm.values)]
    return zero & np.isin(loss.steps, bad_grad_steps)
