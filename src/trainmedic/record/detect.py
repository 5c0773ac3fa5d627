"""Recognise what a PATH holds, from names and file types (and the first bytes of a `.json`).

A Hugging Face output dir watched by trainmedic also holds its run log,
`logs/train-<run_id>-<YYYYmmddTHHMMSS>.jsonl`: that is a "watched HF output dir", and each of its
`checkpoint-N/` a "watched HF checkpoint", judged with the run log of the run that saved it. dlm names its
logs the same way, so the run log only decides between the two when the directory also holds
something a dlm store never does (checkpoints, a trainer state, root weights, a postmortem) or its
run id is not dlm's number; the reader confirms the trainmedic banner and falls back otherwise.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from trainmedic.record import dlm, hf, lightning, llamafactory, textlogs, tfevents

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
RUN_LOG_RE = re.compile(r"^train-(.+)-(\d{8}T\d{6})\.jsonl$")
POSTMORTEM_NAME = "trainmedic-postmortem.json"


class Layout(StrEnum):
    """User-facing names of the layouts `check` reads."""

    DLM_STORE = "dlm store"
    HF_OUTPUT_DIR = "HF output dir"
    WATCHED_HF_OUTPUT_DIR = "watched HF output dir"
    WATCHED_HF_CHECKPOINT = "watched HF checkpoint"
    HF_CHECKPOINT = "HF checkpoint"
    TRAINER_STATE = "trainer_state.json"
    RUN_LOG = "trainmedic run log"
    LLAMAFACTORY_DIR = "LLaMA-Factory output dir"
    LLAMAFACTORY_LOG = "LLaMA-Factory log"
    TENSORBOARD = "TensorBoard events"
    TORCHTUNE = "torchtune log"
    MLFLOW = "MLflow run"
    LIGHTNING = "Lightning metrics.csv"
    REPORT = "trainmedic report"
    POSTMORTEM = "trainmedic postmortem"
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
    if tfevents.is_event_file(name) or name.endswith(".tfevents"):
        return Detected(Layout.TENSORBOARD, files=[path])
    if name.endswith(JSONL_SUFFIXES):
        if name == llamafactory.LOG_NAME or llamafactory.looks_like(_first_line(path)):
            return Detected(Layout.LLAMAFACTORY_LOG, files=[path])
        return Detected(Layout.JSONL, files=[path])
    if name.endswith(".csv"):
        return Detected(Layout.LIGHTNING, files=[path])
    if textlogs.TORCHTUNE_RE.match(name):
        return Detected(Layout.TORCHTUNE, files=[path])
    if name.endswith(JSON_SUFFIXES):
        return _detect_json(path)
    return Detected(
        Layout.UNKNOWN,
        note=f"{path.name}: not a file trainmedic reads (give a run directory, a trainer_state.json "
        "or a .jsonl log)",
    )


def _detect_json(path: Path) -> Detected:
    """A `.json` file is read as a trainer state, unless its first bytes say it is one of
    trainmedic's own files (a `check --json` report, a postmortem): those are not a run."""
    if path.name == POSTMORTEM_NAME:
        return _not_a_run(Layout.POSTMORTEM, path)
    try:
        with path.open("rb") as fh:
            head = fh.read(512)
    except OSError:
        return Detected(Layout.TRAINER_STATE)  # the reader names the error
    compact = head.replace(b" ", b"").replace(b"\n", b"")
    if compact.startswith(b'{"schema_version":') and b'"tool":"trainmedic"' in compact:
        return _not_a_run(Layout.REPORT, path)
    if compact.startswith(b'{"schema_version":') and b'"writer":"trainmedic"' in compact:
        return _not_a_run(Layout.POSTMORTEM, path)
    return Detected(Layout.TRAINER_STATE)


def _not_a_run(layout: Layout, path: Path) -> Detected:
    what = {
        Layout.REPORT: "a trainmedic check report, not a training run "
        f"(show it: trainmedic report {path.name})",
        Layout.POSTMORTEM: "trainmedic's postmortem of a watched run; check the run's output dir instead",
    }[layout]
    return Detected(layout, note=f"{path.name}: {what}")


