"""The demo's output directory: written only where nothing of the user's can be lost.

OUT is used when it does not exist, is empty, or holds a previous demo's output (its marker file,
or the layout the first demo wrote: `examples/`, `report.html`, `report.json`). Anything else
there is the user's, and the demo refuses with the names it found rather than overwrite them.
A reused OUT loses only the entries the demo itself writes.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import trainmedic
from trainmedic.fsutil import atomic_write

MARKER = ".trainmedic-demo.json"
# What one demo writes into OUT; a rerun replaces exactly these.
OWN = frozenset(
    {"watched-run", "unwatched-run", "heal-kl_rev", "heal-nll", "report.html", "report.json", MARKER}
)
# The first `make demo` (example runs audited) wrote these, without a marker.
LEGACY = frozenset({"examples", "report.html", "report.json"})
LEGACY_EXAMPLES = frozenset({"healthy-hf-run", "diverged-dlm-store", "nan-hf-run"})


class OutDirError(Exception):
    """OUT cannot be used without putting something of the user's at risk; the message says why."""


def _is_legacy(out: Path, names: set[str]) -> bool:
    if not names <= LEGACY:
        return False
    examples = out / "examples"
    return not examples.exists() or (
        examples.is_dir() and {p.name for p in examples.iterdir()} <= LEGACY_EXAMPLES
    )


def prepare(out: Path) -> Path:
    """Make `out` ready for a fresh demo and mark it as the demo's; raise `OutDirError` if it is not
    safe to write there."""
    if out.exists() and not out.is_dir():
        raise OutDirError(f"{out}: exists and is not a directory; choose another --out")
    names = {p.name for p in out.iterdir()} if out.exists() else set()
    if names and MARKER not in names and not _is_legacy(out, names):
        foreign = sorted(names - OWN)[:5] or sorted(names)[:5]
        raise OutDirError(
            f"{out}: holds files the demo did not write ({', '.join(foreign)}"
            f"{', ...' if len(names) > 5 else ''}); choose an empty or new directory with --out"
        )
    for name in sorted(names & (OWN if MARKER in names else LEGACY)):
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    stamp = {
        "written_by": f"trainmedic {trainmedic.__version__} demo",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write(out / MARKER, json.dumps(stamp) + "\n")
    return out
