"""Strict, versioned JSON for check results, and the reader `trainmedic report` re-renders from.

Strict means a consumer never meets a `NaN`/`Infinity` literal (most JSON parsers reject them):
every non-finite number becomes null and the run's notes say where. `loads(dumps(x))` gives
back equal reports so a saved JSON renders exactly like the live check did.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import orjson

import trainmedic
from trainmedic.findings import Finding, RunReport, Verdict
from trainmedic.gate import fail_threshold, gate_fails
from trainmedic.record.errors import ReadError

SCHEMA_VERSION: int = 1
_MAX_LISTED_PATHS = 8


def summarize(reports: list[RunReport], fail_on: str = "fail") -> dict[str, Any]:
    """Counts of runs by worst verdict; runs where nothing applied are counted apart from passes."""
    by_worst = {v.value: 0 for v in (Verdict.PASS, Verdict.WARN, Verdict.FAIL, Verdict.ERROR)}
    nothing = 0
    for r in reports:
        if not r.checked_anything:
            nothing += 1
        else:
            by_worst[r.worst.value] += 1
    return {
        "runs": len(reports),
        "by_worst": by_worst,
        "nothing_to_check": nothing,
        "gate_fails": gate_fails(reports, fail_on),
    }


def summary_line(reports: list[RunReport], fail_on: str = "fail") -> str:
    """'12 runs: 9 pass, 2 warn, 1 fail' (zero counts left out)."""
    s = summarize(reports, fail_on)
    parts = [f"{n} {name}" for name, n in s["by_worst"].items() if n]
    if s["nothing_to_check"]:
        parts.append(f"{s['nothing_to_check']} nothing to check")
    noun = "run" if s["runs"] == 1 else "runs"
    return f"{s['runs']} {noun}: " + (", ".join(parts) if parts else "none")


# ---------------------------------------------------------------- writing


def _clean(obj: Any, where: str, replaced: list[str]) -> Any:
    """A JSON-safe copy: numpy values unwrapped, non-finite floats nulled (and recorded)."""
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return utf8_safe(obj)
    if isinstance(obj, Enum):
        return _clean(obj.value, where, replaced)
    if isinstance(obj, int):
        if -(2**63) <= obj < 2**64:
            return obj
        try:
            return float(obj)  # beyond what JSON parsers keep exactly anyway
        except OverflowError:
            replaced.append(where)
            return None
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        replaced.append(where)
        return None
    if isinstance(obj, Mapping):
        return {
            utf8_safe(str(k)): _clean(v, f"{where}.{k}", replaced) for k, v in sorted(obj.items(), key=_key)
        }
    if isinstance(obj, list | tuple):
        if all(_plain_number(v) for v in obj):  # curves: skip the per-item walk
            return list(obj)
        return [_clean(v, f"{where}[{i}]", replaced) for i, v in enumerate(obj)]
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays, without importing numpy
    if callable(tolist):
        return _clean(tolist(), where, replaced)
    if isinstance(obj, set | frozenset):
        return _clean(sorted(obj, key=str), where, replaced)
    return str(obj)


def _plain_number(v: Any) -> bool:
    """None, a finite float or a 64-bit int: already strict JSON as it is."""
    t = type(v)
    if t is float:
        return bool(v - v == 0)  # false for NaN and +-inf
    return v is None or (t is int and -(2**63) <= v < 2**64)


def _key(item: tuple[Any, Any]) -> str:
    return str(item[0])


def utf8_safe(s: str) -> str:
    """UTF-8-safe text: undecodable file names (surrogate escapes) become visible escapes."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s


def _replaced_note(replaced: list[str]) -> str:
    shown = ", ".join(replaced[:_MAX_LISTED_PATHS])
    more = f" and {len(replaced) - _MAX_LISTED_PATHS} more" if len(replaced) > _MAX_LISTED_PATHS else ""
    return f"non-finite numbers written as null in JSON ({len(replaced)}): {shown}{more}"


def _finding_dict(f: Finding, i: int, replaced: list[str]) -> dict[str, Any]:
    return {
        "name": utf8_safe(f.name),
        "kind": utf8_safe(f.kind),
        "verdict": f.verdict.value,
        "score": _clean(f.score, f"findings[{i}].score", replaced),
        "message": utf8_safe(f.message),
        "evidence": _clean(f.evidence, f"findings[{i}].evidence", replaced),
        "duration_s": _clean(float(f.duration_s), f"findings[{i}].duration_s", replaced),
    }


def run_dict(report: RunReport) -> dict[str, Any]:
    """One run as a JSON-safe dict in fixed key order."""
    replaced: list[str] = []
    findings = [_finding_dict(f, i, replaced) for i, f in enumerate(report.findings)]
    other_runs = _clean(report.other_runs, "other_runs", replaced)
    curves = _clean(report.curves, "curves", replaced)
    duration = _clean(float(report.duration_s), "duration_s", replaced)
    notes = [utf8_safe(str(n)) for n in report.notes]
    if replaced:
        notes.append(_replaced_note(replaced))
    return {
        "path": utf8_safe(report.path),
        "layout": utf8_safe(report.layout),
        "run_label": utf8_safe(report.run_label),
        "headline": utf8_safe(report.headline()),
        "worst": report.worst.value,
        "checked_anything": report.checked_anything,
        "duration_s": duration,
        "findings": findings,
        "sources": [utf8_safe(str(s)) for s in report.sources],
        "notes": notes,
        "other_runs": other_runs,
        "curves": curves,
    }


