"""Stream JSONL logs of `type` records (dlm's `logs/train-*.jsonl`, trainmedic's run log).

One reader serves both writers. Step records become compact columns (`array`), never lists of
dicts, so a million-step log stays in tens of MB. Non-step records that shape the run (`banner`,
`run_complete`, `checkpoint`) are kept as small markers at their position in the columns, so
`segments` can split the records into training runs afterwards.

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

MAX_PROBLEMS_PER_FILE = 20
MAX_LINE_BYTES = 16 * 1024 * 1024  # a longer "line" is not a log record; skipped without holding it

# Presence bits of a step record's fields (a logged NaN is a value; an absent key is not).
LOSS, LR, GRAD_NORM, EVAL = 1, 2, 4, 8
# Step-record keys read into columns (the first non-null key wins): loss; lr | learning_rate;
# grad_norm; eval_loss | val_loss. Other keys (tokens, timestamp, ...) are not needed for curves.
# Non-step record types kept as markers, and the (scalar) fields kept from each.
MARKER_TYPES: dict[str, tuple[str, ...]] = {
    "banner": ("run_id", "writer", "max_steps", "seed"),
    "run_complete": ("run_id", "adapter_version", "steps", "early_stopped", "summary_path"),
    "checkpoint": ("step", "path"),
}

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
            if not raw.endswith(b"\n"):
                probs.add(lineno, "last line truncated (crash mid-write?); ignored", fatal=False)
            else:
                probs.add(lineno, f"not valid JSON: {_snippet(raw)}")
            continue
        nonblank += 1
        if type(obj) is not dict:
            probs.add(lineno, f"expected a JSON object, got {_json_kind(obj)}: {_snippet(raw)}")
            continue
        kind = obj.get("type", "step" if "step" in obj else None)
        if kind != "step":
            if type(kind) is str and kind in MARKER_TYPES:
                keep = {k: obj[k] for k in MARKER_TYPES[kind] if k in obj and _is_scalar(obj[k])}
                rec.markers.append(Marker(len(rec.step), kind, file_idx, lineno, keep))
            continue

        step = obj.get("step")
        if type(step) is not int:
            step = _coerce_step(step)
            if step is None:
                probs.add(lineno, f"step record without a usable 'step' ({_short(obj.get('step'))}); skipped")
                continue
        elif not -_INT64_MAX <= step <= _INT64_MAX:
            probs.add(lineno, f"'step' out of range ({_short(step)}); skipped")
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
        step_append(step)
        present_append(bits)
        loss_append(loss)
        lr_append(lr)
        gn_append(gn)
        ev_append(ev)
    if nonblank == 0:
        rec.notes.append(f"{fh.name}: log file is empty")


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
