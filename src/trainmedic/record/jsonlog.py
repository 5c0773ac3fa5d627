"""Stream JSONL logs of `type` records (dlm's `logs/train-*.jsonl`, trainmedic's run log).

One reader serves both writers. Step records become compact columns (`array`), never lists of
dicts, so a million-step log stays in tens of MB. Non-step records that shape the run (`banner`,
`run_complete`, `checkpoint`) are kept as small markers at their position in the columns, so
`segments` can split the records into training runs afterwards. The live watcher's `event`,
`action` and `eval` records are rare and kept whole as markers too (up to `MAX_KEPT_RECORDS`).
Unknown record types are skipped: a newer writer's records never break an older reader.

Every problem is recorded with file and line and reading goes on: one bad line or one bad file
never hides the rest.
"""

from __future__ import annotations

import json
import math
import os
import stat
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from trainmedic.findings import Problem
from trainmedic.record.hf_log import EXTRA_KEYS

MAX_PROBLEMS_PER_FILE = 20
MAX_LINE_BYTES = 16 * 1024 * 1024  # a longer "line" is not a log record; skipped without holding it

# Presence bits of a step record's fields (a logged NaN is a value; an absent key is not).
LOSS, LR, GRAD_NORM, EVAL = 1, 2, 4, 8
# Step-record keys read into columns (the first non-null key wins): loss; lr | learning_rate;
# grad_norm; eval_loss | val_loss. Other keys (tokens, timestamp, ...) are not needed for curves.
# Non-step record types kept as markers, and the (scalar) fields kept from each.
MARKER_TYPES: dict[str, tuple[str, ...]] = {
    "banner": ("run_id", "writer", "version", "max_steps", "seed", "resumed_from_step"),
    "run_complete": (
        "run_id",
        "adapter_version",
        "steps",
        "early_stopped",
        "summary_path",
        "step",
        "status",
        "reason",
    ),
    "checkpoint": ("step", "path"),
}
# Record types kept whole (nested evidence included): what the live watcher saw and did.
WHOLE_TYPES = frozenset({"event", "action", "eval"})
MAX_KEPT_RECORDS = 50_000  # per read; a log flooded with events must not exhaust memory
SEVERITIES = frozenset({"info", "warn", "fail"})

_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Marker:
    """A non-step record, placed after the first `pos` step records."""

    pos: int
    type: str
    file: int  # index into `LogRecords.files`
    line: int
    fields: dict[str, Any]


@dataclass
class LogRecords:
    """Step columns from one or more log files, concatenated in the order given."""

    files: list[Path] = field(default_factory=list)  # files actually read
    file_starts: list[int] = field(default_factory=list)  # first step index of each file
    step: array[int] = field(default_factory=lambda: array("q"))
    loss: array[float] = field(default_factory=lambda: array("d"))
    lr: array[float] = field(default_factory=lambda: array("d"))
    grad_norm: array[float] = field(default_factory=lambda: array("d"))
    eval_loss: array[float] = field(default_factory=lambda: array("d"))
    present: array[int] = field(default_factory=lambda: array("B"))  # presence bits per record
    markers: list[Marker] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nan_loss_as_zero: int = 0  # dlm's way of logging a NaN step: loss 0.0 + non-finite grad_norm
    # Extra per-step curves (`hf_log.EXTRA_KEYS`: DPO rewards, entropy, ...) of trainmedic's run
    # log: key -> (record indices into the columns, values).
    extra: dict[str, tuple[array[int], array[float]]] = field(default_factory=dict)
    kept_records: int = 0  # event/action/eval records kept as markers
    dropped_records: int = 0  # event/action/eval records beyond MAX_KEPT_RECORDS

    def __len__(self) -> int:
        return len(self.step)

    def writers(self) -> set[str]:
        return {str(m.fields["writer"]) for m in self.markers if m.type == "banner" and "writer" in m.fields}


class _Problems:
    """Per-file problem list with a cap, so a garbage file cannot flood the report."""

    def __init__(self, path: Path, out: list[Problem]) -> None:
        self.path, self.out, self.count, self.extra_fatal = str(path), out, 0, False

    def add(self, line: int | None, message: str, fatal: bool = True) -> None:
        self.count += 1
        if self.count <= MAX_PROBLEMS_PER_FILE:
            self.out.append(Problem(self.path, message, line, "log", fatal))
        else:
            self.extra_fatal |= fatal

    def close(self) -> None:
        more = self.count - MAX_PROBLEMS_PER_FILE
        if more > 0:
            self.out.append(
                Problem(self.path, f"and {more} more problem(s) in this file", None, "log", self.extra_fatal)
            )


def open_regular(path: Path, problems: list[Problem], artifact: str = "log") -> BinaryIO | None:
    """Open `path` for reading only if it is a regular file; anything else becomes a Problem.

    Checking the file type first means a FIFO never blocks the reader and a directory named like
    a log file is reported rather than crashing.
    """
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            problems.append(Problem(str(path), "is a directory, not a file; not read", None, artifact))
            return None
        if not stat.S_ISREG(st.st_mode):
            problems.append(
                Problem(
                    str(path), f"is not a regular file ({_file_kind(st.st_mode)}); not read", None, artifact
                )
            )
            return None
        return path.open("rb")
    except OSError as exc:
        problems.append(Problem(str(path), f"cannot read: {exc.strerror or exc}", None, artifact))
        return None


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a plain file"


