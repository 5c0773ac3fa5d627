"""What kind of objective a loss curve comes from, as far as the log can tell.

Probes need it because "loss" means different things: a cross-entropy is >= 0 and starts well
above 0; a DPO loss starts at ln 2 by construction; a GRPO/RL loss sits near 0 by design and the
reward carries the signal. Guessing wrong turns a healthy RL run into a "memorised" one.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from enum import StrEnum

import numpy as np

from trainmedic.signals.chance import LN2
from trainmedic.signals.robust import median_of

# Loss near 0 at the start (or negative there) is no likelihood loss: CE of a fresh fine-tune is
# ~0.3 nats per token at the very least, DPO starts at 0.69.
NEAR_ZERO_START = 0.01
# The first DPO log is ln 2 to rounding: the policy equals its reference at step 0.
DPO_START_TOL = 5e-4
HEAD_POINTS = 5


class Objective(StrEnum):
    CROSS_ENTROPY = "cross_entropy"  # SFT / LM / classification: >= 0, starts well above 0
    PREFERENCE = "preference"  # DPO and relatives: starts at ln 2
    RL = "rl"  # GRPO/PPO style: reward logged, loss ~0 by design
    NEAR_ZERO = "near_zero"  # no reward logged, but the loss starts at ~0: not a likelihood
    UNKNOWN = "unknown"  # no finite loss


def classify_objective(loss: np.ndarray, extra_keys: Collection[str]) -> Objective:
    """Guess the objective from the loss curve and the extra keys logged beside it."""
    if "reward" in extra_keys:
        return Objective.RL
    if any(k.startswith("rewards/") for k in extra_keys):
        return Objective.PREFERENCE
    x = loss[np.isfinite(loss)]
    if x.shape[0] == 0:
        return Objective.UNKNOWN
    if abs(float(x[0]) - LN2.value) <= DPO_START_TOL:
        return Objective.PREFERENCE
    head = median_of(x[:HEAD_POINTS])
    if not math.isfinite(head) or head <= NEAR_ZERO_START:
        return Objective.NEAR_ZERO
    return Objective.CROSS_ENTROPY


def is_likelihood(objective: Objective) -> bool:
    """Cross-entropy and DPO losses are negative log-probabilities: >= 0, in nats."""
    return objective in (Objective.CROSS_ENTROPY, Objective.PREFERENCE)
