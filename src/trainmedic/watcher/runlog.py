"""The live watcher's run log: one JSON line per record, appended and flushed as it happens.

Records are in the `type`-record family of dlm's `logs/train-*.jsonl` (`banner`, `step`, `event`,
`action`, `eval`, `checkpoint`, `run_complete`), so `trainmedic check` and dlm-log readers read it.
Each record is one `os.write` on a file opened with `O_APPEND`: nothing waits in a user-space
buffer, so a crashed process loses at most the record being written, and a torn last line is
what readers expect after a crash. Non-finite floats are written as the bare literals
`NaN`/`Infinity`/`-Infinity` (as dlm and Hugging Face do) rather than dropped: a NaN loss is the
most important number in the log.

Every open starts a new file, `<output_dir>/logs/train-<run_id>-<YYYYmmddTHHMMSS>.jsonl` (UTC),
with a banner; a resumed run passes its `run_id` again and `resumed_from_step`, and readers join
the files by run id, the latest record of a step winning. A file is never truncated.

Every banner also records how the process was launched (`launch`: argv, cwd, the Python
executable and the launcher's environment), so `trainmedic resume OUTPUT_DIR` can start the same
command again after the process died.

Pure Python on purpose (no torch): the supervisor hands in Python numbers.
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

import trainmedic

STATUSES = ("completed", "stopped", "crashed")
SEVERITIES = ("info", "warn", "fail")
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "numpy")
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]")
_ORJSON_OPTS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
_SIMPLE = (str, int, bool, type(None))
# What torchrun/accelerate set that a relaunch needs: how many processes, on how many nodes.
LAUNCH_ENV = (
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "GROUP_WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
)


class RunLog:
    """Appends records to one run log file; use `RunLog.open`, ideally as a context manager."""

    def __init__(self, path: Path, run_id: str, fd: int) -> None:
        self.path = path
        self.run_id = run_id
        self.records = 0
        self._fd: int | None = fd

    @classmethod
    def open(
        cls,
        output_dir: str | os.PathLike[str],
        run_id: str | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        versions: Mapping[str, Any] | None = None,
        max_steps: int | None = None,
        resumed_from_step: int | None = None,
        **banner_extra: Any,
    ) -> RunLog:
        """Open a new log file under `output_dir/logs/` and write its banner.

        `run_id` defaults to a fresh random id (`tm` + 8 hex digits); pass the original one when
        resuming a run.
        `versions` is merged over the installed versions of the training stack (read from
        package metadata, so nothing is imported).
        """
        # Never all digits: dlm names its logs `train-<number>-...`, and readers tell them apart.
        rid = str(run_id) if run_id is not None else f"tm{secrets.token_hex(4)}"
        if not rid:
            raise ValueError("run_id must not be empty")
        started = _now()
        logs = Path(output_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / f"train-{_SAFE_ID.sub('_', rid)}-{started:%Y%m%dT%H%M%S}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        log = cls(path, rid, fd)
        try:
            log._end_torn_line()
            log.banner(
                config=config,
                versions=versions,
                max_steps=max_steps,
                resumed_from_step=resumed_from_step,
                timestamp=started,
                **banner_extra,
            )
        except BaseException:
            log.close()
            raise
        return log

    # ------------------------------------------------------------------ records

    def banner(
        self,
        *,
        config: Mapping[str, Any] | None = None,
        versions: Mapping[str, Any] | None = None,
        max_steps: int | None = None,
        resumed_from_step: int | None = None,
        timestamp: datetime | None = None,
        **extra: Any,
    ) -> None:
        """The record that opens a run (or a resumed part of one) in this file."""
        self.write(
            {
                "type": "banner",
                "writer": "trainmedic",
                "version": trainmedic.__version__,
                "run_id": self.run_id,
                "timestamp": _iso(timestamp),
                "config": dict(config or {}),
                "versions": {**installed_versions(), **dict(versions or {})},
                "max_steps": _opt_int(max_steps),
                "resumed_from_step": _opt_int(resumed_from_step),
                "launch": launch_record(),
                **extra,
            }
        )

    def step(
        self,
        step: int,
        *,
        loss: float | None,
        lr: float | None,
        grad_norm: float | None,
        grad_norm_after_clip: float | None = None,
        skipped: bool = False,
        tokens: int | None = None,
        time: float | None = None,
        **extra: Any,
    ) -> None:
        """One optimizer step's vitals; `time` is this step's duration in seconds.

        Extras (`epoch`, `rewards/margins`, ...) are written as given, after the fixed fields.
        """
        self.write(
            {
                "type": "step",
                "step": int(step),
                "loss": _opt_float(loss),
                "lr": _opt_float(lr),
                "grad_norm": _opt_float(grad_norm),
                "grad_norm_after_clip": _opt_float(grad_norm_after_clip),
                "skipped": bool(skipped),
                "tokens": _opt_int(tokens),
                "time": _opt_float(time),
                "timestamp": _iso(),
                **extra,
            }
        )

    def event(
        self, step: int, rule: str, severity: str, message: str, evidence: Mapping[str, Any] | None = None
    ) -> None:
        """A detection: `rule` fired at `step`; `severity` is info, warn or fail."""
        if severity not in SEVERITIES:
            raise ValueError(f"event severity must be one of {SEVERITIES}, not {severity!r}")
        self.write(
            {
                "type": "event",
                "step": int(step),
                "rule": str(rule),
                "severity": severity,
                "message": str(message),
                "evidence": dict(evidence or {}),
                "timestamp": _iso(),
            }
        )

    def action(self, step: int, action: str, reason: str, detail: Mapping[str, Any] | None = None) -> None:
        """A treatment (`clip`, `skip`, `stop`, ...) applied at `step`, and why."""
        self.write(
            {
                "type": "action",
                "step": int(step),
                "action": str(action),
                "reason": str(reason),
                "detail": dict(detail or {}),
                "timestamp": _iso(),
            }
        )

    def eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Evaluation metrics at `step` (Hugging Face's names: `eval_loss`, `eval_runtime`, ...)."""
        self.write({"type": "eval", "step": int(step), **metrics, "timestamp": _iso()})

    def checkpoint(self, step: int, path: str | os.PathLike[str], **fields: Any) -> None:
        """A checkpoint saved at `step` (certification details go in `fields`)."""
        rec = {"type": "checkpoint", "step": int(step), "path": str(path), **fields, "timestamp": _iso()}
        self.write(rec)

    def run_complete(self, step: int, status: str, reason: str, steps: int) -> None:
        """How the run ended: `completed`, `stopped` (on purpose) or `crashed`, in plain words."""
        if status not in STATUSES:
            raise ValueError(f"run_complete status must be one of {STATUSES}, not {status!r}")
        self.write(
            {
                "type": "run_complete",
                "run_id": self.run_id,
                "step": int(step),
                "status": status,
                "reason": str(reason),
                "steps": int(steps),
                "timestamp": _iso(),
            }
        )

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (it must have a `type`) as one line, in one system call.

        A record without a `timestamp` gets one, so records built elsewhere (`to_record()`)
        look like the ones the methods above write.
        """
        fd = self._fd
        if fd is None:
            raise ValueError(f"run log {self.path} is closed")
        if "type" not in record:
            raise ValueError("a run log record needs a 'type'")
        if "timestamp" not in record:
            record = {**record, "timestamp": _iso()}
        data = encode(record)
        while data:
            written = os.write(fd, data)
            data = data[written:]
        self.records += 1

    # ------------------------------------------------------------------ lifecycle

    @property
    def closed(self) -> bool:
        return self._fd is None

    def sync(self) -> None:
        """Force the records to disk (a process crash loses nothing already written anyway;
        this is for power loss, e.g. before declaring a checkpoint good)."""
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        """Sync and close; closing twice is fine."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunLog({str(self.path)!r}, run_id={self.run_id!r}, records={self.records})"

    def _end_torn_line(self) -> None:
        """Two opens of one run in the same second share a file: end a torn last line first."""
        assert self._fd is not None
        try:
            with self.path.open("rb") as fh:
                if fh.seek(0, os.SEEK_END) == 0:
                    return
                fh.seek(-1, os.SEEK_END)
                torn = fh.read(1) != b"\n"
        except OSError:
            return
        if torn:
            os.write(self._fd, b"\n")


