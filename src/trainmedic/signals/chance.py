"""Chance constants: the loss of a model that learned nothing on a k-way choice.

A classifier (or a DPO policy identical to its reference) that assigns equal probability to k
answers has cross-entropy exactly ln k. A loss pinned there after warm-up means nothing was
learned; the constant also says which task shape the run is, which makes the message useful.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trainmedic.signals.robust import median_of


@dataclass(frozen=True)
class ChanceConstant:
    name: str
    value: float
    meaning: str

    def describe(self) -> str:
        return f"{self.value:.4f} = {self.name} ({self.meaning})"


LN2 = ChanceConstant("ln 2", math.log(2.0), "chance for binary choice / DPO preference")
LN3 = ChanceConstant("ln 3", math.log(3.0), "chance for 3-way choice")
LN4 = ChanceConstant("ln 4", math.log(4.0), "chance for 4-way choice")
CHANCE_CONSTANTS = (LN2, LN3, LN4)


def match_chance(
    level: float, tol: float, candidates: tuple[ChanceConstant, ...] = CHANCE_CONSTANTS
) -> ChanceConstant | None:
    """The chance constant within `tol` nats of `level`, or None when none is that close."""
    if not math.isfinite(level):
        return None
    best = min(candidates, key=lambda c: abs(c.value - level), default=None)
    if best is None or abs(best.value - level) > tol:
        return None
    return best


def pinned_at_chance(
    values: np.ndarray, tol: float, candidates: tuple[ChanceConstant, ...] = CHANCE_CONSTANTS
) -> ChanceConstant | None:
    """The constant a curve sits at throughout: its median and its last third's median both
    within `tol` of it. Callers pass only the points after warm-up (DPO starts at ln 2 by
    construction) and check separately that the curve did not fall.
    """
    x = values[np.isfinite(values)]
    if x.shape[0] < 3:
        return None
    whole = match_chance(median_of(x), tol, candidates)
    if whole is None:
        return None
    return whole if match_chance(median_of(x[-max(1, x.shape[0] // 3) :]), tol, (whole,)) else None
