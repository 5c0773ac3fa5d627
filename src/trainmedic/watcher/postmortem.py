"""The postmortem: one strict JSON file saying how a watched run ended and what it went through.

Written on completion and on any exception, atomically (temporary file, then rename), so whoever
reads `<output_dir>/trainmedic-postmortem.json` after a crash sees either the previous complete
file or the new one, never half of one. Strict JSON (no NaN/Infinity literals, which most JSON
parsers reject): a non-finite number is written as null and `notes` says where. The run log keeps
the exact values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import traceback
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

import trainmedic
from trainmedic.fsutil import atomic_write
from trainmedic.record.errors import ReadError
from trainmedic.watcher.runlog import STATUSES, to_plain

SCHEMA_VERSION = 1
POSTMORTEM_NAME = "trainmedic-postmortem.json"
MAX_LISTED = 1000  # events/actions listed in full; the counts cover all of them
MAX_TRACEBACK_CHARS = 50_000  # the end of a traceback is where the error is
MAX_NOTES = 50
MAX_READ_BYTES = 64 * 1024 * 1024


def write_postmortem(
    output_dir: str | os.PathLike[str],
    *,
    status: str,
    reason: str,
    last_vitals: Any,
    events: Iterable[Any],
    actions: Iterable[Any],
    config: Any,
    versions: Mapping[str, Any] | None,
    elapsed_s: float,
    exception: BaseException | None = None,
) -> Path:
    """Write `<output_dir>/trainmedic-postmortem.json` and return its path.

    `last_vitals`, `events`, `actions` and `config` may be mappings, dataclasses, pydantic models
    or objects with `to_record()` (the watcher's own types); `status` is one of `STATUSES`.
    """
    if status not in STATUSES:
        raise ValueError(f"postmortem status must be one of {STATUSES}, not {status!r}")
    event_recs = [_record(e) for e in events]
    action_recs = [_record(a) for a in actions]
    vitals = _record(last_vitals) if last_vitals is not None else None
    notes: list[str] = []
    body = {
        "schema_version": SCHEMA_VERSION,
        "writer": "trainmedic",
        "version": trainmedic.__version__,
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "status": status,
        "reason": str(reason),
        "exit_reason": exit_reason(status, reason, vitals, exception),
        "elapsed_s": float(elapsed_s),
        "last_vitals": vitals,
        "counts": {"events": _event_counts(event_recs), "actions": _action_counts(action_recs)},
        "events": event_recs[:MAX_LISTED],
        "events_not_listed": max(0, len(event_recs) - MAX_LISTED),
        "actions": action_recs[:MAX_LISTED],
        "actions_not_listed": max(0, len(action_recs) - MAX_LISTED),
        "exception": _exception(exception),
        "config": _record(config) if config is not None else None,
        "versions": dict(versions or {}),
    }
    strict = _strict(to_plain(body), "", notes)
    if len(notes) > MAX_NOTES:
        notes[MAX_NOTES:] = [f"and {len(notes) - MAX_NOTES} more non-finite value(s) written as null"]
    strict["notes"] = notes
    path = Path(output_dir) / POSTMORTEM_NAME
    atomic_write(path, json.dumps(strict, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return path


def exit_reason(status: str, reason: str, vitals: Mapping[str, Any] | None, exc: BaseException | None) -> str:
    """One sentence a person reads first: how the run ended, where, and why."""
    step = (vitals or {}).get("step")
    where = f" at step {step}" if isinstance(step, int) and not isinstance(step, bool) else ""
    verb = {"completed": "completed", "stopped": "was stopped", "crashed": "crashed"}[status]
    text = f"The run {verb}{where}"
    why = str(reason).strip()
    if exc is not None:
        what = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        why = f"{why} ({what})" if why and what not in why else (why or what)
    return f"{text}: {why}" if why else f"{text}."


def read_postmortem(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a postmortem (the file, or the output dir holding it); `ReadError` names what is wrong."""
    p = Path(path)
    if p.is_dir():
        p = p / POSTMORTEM_NAME
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):
            raise ReadError(p, "not a regular file")
        if st.st_size > MAX_READ_BYTES:
            raise ReadError(p, f"is {st.st_size} bytes, too large for a postmortem")
        data = p.read_bytes()
    except OSError as exc:
        raise ReadError(p, f"cannot read: {exc.strerror or exc}") from None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ReadError(p, f"not valid JSON ({exc.msg})", exc.lineno) from None
    if not isinstance(obj, dict):
        raise ReadError(p, "not a postmortem: expected a JSON object")
    version = obj.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ReadError(p, "not a postmortem: no integer 'schema_version'")
    if version > SCHEMA_VERSION:
        raise ReadError(
            p, f"schema_version {version} is newer than this trainmedic reads ({SCHEMA_VERSION}); upgrade it"
        )
    if obj.get("status") not in STATUSES:
        raise ReadError(p, f"'status' must be one of {STATUSES}, not {obj.get('status')!r:.40}")
    return obj


# ---------------------------------------------------------------------- helpers


def _record(obj: Any) -> Any:
    """The watcher's objects as plain data: `to_record()`, pydantic, dataclass, or as given."""
    to_record = getattr(obj, "to_record", None)
    if callable(to_record):
        return to_record()
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        return dump()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    return obj


def _event_counts(events: list[Any]) -> dict[str, Any]:
    by_severity: Counter[str] = Counter()
    by_rule: Counter[str] = Counter()
    for e in events:
        if isinstance(e, Mapping):
            by_severity[str(e.get("severity", "unknown"))] += 1
            by_rule[str(e.get("rule", "unknown"))] += 1
    return {"total": len(events), "by_severity": dict(by_severity), "by_rule": dict(by_rule)}


def _action_counts(actions: list[Any]) -> dict[str, Any]:
    by_action = Counter(str(a.get("action", "unknown")) for a in actions if isinstance(a, Mapping))
    return {"total": len(actions), "by_action": dict(by_action)}


def _exception(exc: BaseException | None) -> dict[str, Any] | None:
    if exc is None:
        return None
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if len(text) > MAX_TRACEBACK_CHARS:
        text = "...(start cut)\n" + text[-MAX_TRACEBACK_CHARS:]
    return {
        "type": type(exc).__name__,
        "module": type(exc).__module__,
        "message": str(exc),
        "traceback": text,
    }


def _strict(obj: Any, where: str, notes: list[str]) -> Any:
    """A copy with each non-finite float replaced by null, and `notes` saying where."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        notes.append(f"{where or '(root)'}: {_literal(obj)} written as null")
        return None
    if isinstance(obj, dict):
        return {k: _strict(v, f"{where}.{k}" if where else str(k), notes) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strict(v, f"{where}[{i}]", notes) for i, v in enumerate(obj)]
    return obj


def _literal(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    return "Infinity" if x > 0 else "-Infinity"
