"""Non-finite values: forward filling for statistics, and the fp16 loss-scaler exceptions.

With fp16 mixed precision the dynamic loss scaler starts at 2**16 and halves its scale on every
overflow, skipping that optimizer step. The first steps of a run therefore often show an
infinite/NaN gradient norm while the scheduler has not advanced (learning rate still 0, or no
learning rate logged yet). That pattern is calibration, not a broken run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trainmedic.signals.flags import Flag


def forward_fill(values: np.ndarray) -> np.ndarray:
    """Replace each non-finite value by the last finite one before it.

    Leading non-finite values take the first finite value; an all-non-finite curve is returned
    unchanged (the caller decides what that means).
    """
    finite = np.isfinite(values)
    if finite.all() or not finite.any():
        return values.copy()
    idx = np.where(finite, np.arange(values.shape[0]), -1)
    np.maximum.accumulate(idx, out=idx)
    idx[idx < 0] = int(np.argmax(finite))
    return values[idx]


def lr_at(lr_steps: np.ndarray, lr_values: np.ndarray, step: int) -> float | None:
    """The learning rate in force at `step` (last logged at or before it); None if none yet."""
    k = int(np.searchsorted(lr_steps, step, side="right")) - 1
    return None if k < 0 else float(lr_values[k])


@dataclass(frozen=True)
class ScalerRule:
    """fp16 calibration: at most `max_points` leading non-finite grad norms while the LR is 0.

    max_points=3: each overflow halves the scale, so a few skipped steps bring 2**16 into range
    for any model; a longer run of non-finite gradients at the start is a real problem.
    """

    max_points: int = 3


def scaler_calibration_mask(
    grad_steps: np.ndarray,
    grad_values: np.ndarray,
    lr_steps: np.ndarray,
    lr_values: np.ndarray,
    rule: ScalerRule = ScalerRule(),
) -> np.ndarray:
    """True for the grad-norm points that are the loss scaler calibrating (to be excluded).

    That is the leading run of non-finite grad norms when it is short (<= `max_points`), every
    point of it has LR 0 or no LR logged yet, and a finite grad norm follows it.
    """
    mask = np.zeros(grad_values.shape[0], dtype=bool)
    run = int(np.argmax(np.isfinite(grad_values))) if np.isfinite(grad_values).any() else -1
    if run <= 0 or run > rule.max_points:
        return mask
    for i in range(run):
        lr = lr_at(lr_steps, lr_values, int(grad_steps[i]))
        if lr is not None and lr != 0.0:
            return mask
    mask[:run] = True
    return mask


@dataclass(frozen=True)
class ScalerSkipRule:
    """fp16 loss-scaler skips in the middle of a run: by design, while they stay occasional.

    When fp16 gradients overflow, the scaler skips that optimizer step and halves its scale; the
    weights are untouched, so the next steps log finite norms again. A real NaN (bf16/fp32, or a
    NaN loss) poisons the weights and every later norm. So an isolated non-finite grad norm whose
    loss is finite and after which the norms are finite again is a scaler skip.

    - max_run=3: a few overflows in a row bring the scale back into range; a longer run is not
      the scaler finding its range.
    - max_share=0.02, min_allowed=3: a healthy fp16 run skips now and then (real runs: 1 in 300
      logged points); a scaler that skips on and on has a scale that collapsed, which is a fault.
    """

    max_run: int = 3
    max_share: float = 0.02
    min_allowed: int = 3


def scaler_skip_mask(
    grad_steps: np.ndarray,
    grad_values: np.ndarray,
    loss_steps: np.ndarray,
    loss_values: np.ndarray,
    rule: ScalerSkipRule = ScalerSkipRule(),
) -> tuple[np.ndarray, bool]:
    """(mask of the grad-norm points read as fp16 scaler skips, whether they stayed occasional).

    A point qualifies when it is in a run of at most `max_run` non-finite grad norms, a finite
    grad norm follows the run, and the loss logged at its step (if any) is finite. When more
    points qualify than `max(min_allowed, max_share * points)`, none are excused (the second
    value is False): the scaler kept skipping.
    """
    n = grad_values.shape[0]
    mask = np.zeros(n, dtype=bool)
    bad = ~np.isfinite(grad_values)
    if not bad.any() or bad.all():
        return mask, True
    loss_at = dict(zip(loss_steps.tolist(), loss_values.tolist(), strict=True))
    i = 0
    while i < n:
        if not bad[i]:
            i += 1
            continue
        j = i
        while j < n and bad[j]:
            j += 1
        if j < n and j - i <= rule.max_run:  # finite again right after: the weights were spared
            for k in range(i, j):
                loss = loss_at.get(int(grad_steps[k]))
                mask[k] = loss is None or math.isfinite(loss)
        i = j
    allowed = max(rule.min_allowed, int(rule.max_share * n))
    if int(mask.sum()) > allowed:
        return np.zeros(n, dtype=bool), False
    return mask, True


class NonFiniteDetector:
    """Streaming twin of the non-finite check: Flags for the non-finite points that count.

    Leading non-finite grad norms logged while the LR is 0 (or not yet logged) are held back and
    forgiven when a finite grad norm follows within `max_points`; otherwise they are released
    with the point that disqualified them. Call `finish()` at the end of the stream for any
    still held (a run that never produced a finite gradient).
    """

    def __init__(self, rule: ScalerRule = ScalerRule()) -> None:
        self.rule = rule
        self._leading = True
        self._held: list[Flag] = []

    def update(self, step: int, loss: float | None, grad_norm: float | None, lr: float | None) -> list[Flag]:
        flags: list[Flag] = []
        if loss is not None and not math.isfinite(loss):
            flags.append(Flag("nonfinite:loss", int(step), float(loss), math.nan, int(step)))
        if grad_norm is None:
            return flags
        if math.isfinite(grad_norm):
            self._leading = False
            self._held.clear()  # forgiven: the scaler found its range
            return flags
        flag = Flag("nonfinite:grad_norm", int(step), float(grad_norm), math.nan, int(step))
        if self._leading and (lr is None or lr == 0.0) and len(self._held) < self.rule.max_points:
            self._held.append(flag)
            return flags
        self._leading = False
        flags.extend(self._held)
        self._held.clear()
        flags.append(flag)
        return flags

    def finish(self) -> list[Flag]:
        held, self._held = self._held, []
        return held