def read_logs(paths: Sequence[Path]) -> LogRecords:
    """Read JSONL log files in the order given (callers sort them by file name)."""
    rec = LogRecords()
    for path in paths:
        fh = open_regular(path, rec.problems)
        if fh is None:
            continue
        probs = _Problems(path, rec.problems)
        rec.files.append(path)
        rec.file_starts.append(len(rec.step))
        try:
            with fh:
                _read_file(fh, len(rec.files) - 1, rec, probs)
        except OSError as exc:
            probs.add(None, f"read failed: {exc.strerror or exc}")
        probs.close()
    if rec.dropped_records:
        rec.notes.append(
            f"{rec.dropped_records} event/action/eval record(s) beyond the first "
            f"{MAX_KEPT_RECORDS} were not read"
        )
    if rec.nan_loss_as_zero:
        rec.notes.append(
            f"{rec.nan_loss_as_zero} step record(s) logged loss 0.0 with a non-finite grad_norm "
            "(how dlm logs a NaN step); read as a non-finite loss"
        )
    return rec


def _parse(raw: bytes) -> Any:
    """orjson first; Python's json only for what orjson rejects (bare NaN/Infinity literals)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return _BAD


_BAD = object()


def _read_file(fh: BinaryIO, file_idx: int, rec: LogRecords, probs: _Problems) -> None:
    # Bound methods hoisted: this loop runs once per line of a possibly million-line file.
    step_append, present_append = rec.step.append, rec.present.append
    loss_append, lr_append = rec.loss.append, rec.lr.append
    gn_append, ev_append = rec.grad_norm.append, rec.eval_loss.append
    nan = math.nan
    readline = fh.readline
    lineno = 0
    nonblank = 0
    bad: tuple[int, str] | None = None  # an invalid line not yet judged (torn, or garbage)
    want_extra, extra_len, extra_keys = False, -1, []  # extras only from trainmedic's run log
    while True:
        raw = readline(MAX_LINE_BYTES)
        if not raw:
            break
        lineno += 1
        if len(raw) == MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while (chunk := readline(MAX_LINE_BYTES)) and not chunk.endswith(b"\n"):
                pass
            probs.add(lineno, f"line longer than {MAX_LINE_BYTES} bytes; skipped")
            continue
        obj = _parse(raw)
        if obj is _BAD:
            if not raw.strip():
                continue
            nonblank += 1
            if bad is not None:
                probs.add(bad[0], f"not valid JSON: {bad[1]}")
            if not raw.endswith(b"\n"):
                bad = None
                probs.add(lineno, "last line truncated (crash mid-write?); ignored", fatal=False)
            else:
                # Judged at the next record: a torn line followed by a resume banner is a crash.
                bad = (lineno, _snippet(raw))
            continue
        nonblank += 1
        if type(obj) is not dict:
            probs.add(lineno, f"expected a JSON object, got {_json_kind(obj)}: {_snippet(raw)}")
            continue
        kind = obj.get("type", "step" if "step" in obj else None)
        if kind != "step":
            if bad is not None:
                _judge_bad_line(bad, kind, lineno, probs)
                bad = None
            if type(kind) is str and kind in MARKER_TYPES:
                keep = {k: obj[k] for k in MARKER_TYPES[kind] if k in obj and _is_scalar(obj[k])}
                rec.markers.append(Marker(len(rec.step), kind, file_idx, lineno, keep))
                if kind == "banner":
                    want_extra = keep.get("writer") == "trainmedic"
            elif type(kind) is str and kind in WHOLE_TYPES:
                _keep_whole(obj, kind, file_idx, lineno, rec, probs)
            continue

        step = obj.get("step")
        if type(step) is not int or not -_INT64_MAX <= step <= _INT64_MAX:  # inline: the common case
            step = _usable_step(step, "step", lineno, probs)
            if step is None:
                continue
        # Unrolled on purpose: this is the per-line hot path (see FIELD_KEYS for the key names).
        get = obj.get
        loss = get("loss")
        if type(loss) is not float:
            loss = _number(loss, "loss", lineno, probs)
        lr = get("lr")
        if lr is None:
            lr = get("learning_rate")
        if type(lr) is not float:
            lr = _number(lr, "lr", lineno, probs)
        gn = get("grad_norm")
        if type(gn) is not float:
            gn = _number(gn, "grad_norm", lineno, probs)
        ev = get("eval_loss")
        if ev is None:
            ev = get("val_loss")
        if type(ev) is not float:
            ev = _number(ev, "eval_loss", lineno, probs)
        bits = 0
        if loss is None:
            loss = nan
        else:
            bits = LOSS
            if loss == 0.0 and gn is not None and not math.isfinite(gn):
                loss = nan
                rec.nan_loss_as_zero += 1
        if lr is None:
            lr = nan
        else:
            bits |= LR
        if gn is None:
            gn = nan
        else:
            bits |= GRAD_NORM
        if ev is None:
            ev = nan
        else:
            bits |= EVAL
        if want_extra:
            # The key set is looked up again only when a record's size changes: cheap per line.
            if len(obj) != extra_len:
                extra_len, extra_keys = len(obj), [k for k in EXTRA_KEYS if k in obj]
            for key in extra_keys:
                _extra(rec, key, get(key), len(rec.step))
        step_append(step)
        present_append(bits)
        loss_append(loss)
        lr_append(lr)
        gn_append(gn)
        ev_append(ev)
    if bad is not None:
        probs.add(bad[0], f"not valid JSON: {bad[1]}")
    if nonblank == 0:
        rec.notes.append(f"{fh.name}: log file is empty")


def _extra(rec: LogRecords, key: str, value: Any, index: int) -> None:
    if type(value) is not float:
        if type(value) is not int or not -1e308 < value < 1e308:
            return  # extras are optional context: a non-number is skipped, not a problem
        value = float(value)
    col = rec.extra.get(key)
    if col is None:
        col = rec.extra[key] = (array("q"), array("d"))
    col[0].append(index)
    col[1].append(value)


def _judge_bad_line(bad: tuple[int, str], kind: Any, lineno: int, probs: _Problems) -> None:
    """An invalid line right before a banner is the torn last line of a crashed writer that a
    resumed writer appended to: tolerated like a torn last line. Anything else is garbage."""
    if kind == "banner" and bad[0] == lineno - 1:
        probs.add(bad[0], "line truncated before a resume banner (crash mid-write?); ignored", fatal=False)
    else:
        probs.add(bad[0], f"not valid JSON: {bad[1]}")


def _usable_step(raw: Any, kind: str, lineno: int, probs: _Problems) -> int | None:
    """A record's `step` as an int64, or None with the problem noted (the record is skipped)."""
    if type(raw) is int:
        if -_INT64_MAX <= raw <= _INT64_MAX:
            return raw
        probs.add(lineno, f"'step' out of range ({_short(raw)}); skipped")
        return None
    step = _coerce_step(raw)
    if step is None:
        probs.add(lineno, f"{kind} record without a usable 'step' ({_short(raw)}); skipped")
    return step


