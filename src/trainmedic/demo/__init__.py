"""`trainmedic demo`: watch, heal and check working together on the toy model, in a few minutes on
a CPU. `run_demo(out)` does it all; importing this package loads no training stack."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainmedic._lazy import lazy_getattr

if TYPE_CHECKING:
    from trainmedic.demo.outdir import OutDirError
    from trainmedic.demo.runner import DemoResult, run_demo

__all__ = ["DemoResult", "OutDirError", "run_demo"]

_WHERE = {
    "run_demo": "trainmedic.demo.runner",
    "DemoResult": "trainmedic.demo.runner",
    "OutDirError": "trainmedic.demo.outdir",
}

__getattr__ = lazy_getattr(__name__, _WHERE)
