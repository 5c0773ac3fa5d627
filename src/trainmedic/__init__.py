"""trainmedic: keeps LLM fine-tuning runs healthy.

`check` audits a finished run from its files without importing torch; the training-time
features (`watch`, `heal`) live in modules that import the training stack lazily.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
