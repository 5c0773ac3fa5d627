"""Live training watcher: vitals, treatments, supervisor, run log and postmortem.

`watch`, `Vitals` and friends import torch and transformers when first used; the run-log and
postmortem modules do not, so readers can use them without the training stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainmedic._lazy import lazy_getattr

if TYPE_CHECKING:
    from trainmedic.watcher.config import WatchConfig
    from trainmedic.watcher.supervisor import WatchResult, watch
    from trainmedic.watcher.vitals import Vitals

__all__ = ["Vitals", "WatchConfig", "WatchResult", "watch"]

_WHERE = {
    "watch": "trainmedic.watcher.supervisor",
    "WatchResult": "trainmedic.watcher.supervisor",
    "Vitals": "trainmedic.watcher.vitals",
    "WatchConfig": "trainmedic.watcher.config",
}

__getattr__ = lazy_getattr(__name__, _WHERE)