def _keep_whole(
    obj: dict[str, Any], kind: str, file_idx: int, lineno: int, rec: LogRecords, probs: _Problems
) -> None:
    """Validate an event/action/eval record and keep it as a marker (the slow path: rare records)."""
    step = _usable_step(obj.get("step"), kind, lineno, probs)
    if step is None:
        return
    if kind == "eval":
        ev = obj.get("eval_loss", obj.get("val_loss"))
        if ev is None:
            return  # other eval metrics only: nothing `check` reads
        if type(ev) is not float:
            ev = _number(ev, "eval_loss", lineno, probs)
            if ev is None:
                return
        fields: dict[str, Any] = {"type": "eval", "step": step, "eval_loss": ev}
    elif kind == "event":
        fields = {**obj, "step": step}
        sev = obj.get("severity", "warn")
        if type(sev) is not str or sev not in SEVERITIES:
            probs.add(lineno, f"event severity {_short(sev)} is not info, warn or fail; read as warn", False)
            sev = "warn"
        fields["severity"] = sev
        if type(obj.get("rule")) is not str:
            fields["rule"] = "unknown"
        if type(obj.get("message")) is not str:
            fields["message"] = ""
    else:
        if type(obj.get("action")) is not str:
            name = _short(obj.get("action"))
            probs.add(lineno, f"action record without an 'action' name ({name}); skipped")
            return
        fields = {**obj, "step": step}
    if rec.kept_records >= MAX_KEPT_RECORDS:
        rec.dropped_records += 1
        return
    rec.kept_records += 1
    rec.markers.append(Marker(len(rec.step), kind, file_idx, lineno, fields))


def _number(value: Any, key: str, lineno: int, probs: _Problems) -> float | None:
    """The slow path of a field value: absent, an int, or not a number (reported)."""
    if value is None:
        return None
    if type(value) is int and -1e308 < value < 1e308:
        return float(value)
    probs.add(lineno, f"'{key}' is not a number ({_short(value)}); value ignored")
    return None


def _coerce_step(value: Any) -> int | None:
    """An integral float step (`10.0`) is fine; anything else (bool, str, 1.5, NaN) is not."""
    if type(value) is float and math.isfinite(value) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    return None


def _is_scalar(value: Any) -> bool:
    return value is None or type(value) in (str, int, float, bool)


def _json_kind(obj: Any) -> str:
    if isinstance(obj, list):
        return "an array"
    if isinstance(obj, str):
        return "a string"
    if isinstance(obj, bool) or obj is None:
        return json.dumps(obj)
    return "a number"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _snippet(raw: bytes) -> str:
    text = raw.strip()[:40].decode("utf-8", "replace")
    return repr(text) + ("..." if len(raw.strip()) > 40 else "")
