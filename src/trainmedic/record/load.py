"""`load_run`: any supported PATH to a `Run`, never raising for bad file content."""

from __future__ import annotations

import os
from pathlib import Path

from trainmedic.findings import Problem
from trainmedic.record import dlm, hf
from trainmedic.record.detect import Layout, detect
from trainmedic.record.jsonlog import read_logs
from trainmedic.record.segments import fill_latest_run, run_holding, run_label, segment_files
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
    if layout is Layout.WATCHED_HF_OUTPUT_DIR:
        return read_watched_output_dir(path, found.files)
    if layout is Layout.WATCHED_HF_CHECKPOINT:
        return read_watched_checkpoint(path, found.files)
    if layout in OTHER_TOOLS:
        return read_other_tool(path, layout, found.files)
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


def read_watched_output_dir(root: Path, logs: list[Path]) -> Run:
    """An HF output dir with trainmedic's run log: curves, events and actions from the per-step
    log (every step, raw losses, what the watcher did), optimizer and adapter as for a plain
    output dir. Logs without a trainmedic banner are not a live record: read the dir without them.
    """
    rec = read_logs(logs)
    if "trainmedic" not in rec.writers():
        has_hf = bool(hf.checkpoints(root)) or os.path.lexists(root / hf.STATE_NAME)
        if has_hf or hf.weights_file(root) is not None:
            run = hf.read_output_dir(root)
            run.notes.append("logs/train-*.jsonl has no trainmedic banner: not read as a live record")
            return run
        return read_jsonl_run(root, logs)
    run = Run(path=root, layout=Layout.WATCHED_HF_OUTPUT_DIR.value)
    seg = fill_latest_run(run, rec, run_label)
    if seg is None:
        run.notes.append("the run log holds no training run (no step or banner records)")
    else:
        run.notes.append(f"curves, events and actions from the trainmedic run log ({len(rec.files)} file(s))")
    ckpts = hf.checkpoints(root)
    chosen = hf.newest_complete(ckpts, run)
    judged = hf.read_output_artifacts(root, run, chosen, len(ckpts))
    run.label = f"{run.label}, {judged}" if run.label else judged
    last = int(run.train_loss.steps[-1]) if len(run.train_loss) else None
    saved_at = next((n for n, c in ckpts if c == chosen), None)
    if saved_at is not None and last is not None and saved_at > last:
        run.notes.append(
            f"checkpoint-{saved_at} is past the judged run's last logged step {last}: "
            "it may come from an earlier run in this directory"
        )
    return run


def read_watched_checkpoint(ckpt: Path, logs: list[Path]) -> Run:
    """One `checkpoint-N/` of a watched run: the run that saved it is judged from the run log beside
    it, exactly as the output dir would judge it, with this checkpoint's weights and optimizer.

    The checkpoint's own `trainer_state.json` is the Trainer's view, which holds the raw values of
    the steps the watcher treated (a NaN whose update was skipped); read alone, a healed run's
    checkpoint would fail where its output dir passes. The run is the one the checkpoint's
    `trainmedic_state.json` names, else the latest whose steps reach N.
    """
    rec = read_logs(logs)
    if "trainmedic" not in rec.writers():
        run = hf.read_checkpoint(ckpt)
        run.notes.append("logs/train-*.jsonl beside it has no trainmedic banner: not read as a live record")
        return run
    step = int(ckpt.name.rsplit("-", 1)[1])
    run = Run(path=ckpt, layout=Layout.WATCHED_HF_CHECKPOINT.value)
    seg = fill_latest_run(run, rec, run_label, choose=run_holding(_saved_run_id(ckpt), step))
    if seg is None:
        run.notes.append("the run log holds no training run (no step or banner records)")
    else:
        files = ", ".join(f"logs/{Path(f).name}" for f in segment_files(rec, seg))
        run.notes.append(
            f"curves, events and actions of {run.label} from its run log ({files}), not from "
            f"{ckpt.name}/{hf.STATE_NAME}; weights and optimizer from {ckpt.name}"
        )
        last = int(run.train_loss.steps[-1]) if len(run.train_loss) else None
        if last is not None and last > step:
            run.notes.append(f"the run went on after {ckpt.name}, to step {last}")
    why = hf.incomplete_reason(ckpt)
    if why is not None:
        run.notes.append(f"{ckpt.name} looks incomplete ({why})")
    hf.read_checkpoint_artifacts(ckpt, run)
    run.label = f"{run.label}, {ckpt.name}" if run.label else ckpt.name
    return run


def _saved_run_id(ckpt: Path) -> str | None:
    """The run id the watcher saved beside the checkpoint, if any."""
    from trainmedic.record.treatment import read_treatment

    rid = (read_treatment(ckpt) or {}).get("run_id")
    return rid if isinstance(rid, str) else None


OTHER_TOOLS = frozenset(
    {
        Layout.LLAMAFACTORY_DIR,
        Layout.LLAMAFACTORY_LOG,
        Layout.TENSORBOARD,
        Layout.LIGHTNING,
        Layout.TORCHTUNE,
        Layout.MLFLOW,
    }
)


def read_other_tool(path: Path, layout: Layout, files: list[Path]) -> Run:
    """A log another tool wrote (LLaMA-Factory, TensorBoard, Lightning): its curves, and the newest
    complete checkpoint's adapter and optimizer when the directory holds HF checkpoints."""
    from trainmedic.record import lightning, llamafactory, textlogs, tfevents

    run = Run(path=path, layout=layout.value, label=path.name)
    if layout in (Layout.LLAMAFACTORY_DIR, Layout.LLAMAFACTORY_LOG):
        llamafactory.read_trainer_log(files[0], run)
    elif layout is Layout.TENSORBOARD:
        tfevents.read_event_files(files, run)
    elif layout is Layout.TORCHTUNE:
        textlogs.read_torchtune(files, run)
    elif layout is Layout.MLFLOW:
        *earlier, newest = files
        textlogs.read_mlflow(newest, run)
        if earlier:
            run.notes.append(f"{len(earlier) + 1} MLflow runs here; judging the newest ({newest.name})")
        files = [newest / "metrics"]
    else:
        lightning.read_metrics_csv(files[0], run)
    where = path if path.is_dir() else path.parent
    shown = ", ".join(_shown(f, where) for f in files[:3]) + (
        f" (+{len(files) - 3} more)" if len(files) > 3 else ""
    )
    run.notes.append(f"curves from {shown}")
    if path.is_dir():
        ckpts = hf.checkpoints(path)
        if ckpts:
            chosen = hf.newest_complete(ckpts, run)
            run.label = hf.read_output_artifacts(path, run, chosen, len(ckpts))
        elif hf.weights_file(path) is not None:
            run.label = hf.read_output_artifacts(path, run, None, 0)
    return run


def _shown(file: Path, root: Path) -> str:
    try:
        return str(file.relative_to(root))
    except ValueError:
        return str(file)
