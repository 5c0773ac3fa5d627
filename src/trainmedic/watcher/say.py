"""Where the watcher's words go when the caller gave no `echo`: the `trainmedic` logger, made
visible once on stderr when the program configured no logging at all.

Python's default (no handler anywhere) shows WARNING and above only, so a user's plain script
would never see the preflight result or where the run log and postmortem are. Like
transformers' own logger, trainmedic then adds one stderr handler at INFO and stops propagation
(no doubled lines if the program configures logging later). A program that configured logging
keeps its own rules. To silence it: `logging.getLogger("trainmedic").setLevel(logging.WARNING)`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger("trainmedic")
_DEFAULT_HANDLER: logging.Handler | None = None


def make_visible() -> None:
    """Give the `trainmedic` logger a stderr handler at INFO, unless logging is configured."""
    global _DEFAULT_HANDLER
    if _DEFAULT_HANDLER is not None or logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.propagate = False
    _DEFAULT_HANDLER = handler


def sayer(echo: Callable[[str], None] | None, level: int = logging.INFO) -> Callable[[str], None]:
    """`echo` when given, else the logger at `level`."""
    if echo is not None:
        return echo
    return lambda line: logger.log(level, line)
