"""The watcher's treatment state saved beside each checkpoint (`checkpoint-N/trainmedic_state.json`),
read torch-free: the watcher resumes from it, and `check` learns from it which run saved the
checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STATE_FILE = "trainmedic_state.json"
MAX_BYTES = 1 << 20  # the state is a few KB (ZClip statistics, counts, the OOM split)


def read_treatment(ckpt: Path) -> dict[str, Any] | None:
    """What the watcher saved with `ckpt`; None when absent or unreadable: the checkpoint was
    saved without the watcher, or the file is over 1 MB (no state the watcher writes)."""
    try:
        with (ckpt / STATE_FILE).open("rb") as fh:
            payload = json.loads(fh.read(MAX_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None