# ---------------------------------------------------------------------- encoding


def encode(record: Mapping[str, Any]) -> bytes:
    """One JSON line. orjson when every float is finite (the common case, a few µs); otherwise
    Python's json, which writes NaN/Infinity literals where orjson would write a silent null."""
    if _finite(record):
        try:
            return orjson.dumps(record, option=_ORJSON_OPTS)
        except (TypeError, orjson.JSONEncodeError):
            pass  # a type orjson does not know: the plain path converts it
    text = json.dumps(to_plain(record), allow_nan=True, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8") + b"\n"


def _finite(obj: Any) -> bool:
    """True when `obj` holds only plain JSON values and finite floats (nothing to convert)."""
    for value in obj.values() if isinstance(obj, Mapping) else obj:
        t = type(value)
        if t is float:
            if value - value != 0.0:  # NaN and +-inf give NaN here; every finite float gives 0.0
                return False
        elif t is dict or t is list or t is tuple:
            if not _finite(value):
                return False
        elif t not in _SIMPLE:
            return False
    return True


def to_plain(obj: Any) -> Any:
    """A copy made of JSON types only: numpy/torch scalars unwrapped, paths and the rest as text."""
    if obj is None or isinstance(obj, str | bool | int | float):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    item = getattr(obj, "item", None)
    if callable(item) and getattr(obj, "ndim", 0) == 0:
        try:
            return to_plain(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        try:
            return to_plain(tolist())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


def installed_versions() -> dict[str, str]:
    """Python and the training stack's versions, from package metadata (nothing imported)."""
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def launch_record() -> dict[str, Any]:
    """How this process was started: enough to start the same command again (`trainmedic resume`).

    `orig_argv` keeps `-m module` and interpreter flags that `argv` loses; `env` holds only the
    launcher's variables (never the whole environment: it may hold secrets).
    """
    return {
        "argv": list(sys.argv),
        "orig_argv": list(getattr(sys, "orig_argv", sys.argv)),
        "cwd": _cwd(),
        "python": sys.executable,
        "env": {k: os.environ[k] for k in LAUNCH_ENV if k in os.environ},
    }


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # the directory was deleted under us
        return None


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).isoformat(timespec="milliseconds")


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
