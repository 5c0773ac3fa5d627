"""`trainmedic demo`: watch, heal and check working together on the toy model, in a few minutes on
a CPU. `run_demo(out)` does it all; importing this package loads no training stack."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainmedic.demo.outdir import OutDirError
    from trainmedic.demo.runner import DemoResult, run_demo

__all__ = ["DemoResult", "OutDirError", "run_demo"]

_WHERE = {
    "run_demo": "trainmedic.demo.runner",
    "DemoResult": "trainmedic.demo.runner",
    "OutDirError": "trainmedic.demo.outdir",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'trainmedic.demo' has no attribute {name!r}")
