"""ZClip (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training").

Warm-up: the first `warmup` finite norms are only collected (clipped to the hard cap when one is
set). Then the EMA mean and variance of the total gradient norm give z = (g - mean) / std; when
z > z_thresh the gradients are rescaled to mean + z_thresh**2 * std / z, and the EMA is fed that
clipped value (the published "adaptive scaling" rule).

Differences from the reference code, each deliberate: a non-finite norm never enters the
statistics (one NaN gradient would otherwise poison mean and variance forever); there is no hidden
1.0 cap (the cap is whatever the user set, or none); the state round-trips through
`state_dict()` so a resumed run clips exactly as the original would have. The decision is pure
Python on a float, which makes it testable against the paper's formula step by step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ClipDecision:
    norm: float  # the pre-clip total norm
    target: float | None  # rescale the gradients to this total norm; None: leave them
    z: float | None  # z-score against the EMA statistics (None during warm-up / non-finite)
    reason: str  # "warmup", "zscore", "cap", "none" or "nonfinite"

    @property
    def clipped(self) -> bool:
        return self.target is not None and self.target < self.norm


class ZClip:
    def __init__(
        self,
        *,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup: int = 25,
        max_norm: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.warmup = warmup
        self.max_norm = max_norm
        self.eps = eps
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var: float | None = None

    @property
    def ready(self) -> bool:
        return self.mean is not None

    @property
    def std(self) -> float | None:
        return None if self.var is None else math.sqrt(max(self.var, 0.0))

    def zscore(self, norm: float) -> float | None:
        if self.mean is None or self.var is None or not math.isfinite(norm):
            return None
        return (norm - self.mean) / (math.sqrt(max(self.var, 0.0)) + self.eps)

    def decide(self, norm: float, *, update: bool = True) -> ClipDecision:
        """The clip target for this step's norm; with `update`, feed the statistics.

        Pass `update=False` when the step's update will be skipped anyway, so a poisoned step
        does not shift what later steps are compared with.
        """
        if not math.isfinite(norm):
            return ClipDecision(norm, None, None, "nonfinite")
        if self.mean is None:
            if update:
                self.buffer.append(norm)
                if len(self.buffer) >= self.warmup:
                    n = len(self.buffer)
                    self.mean = sum(self.buffer) / n
                    self.var = sum((x - self.mean) ** 2 for x in self.buffer) / n
                    self.buffer = []
            if self.max_norm is not None and norm > self.max_norm:
                return ClipDecision(norm, self.max_norm, None, "cap")
            return ClipDecision(norm, None, None, "warmup")
        z = self.zscore(norm)
        assert z is not None and self.var is not None
        std = math.sqrt(max(self.var, 0.0))
        adaptive = self.mean + (self.z_thresh**2) * std / z if z > self.z_thresh else None
        target, reason = (adaptive, "zscore") if adaptive is not None else (None, "none")
        if self.max_norm is not None:  # a user limit on top; the statistics ignore it
            if adaptive is not None:
                target = min(adaptive, self.max_norm)
            elif norm > self.max_norm:
                target, reason = self.max_norm, "cap"
        if update:
            effective = adaptive if adaptive is not None else norm
            self.mean = self.alpha * self.mean + (1 - self.alpha) * effective
            self.var = self.alpha * self.var + (1 - self.alpha) * (effective - self.mean) ** 2
        return ClipDecision(norm, target, z, reason)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": list(self.buffer), "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = [float(x) for x in state.get("buffer", [])]
        mean, var = state.get("mean"), state.get("var")
        self.mean = None if mean is None else float(mean)
        self.var = None if var is None else float(var)
