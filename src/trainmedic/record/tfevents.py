"""TensorBoard event files (`events.out.tfevents.*`), read without tensorboard or protobuf.

The format is a sequence of records: a little-endian uint64 length, a uint32 masked CRC-32C of
those 8 bytes, the data, and a uint32 masked CRC-32C of the data. Each record's data is a
serialized `tensorflow.Event` protobuf; the scalars the HF Trainer logs (`report_to=
"tensorboard"`) are `Summary.Value`s with a `tag` (`train/loss`, `train/grad_norm`,
`train/learning_rate`, `eval/loss`, ...) and a `simple_value` (or, from TF2-style writers, a
scalar `tensor`). Only those few fields are decoded, by a small protobuf wire-format walk; every
other field is skipped by its declared length.

Why not `tensorboard`'s reader or `tbparse`: they pull in TensorFlow's protobufs (and
`tbparse` pandas), which `check` must not pay for at start-up; the wire format needs a hundred
lines. The length CRC is checked on every record (a misframed file is named, never decoded as
garbage); the data CRC is not (pure-Python CRC-32C costs about a microsecond per byte), and a
record that does not decode is a problem of its own.

A folder of several event files (a run restarted, each start writes a new file) is read in name
order (their names carry the start time); where a step repeats, the later file wins. A file that
is a Git LFS pointer (a repository cloned without LFS) holds no events and is an error that says so.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from trainmedic.findings import Problem
from trainmedic.fsutil import subdirs
from trainmedic.record.columns import Columns, add_problems, pick, series_of
from trainmedic.run import Run

EVENTS_MARK = "tfevents"
MAX_BYTES = 1 << 30
MAX_RECORD = 64 << 20
LFS_POINTER = b"version https://git-lfs.github.com/spec/"

# Trainer tags (and common spellings of other writers) -> the run's curves
TRAIN_LOSS = ("train/loss", "loss", "train_loss", "training_loss")
EVAL_LOSS = ("eval/loss", "eval_loss", "val/loss", "val_loss", "validation/loss")
GRAD_NORM = ("train/grad_norm", "grad_norm")
LEARNING_RATE = ("train/learning_rate", "learning_rate", "lr")
EXTRAS = {"train/rewards/accuracies": "rewards/accuracies", "train/rewards/margins": "rewards/margins"}


def is_event_file(name: str) -> bool:
    return EVENTS_MARK in name and name.startswith("events.out.")


def event_files(folder: Path) -> list[Path]:
    """Event files in `folder`, in its subfolders, and in `runs/<date>/` (the HF Trainer's
    `logging_dir`), ordered by folder then name: a restart writes a later folder or file."""
    found: list[Path] = []
    runs = folder / "runs"
    for base in (folder, *subdirs(folder), *(subdirs(runs) if runs.is_dir() else [])):
        try:
            found.extend(p for p in base.iterdir() if is_event_file(p.name))
        except OSError:
            continue
    return sorted(found, key=lambda p: (p.parent.name, p.name))


def read_event_files(files: list[Path], run: Run) -> None:
    """Scalars of every file into `run`'s curves; problems (file and record number) go to `run`."""
    columns: Columns = {}
    problems: list[Problem] = []
    for path in files:
        try:
            if path.stat().st_size > MAX_BYTES:
                problems.append(Problem(str(path), f"is over {MAX_BYTES >> 20} MB; not read", None, "log"))
                continue
            data = path.read_bytes()
        except OSError as exc:
            problems.append(Problem(str(path), f"cannot read: {exc.strerror or exc}", None, "log"))
            continue
        if data.startswith(LFS_POINTER):
            problems.append(
                Problem(
                    str(path),
                    "is a Git LFS pointer, not the events (fetch it with `git lfs pull`)",
                    None,
                    "log",
                )
            )
            continue
        run.sources.append(path)
        for tag, step, value in _scalars(data, path, problems):
            columns.setdefault(tag, {})[step] = value  # later records (and files) win
    add_problems(run, problems, files[0])
    run.train_loss = pick(columns, TRAIN_LOSS)
    run.eval_loss = pick(columns, EVAL_LOSS)
    run.grad_norm = pick(columns, GRAD_NORM)
    run.learning_rate = pick(columns, LEARNING_RATE)
    run.extra = {name: series_of(columns[tag]) for tag, name in EXTRAS.items() if tag in columns}
    if "train/train_loss" in columns:  # the Trainer writes it once, when train() returns
        run.completed = True
    if not run.has_log:
        tags = ", ".join(sorted(columns)[:8]) or "none"
        run.notes.append(f"no loss scalar in the event files (tags: {tags})")


