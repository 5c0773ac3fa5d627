"""trainmedic: keeps LLM fine-tuning runs healthy.

`check` audits a finished run from its files without importing torch; the training-time
features (`watch`, `Vitals`) import the training stack only when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Vitals", "WatchConfig", "WatchResult", "__version__", "watch"]

if TYPE_CHECKING:
    from trainmedic.watch import Vitals, WatchConfig, WatchResult, watch

_LAZY = {"watch", "Vitals", "WatchConfig", "WatchResult"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import trainmedic.watch as _watch

        return getattr(_watch, name)
    raise AttributeError(f"module 'trainmedic' has no attribute {name!r}")
