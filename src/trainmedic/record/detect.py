"""Recognise what a PATH holds, from names and file types only (nothing is parsed here)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from trainmedic.record import dlm, hf

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)


class Layout(StrEnum):
    """User-facing names of the layouts `check` reads."""

    DLM_STORE = "dlm store"
    HF_OUTPUT_DIR = "HF output dir"
    HF_CHECKPOINT = "HF checkpoint"
    TRAINER_STATE = "trainer_state.json"
    RUN_LOG = "trainmedic run log"
    JSONL = "JSONL log"
    EMPTY = "empty"
    UNKNOWN = "unknown"


@dataclass
class Detected:
    layout: Layout
    files: list[Path] = field(default_factory=list)  # the log files, for JSONL layouts
    note: str = ""  # why the layout is empty/unknown, in plain words


def detect(path: Path) -> Detected:
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return Detected(Layout.UNKNOWN, note=f"{path}: cannot be read ({exc.strerror or exc})")
    if stat.S_ISDIR(mode):
        return _detect_dir(path)
    if not stat.S_ISREG(mode):
        return Detected(Layout.UNKNOWN, note=f"{path}: not a regular file or directory; not read")
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return Detected(Layout.JSONL, files=[path])
    if name.endswith(JSON_SUFFIXES):
        return Detected(Layout.TRAINER_STATE)
    return Detected(
        Layout.UNKNOWN,
        note=f"{path.name}: not a file trainmedic reads (give a run directory, a trainer_state.json "
        "or a .jsonl log)",
    )


def _detect_dir(path: Path) -> Detected:
    try:
        entries = sorted(e.name for e in os.scandir(path) if not e.name.startswith("."))
    except OSError as exc:
        return Detected(Layout.UNKNOWN, note=f"{path}: cannot list the directory ({exc.strerror or exc})")
    if not entries:
        return Detected(Layout.EMPTY, note="no training artifacts found")
    if dlm.is_dlm_store(path):
        return Detected(Layout.DLM_STORE)
    if hf.checkpoints(path):
        return Detected(Layout.HF_OUTPUT_DIR)
    has_state = os.path.lexists(path / hf.STATE_NAME)
    if hf.CHECKPOINT_RE.match(path.name) or (has_state and os.path.lexists(path / "optimizer.pt")):
        return Detected(Layout.HF_CHECKPOINT)
    if has_state or hf.weights_file(path) is not None:
        return Detected(Layout.HF_OUTPUT_DIR)
    logs = [path / n for n in entries if n.lower().endswith(JSONL_SUFFIXES)]
    if logs:
        return Detected(Layout.JSONL, files=logs)
    shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
    return Detected(Layout.UNKNOWN, note=f"no training artifacts recognised; found: {shown}")