# ------------------------------------------------------------------------------ records


def _scalars(data: bytes, path: Path, problems: list[Problem]) -> Iterator[tuple[str, int, float]]:
    pos, index, n = 0, 0, len(data)
    while pos < n:
        index += 1
        if n - pos < 12:
            problems.append(
                Problem(str(path), f"record {index} is torn (the writer was stopped)", None, "log")
            )
            return
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        if _masked_crc32c(header) != length_crc:
            problems.append(
                Problem(str(path), f"record {index}: bad length checksum (not an event file?)", None, "log")
            )
            return
        if length > MAX_RECORD or pos + 12 + length + 4 > n:
            problems.append(
                Problem(str(path), f"record {index} is torn or too long ({length} bytes)", None, "log")
            )
            return
        body = data[pos + 12 : pos + 12 + length]
        pos += 12 + length + 4
        try:
            yield from _event_scalars(body)
        except ValueError as exc:
            problems.append(Problem(str(path), f"record {index}: not an Event ({exc})", None, "log"))


def _event_scalars(body: bytes) -> Iterator[tuple[str, int, float]]:
    """The (tag, step, value) scalars of one serialized `Event`."""
    step = 0
    summaries: list[bytes] = []
    for field, wire, value in _fields(body):
        if field == 2 and wire == 0:  # int64 step
            step = _signed(value)
        elif field == 5 and wire == 2:  # Summary summary
            summaries.append(value)  # type: ignore[arg-type]
    for summary in summaries:
        for field, wire, value in _fields(summary):
            if field == 1 and wire == 2:  # repeated Value value
                found = _value(value)  # type: ignore[arg-type]
                if found is not None:
                    yield found[0], step, found[1]


def _value(body: bytes) -> tuple[str, float] | None:
    tag, number = None, None
    for field, wire, value in _fields(body):
        if field == 1 and wire == 2:  # string tag
            tag = bytes(value).decode("utf-8", "replace")
        elif field == 2 and wire == 5:  # float simple_value
            number = struct.unpack("<f", value)[0]  # type: ignore[arg-type]
        elif field == 8 and wire == 2:  # TensorProto tensor (a scalar from a TF2-style writer)
            number = _tensor_scalar(value)  # type: ignore[arg-type]
    return (tag, float(number)) if tag is not None and number is not None else None


def _tensor_scalar(body: bytes) -> float | None:
    """A one-element float/double TensorProto: `float_val` (5), `double_val` (6) or `tensor_content` (4)."""
    dtype, content = None, None
    for field, wire, value in _fields(body):
        if field == 1 and wire == 0:
            dtype = value
        elif field == 4 and wire == 2:
            content = bytes(value)
        elif field == 5 and wire == 2 and len(value) >= 4:  # type: ignore[arg-type]
            return float(struct.unpack("<f", value[:4])[0])  # type: ignore[index]
        elif field == 5 and wire == 5:
            return float(struct.unpack("<f", value)[0])  # type: ignore[arg-type]
        elif field == 6 and wire == 2 and len(value) >= 8:  # type: ignore[arg-type]
            return float(struct.unpack("<d", value[:8])[0])  # type: ignore[index]
        elif field == 6 and wire == 1:
            return float(struct.unpack("<d", value)[0])  # type: ignore[arg-type]
    if content is not None and dtype == 1 and len(content) == 4:  # DT_FLOAT
        return float(struct.unpack("<f", content)[0])
    if content is not None and dtype == 2 and len(content) == 8:  # DT_DOUBLE
        return float(struct.unpack("<d", content)[0])
    return None


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of a protobuf message: ints for varints, bytes otherwise."""
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value
        elif wire == 1:
            if pos + 8 > n:
                raise ValueError("truncated fixed64")
            yield field, wire, buf[pos : pos + 8]
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > n:
                raise ValueError("truncated length-delimited field")
            yield field, wire, buf[pos : pos + length]
            pos += length
        elif wire == 5:
            if pos + 4 > n:
                raise ValueError("truncated fixed32")
            yield field, wire, buf[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"wire type {wire}")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _signed(value: int | bytes) -> int:
    v = int(value)
    return v - (1 << 64) if v >= 1 << 63 else v


# CRC-32C (Castagnoli), as TFRecord framing uses it, masked the way TensorFlow masks it
def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