def document(
    reports: list[RunReport], *, fail_on: str = "fail", generated_at: str | None = None
) -> dict[str, Any]:
    """The whole JSON document as a dict (what `dumps` serialises)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "trainmedic",
        "version": trainmedic.__version__,
        "generated_at": generated_at or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "fail_on": fail_threshold(fail_on).value,
        "summary": summarize(reports, fail_on),
        "runs": [run_dict(r) for r in reports],
    }


def dumps(reports: list[RunReport], *, fail_on: str = "fail", generated_at: str | None = None) -> bytes:
    """Strict JSON bytes (UTF-8, trailing newline); `generated_at` pins the timestamp for diffs."""
    doc = document(reports, fail_on=fail_on, generated_at=generated_at)
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)


# ---------------------------------------------------------------- reading


class _Reader:
    """Field access with messages that name the file and the JSON path of the bad field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> ReadError:
        return ReadError(self.source, f"{where}: {message}" if where else message)

    def get(self, obj: dict[str, Any], key: str, types: Any, where: str, default: Any = ...) -> Any:
        if key not in obj:
            if default is not ...:
                return default
            raise self.fail(where, f"missing field {key!r}")
        value = obj[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            raise self.fail(
                f"{where}.{key}" if where else key, f"expected {_names(types)}, got {_kind(value)}"
            )
        return value

    def str_list(self, obj: dict[str, Any], key: str, where: str) -> list[str]:
        items = self.get(obj, key, list, where, [])
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise self.fail(f"{where}.{key}[{i}]", f"expected a string, got {_kind(item)}")
        return list(items)


def _as_tuple(types: Any) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _names(types: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}
    return " or ".join(names.get(t, t.__name__) for t in _as_tuple(types) if t is not type(None)) + (
        " or null" if type(None) in _as_tuple(types) else ""
    )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", dict: "an object", list: "a list", str: "a string"}.get(
        type(value), f"{value!r}"
    )


def _check_version(doc: Any, r: _Reader) -> None:
    if not isinstance(doc, dict) or "schema_version" not in doc:
        raise r.fail(
            "",
            "not a trainmedic JSON report (no 'schema_version'); expected a file written by "
            "`trainmedic check --json`",
        )
    version = doc["schema_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise r.fail("schema_version", f"expected an integer, got {_kind(version)}")
    if version != SCHEMA_VERSION:
        newer = " (written by a newer trainmedic; upgrade to read it)" if version > SCHEMA_VERSION else ""
        raise r.fail(
            "schema_version",
            f"version {version} is not supported, this trainmedic reads {SCHEMA_VERSION}{newer}",
        )


def _verdict(value: Any, where: str, r: _Reader) -> Verdict:
    try:
        return Verdict(value)
    except ValueError:
        choices = ", ".join(v.value for v in Verdict)
        raise r.fail(where, f"{value!r} is not a verdict ({choices})") from None


def _finding(obj: Any, where: str, r: _Reader) -> Finding:
    if not isinstance(obj, dict):
        raise r.fail(where, f"expected an object, got {_kind(obj)}")
    score = r.get(obj, "score", (int, float, type(None)), where, None)
    duration = r.get(obj, "duration_s", (int, float, type(None)), where, 0.0)
    return Finding(
        name=r.get(obj, "name", str, where),
        kind=r.get(obj, "kind", str, where, r.get(obj, "name", str, where)),
        verdict=_verdict(r.get(obj, "verdict", str, where), f"{where}.verdict", r),
        message=r.get(obj, "message", str, where, ""),
        score=None if score is None else float(score),
        evidence=r.get(obj, "evidence", dict, where, {}),
        duration_s=0.0 if duration is None else float(duration),
    )


def _curves(obj: dict[str, Any], where: str, r: _Reader) -> dict[str, dict[str, list[Any]]]:
    curves = r.get(obj, "curves", dict, where, {})
    for name, curve in curves.items():
        at = f"{where}.curves.{name}"
        if not isinstance(curve, dict):
            raise r.fail(at, f"expected an object with 'steps' and 'values', got {_kind(curve)}")
        steps = r.get(curve, "steps", list, at)
        values = r.get(curve, "values", list, at)
        if len(steps) != len(values):
            raise r.fail(at, f"'steps' has {len(steps)} entries but 'values' has {len(values)}")
    return curves


def _run(obj: Any, where: str, r: _Reader) -> RunReport:
    if not isinstance(obj, dict):
        raise r.fail(where, f"expected an object, got {_kind(obj)}")
    findings = [
        _finding(f, f"{where}.findings[{i}]", r) for i, f in enumerate(r.get(obj, "findings", list, where))
    ]
    other_runs = r.get(obj, "other_runs", list, where, [])
    for i, item in enumerate(other_runs):
        if not isinstance(item, dict):
            raise r.fail(f"{where}.other_runs[{i}]", f"expected an object, got {_kind(item)}")
    duration = r.get(obj, "duration_s", (int, float, type(None)), where, 0.0)
    return RunReport(
        path=r.get(obj, "path", str, where),
        layout=r.get(obj, "layout", str, where, ""),
        findings=findings,
        run_label=r.get(obj, "run_label", str, where, ""),
        sources=r.str_list(obj, "sources", where),
        notes=r.str_list(obj, "notes", where),
        other_runs=other_runs,
        curves=_curves(obj, where, r),
        duration_s=0.0 if duration is None else float(duration),
    )


def loads(data: bytes | str, *, source: str = "<json>") -> list[RunReport]:
    """Reports back from `dumps` output; anything else raises ReadError naming `source` and field."""
    r = _Reader(source)
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ReadError(source, f"not valid JSON: {exc.msg} (column {exc.colno})", line=exc.lineno) from None
    _check_version(doc, r)
    return [_run(run, f"runs[{i}]", r) for i, run in enumerate(r.get(doc, "runs", list, ""))]