def _detect_dir(path: Path) -> Detected:
    try:
        entries = sorted(e.name for e in os.scandir(path) if not e.name.startswith("."))
    except OSError as exc:
        return Detected(Layout.UNKNOWN, note=f"{path}: cannot list the directory ({exc.strerror or exc})")
    if not entries:
        return Detected(Layout.EMPTY, note="no training artifacts found")
    if hf.CHECKPOINT_RE.match(path.name):
        # a checkpoint of a watched run: the run log beside it is that run's true record (its own
        # trainer_state.json holds the raw values of steps the watcher treated)
        parent_logs = run_log_files(path.parent / "logs")
        if parent_logs:
            return Detected(Layout.WATCHED_HF_CHECKPOINT, files=parent_logs)
    run_logs = run_log_files(path / "logs") if "logs" in entries else []
    has_ckpts = bool(hf.checkpoints(path))
    has_state = os.path.lexists(path / hf.STATE_NAME)
    if run_logs and (
        has_ckpts or has_state or POSTMORTEM_NAME in entries or hf.weights_file(path) is not None
    ):
        return Detected(Layout.WATCHED_HF_OUTPUT_DIR, files=run_logs)
    if dlm.is_dlm_store(path):
        return Detected(Layout.DLM_STORE)
    if run_logs:  # a watched run that saved nothing yet (and whose run id is not dlm's number)
        return Detected(Layout.WATCHED_HF_OUTPUT_DIR, files=run_logs)
    if has_ckpts and llamafactory.LOG_NAME in entries:
        # LLaMA-Factory writes trainer_state.json only when training ends: a killed run has its
        # own log and checkpoints
        return Detected(Layout.LLAMAFACTORY_DIR, files=[path / llamafactory.LOG_NAME])
    if has_ckpts:
        return Detected(Layout.HF_OUTPUT_DIR)
    if hf.CHECKPOINT_RE.match(path.name) or (has_state and os.path.lexists(path / "optimizer.pt")):
        return Detected(Layout.HF_CHECKPOINT)
    if has_state or hf.weights_file(path) is not None:
        return Detected(Layout.HF_OUTPUT_DIR)
    other = _other_tool(path, entries)
    if other is not None:
        return other
    logs = [path / n for n in sorted(entries, key=log_order) if n.lower().endswith(JSONL_SUFFIXES)]
    if logs:
        return Detected(Layout.JSONL, files=logs)
    shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
    return Detected(Layout.UNKNOWN, note=f"no training artifacts recognised; found: {shown}")


def _other_tool(path: Path, entries: list[str]) -> Detected | None:
    """The logs other tools leave in a directory: LLaMA-Factory's trainer_log.jsonl, TensorBoard
    event files (in the dir or in `runs/<date>/`), Lightning's `lightning_logs/version_N/`."""
    if llamafactory.LOG_NAME in entries:
        return Detected(Layout.LLAMAFACTORY_DIR, files=[path / llamafactory.LOG_NAME])
    versions = lightning.version_dirs(path)
    if not versions and path.name == "lightning_logs":
        versions = lightning.version_dirs(path.parent)
    if versions:
        return Detected(Layout.LIGHTNING, files=[versions[-1] / lightning.METRICS_NAME])
    if lightning.METRICS_NAME in entries:
        return Detected(Layout.LIGHTNING, files=[path / lightning.METRICS_NAME])
    events = tfevents.event_files(path)
    if events:
        return Detected(Layout.TENSORBOARD, files=events)
    tune = textlogs.torchtune_logs(path)
    if tune:
        return Detected(Layout.TORCHTUNE, files=tune)
    store = path / "mlruns" if "mlruns" in entries else path
    if store.name == "mlruns" or "metrics" in entries or "meta.yaml" in entries:
        runs = textlogs.mlflow_runs(store)
        if runs:  # the newest run is judged; the others are named in a note
            return Detected(Layout.MLFLOW, files=runs)
    return None


def _first_line(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.readline(4096)
    except OSError:
        return b""


def log_order(name: str) -> tuple[str, str]:
    """Sort key of log file names: by the start time a run log's name carries, then by name.

    The run id comes first in a run log's name, so plain name order would put a later run with a
    smaller id before an earlier one; segments judge the *latest* run, so order must be by time.
    """
    m = RUN_LOG_RE.match(name)
    return (m.group(2), name) if m else ("", name)


def run_log_files(logs_dir: Path) -> list[Path]:
    """trainmedic run logs (`train-<run_id>-<YYYYmmddTHHMMSS>.jsonl`) in start-time order."""
    try:
        names = [e.name for e in os.scandir(logs_dir) if RUN_LOG_RE.match(e.name)]
    except OSError:
        return []
    return [logs_dir / n for n in sorted(names, key=log_order)]
