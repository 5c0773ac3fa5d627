"""`load_run`: any supported PATH to a `Run`, never raising for bad file content."""

from __future__ import annotations

from pathlib import Path

from trainmedic.findings import Problem
from trainmedic.record import dlm, hf
from trainmedic.record.detect import Layout, detect
from trainmedic.record.jsonlog import read_logs
from trainmedic.record.segments import fill_latest_run, run_label
from trainmedic.run import Run


def load_run(path: Path) -> Run:
    """Read the training run at `path`; every problem ends up in `run.problems`/`run.notes`."""
    path = Path(path)
    try:
        return _load(path)
    except Exception as exc:  # a reader bug must surface as a named problem, not a traceback
        run = Run(path=path, layout=Layout.UNKNOWN.value)
        run.problems.append(
            Problem(str(path), f"internal error while reading: {type(exc).__name__}: {exc}", None, "layout")
        )
        return run


def _load(path: Path) -> Run:
    found = detect(path)
    layout = found.layout
    if layout is Layout.DLM_STORE:
        return dlm.read_store(path)
    if layout is Layout.HF_OUTPUT_DIR:
        return hf.read_output_dir(path)
    if layout is Layout.HF_CHECKPOINT:
        return hf.read_checkpoint(path)
    if layout is Layout.TRAINER_STATE:
        return hf.read_state_file(path)
    if layout is Layout.JSONL:
        return read_jsonl_run(path, found.files)
    run = Run(path=path, layout=layout.value)
    if found.note:
        run.notes.append(found.note)
    return run


def read_jsonl_run(path: Path, files: list[Path]) -> Run:
    """A bare log file or a directory of them (trainmedic's run log, or dlm-style logs)."""
    rec = read_logs(files)
    layout = Layout.RUN_LOG if "trainmedic" in rec.writers() else Layout.JSONL
    run = Run(path=path, layout=layout.value)
    if fill_latest_run(run, rec, run_label) is None:
        run.notes.append("the log holds no training run (no step or banner records)")
    return run
