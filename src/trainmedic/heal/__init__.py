"""heal: KL-anchored LoRA rounds that learn kept examples without drifting from the original model.

`heal_round(base, "kept.jsonl", "round-1")` trains one watched round; pass earlier rounds as
`history=[...]` to stack them. Nothing here imports torch until a round actually runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainmedic._lazy import lazy_getattr
from trainmedic.heal.errors import HealError

if TYPE_CHECKING:
    from trainmedic.heal.round import HealResult, RoundConfig, heal_round

__all__ = ["HealError", "HealResult", "RoundConfig", "heal_round"]

_WHERE = {
    "heal_round": "trainmedic.heal.round",
    "HealResult": "trainmedic.heal.round",
    "RoundConfig": "trainmedic.heal.round",
}

__getattr__ = lazy_getattr(__name__, _WHERE)
