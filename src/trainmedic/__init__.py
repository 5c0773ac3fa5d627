"""trainmedic: keeps LLM fine-tuning runs healthy.

`check` audits a finished run from its files without importing torch; the training-time
features (`watch`, `Vitals`) import the training stack only when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainmedic._lazy import lazy_getattr

__version__ = "0.1.0"

__all__ = ["Vitals", "WatchConfig", "WatchResult", "__version__", "watch"]

if TYPE_CHECKING:
    from trainmedic.watcher import Vitals, WatchConfig, WatchResult, watch

_WHERE = dict.fromkeys(("watch", "Vitals", "WatchConfig", "WatchResult"), "trainmedic.watcher")

__getattr__ = lazy_getattr(__name__, _WHERE)
