"""Hugging Face Trainer outputs: an output dir, one `checkpoint-N/`, or a bare trainer_state.json.

Curves come from `trainer_state.json`'s `log_history`; the optimizer's moments and the adapter
come from the newest *complete* checkpoint, because a crash while saving leaves a newest
checkpoint that is half-written and must not be judged (or crash the reader).
"""

from __future__ import annotations

import json
import os
import re
import stat
import zipfile
from pathlib import Path
from typing import Any

import orjson

from trainmedic.findings import Problem
from trainmedic.record.hf_log import curves_from_log_history
from trainmedic.run import AdapterWeights, Run

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "trainer_state.json"
ADAPTER_NAMES = ("adapter_model.safetensors", "model.safetensors")
OTHER_WEIGHTS = ("model.safetensors.index.json", "adapter_model.bin", "pytorch_model.bin")
MAX_STATE_BYTES = 512 * 1024 * 1024
MAX_PROBLEMS = 20


def is_regular(path: Path) -> bool:
    """A regular file (following links); False for missing, FIFOs, dirs and symlink loops."""
    return _size(path) >= 0


def _size(path: Path) -> int:
    """Size of a regular file; -1 for anything that is not one (or cannot be looked at)."""
    try:
        st = os.stat(path)
    except OSError:
        return -1
    return st.st_size if stat.S_ISREG(st.st_mode) else -1


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """`checkpoint-N` subdirectories, newest (largest N) first."""
    found = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    for entry in entries:
        m = CHECKPOINT_RE.match(entry.name)
        try:
            if m and entry.is_dir():
                found.append((int(m.group(1)), Path(entry.path)))
        except OSError:
            continue
    return sorted(found, reverse=True)


def incomplete_reason(ckpt: Path) -> str | None:
    """Why a checkpoint is not complete (None when it is): what a crash mid-save leaves behind."""
    if _size(ckpt / STATE_NAME) <= 0:
        return f"no {STATE_NAME}"
    if not any(_size(ckpt / n) > 0 for n in ADAPTER_NAMES + OTHER_WEIGHTS):
        return "no weights file"
    opt = ckpt / "optimizer.pt"
    if os.path.lexists(opt):
        if _size(opt) <= 0:
            return "optimizer.pt is empty or not a file"
        try:
            if not zipfile.is_zipfile(opt):
                return "optimizer.pt is not a complete zip archive"
        except OSError as exc:
            return f"optimizer.pt cannot be read ({exc.strerror or exc})"
    return None


def read_state_json(path: Path, run: Run) -> dict[str, Any] | None:
    """Parse trainer_state.json; bare NaN/Infinity literals are accepted (HF writes them)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            run.problems.append(Problem(str(path), "is not a regular file; not read", None, "log"))
            return None
        if st.st_size > MAX_STATE_BYTES:
            run.problems.append(Problem(str(path), f"is {st.st_size} bytes, too large for a trainer state"))
            return None
        with path.open("rb") as fh:
            data = fh.read()
    except OSError as exc:
        run.problems.append(Problem(str(path), f"cannot read: {exc.strerror or exc}", None, "log"))
        return None
    run.sources.append(path)
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
            line = exc.lineno if isinstance(exc, json.JSONDecodeError) else None
            run.problems.append(Problem(str(path), f"not valid JSON ({msg})", line, "log"))
            return None
    if not isinstance(obj, dict) or not isinstance(obj.get("log_history"), list):
        run.problems.append(
            Problem(
                str(path), "not a trainer state: expected an object with a 'log_history' list", None, "log"
            )
        )
        return None
    return obj


def apply_state(run: Run, state: dict[str, Any], path: Path) -> None:
    """Curves, planned length and completion from a parsed trainer state."""
    curves = curves_from_log_history(state["log_history"])
    run.train_loss, run.grad_norm = curves.train_loss, curves.grad_norm
    run.learning_rate, run.eval_loss, run.extra = curves.learning_rate, curves.eval_loss, curves.extra
    run.notes.extend(curves.notes)
    for msg in curves.skipped[:MAX_PROBLEMS]:
        run.problems.append(Problem(str(path), msg, None, "log"))
    if len(curves.skipped) > MAX_PROBLEMS:
        run.problems.append(Problem(str(path), f"and {len(curves.skipped) - MAX_PROBLEMS} more problem(s)"))
    meta: dict[str, Any] = state["meta"] if isinstance(state.get("meta"), dict) else {}
    max_steps = _int(state.get("max_steps", meta.get("max_steps")))
    global_step = _int(state.get("global_step", meta.get("global_step")))
    if max_steps and max_steps > 0:
        run.max_steps = max_steps
    finished = any(isinstance(e, dict) and "train_runtime" in e for e in state["log_history"])
    if finished or (max_steps and global_step is not None and global_step >= max_steps):
        run.completed = True
    elif max_steps and global_step is not None:
        run.completed = False


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def weights_file(folder: Path) -> Path | None:
    for name in ADAPTER_NAMES:
        if is_regular(folder / name):
            return folder / name
    return None


def load_adapter(weights: Path, run: Run) -> AdapterWeights | None:
    """Read a safetensors file (+ adapter_config.json beside it); problems go to `run`."""
    from trainmedic.record.safetensors import read_safetensors

    config = weights.parent / "adapter_config.json"
    config_path = config if is_regular(config) else None
    try:
        adapter = read_safetensors(weights, config_path=config_path)
    except Exception as exc:  # ReadError names the file; anything else still must not escape
        run.problems.append(_problem(weights, exc, "adapter"))
        return None
    run.sources.append(weights)
    if config_path is not None:
        run.sources.append(config_path)
    return adapter


def load_optimizer(path: Path, run: Run, adapter: AdapterWeights | None) -> None:
    """Read a torch-saved optimizer/training state without torch; problems go to `run`."""
    try:
        # Imported here: the optimizer path is the only one that needs the pickle machinery.
        from trainmedic.record.optimizer import optimizer_state_from
        from trainmedic.record.torchfile import load_torch_file

        obj = load_torch_file(path)
        run.sources.append(path)
        run.optimizer = optimizer_state_from(obj, path, adapter=adapter)
    except Exception as exc:
        run.problems.append(_problem(path, exc, "optimizer"))


def _problem(path: Path, exc: Exception, artifact: str) -> Problem:
    from trainmedic.record.errors import ReadError

    if isinstance(exc, ReadError):
        return Problem(exc.path, exc.message, exc.line, artifact)
    return Problem(str(path), f"could not be read: {type(exc).__name__}: {exc}", None, artifact)


def read_checkpoint_artifacts(ckpt: Path, run: Run, weights_dir: Path | None = None) -> None:
    """Adapter (from `weights_dir` when given, else the checkpoint) and optimizer of `ckpt`."""
    weights = weights_file(weights_dir or ckpt)
    if weights is None and weights_dir is not None:
        weights = weights_file(ckpt)
    if weights is not None:
        run.adapter = load_adapter(weights, run)
    else:
        run.notes.append(f"no adapter_model.safetensors or model.safetensors in {ckpt.name}")
    opt = ckpt / "optimizer.pt"
    if os.path.lexists(opt):
        load_optimizer(opt, run, run.adapter)
    else:
        run.notes.append(f"no optimizer.pt in {ckpt.name}: optimizer state not checked")


def read_output_dir(root: Path) -> Run:
    """An output dir: curves from the most complete trainer state, artifacts from the newest
    complete checkpoint (the root's final weights win for the adapter when present)."""
    run = Run(path=root, layout="HF output dir")
    ckpts = checkpoints(root)
    chosen = newest_complete(ckpts, run)

    state_path: Path | None = root / STATE_NAME
    if not os.path.lexists(root / STATE_NAME):
        state_path = chosen / STATE_NAME if chosen is not None else _any_state(ckpts)
    if state_path is not None and os.path.lexists(state_path):
        state = read_state_json(state_path, run)
        if state is not None:
            apply_state(run, state, state_path)
            run.notes.append(f"curves from {state_path.relative_to(root)}")
    else:
        run.notes.append(f"no {STATE_NAME} found: no curves to check")
    run.label = read_output_artifacts(root, run, chosen, len(ckpts))
    return run


def newest_complete(ckpts: list[tuple[int, Path]], run: Run) -> Path | None:
    """The newest checkpoint a crash did not leave half-written; skipped ones are noted."""
    for _, ckpt in ckpts:
        why = incomplete_reason(ckpt)
        if why is None:
            return ckpt
        run.notes.append(f"{ckpt.name} skipped: incomplete ({why}; interrupted while saving?)")
    return None


def read_output_artifacts(root: Path, run: Run, chosen: Path | None, n_ckpts: int) -> str:
    """Adapter and optimizer of an output dir into `run`; returns what was judged, in words."""
    root_weights = weights_file(root)
    if chosen is not None:
        read_checkpoint_artifacts(chosen, run, weights_dir=root if root_weights else None)
        if root_weights is not None:
            run.notes.append(f"adapter from the output dir's final {root_weights.name}")
        return f"{chosen.name} (newest complete of {n_ckpts})"
    if n_ckpts:
        run.notes.append("no complete checkpoint: optimizer state not checked")
    if root_weights is not None:
        run.adapter = load_adapter(root_weights, run)
    if is_regular(root / "optimizer.pt"):
        load_optimizer(root / "optimizer.pt", run, run.adapter)
    return "output dir (final weights)" if root_weights else "output dir"


def _any_state(ckpts: list[tuple[int, Path]]) -> Path | None:
    for _, ckpt in ckpts:
        if is_regular(ckpt / STATE_NAME):
            return ckpt / STATE_NAME
    return None


def read_checkpoint(ckpt: Path) -> Run:
    """One checkpoint directory, judged as it is (an incomplete one is read and said to be so)."""
    run = Run(path=ckpt, layout="HF checkpoint", label=ckpt.name)
    why = incomplete_reason(ckpt)
    if why is not None:
        run.notes.append(f"{ckpt.name} looks incomplete ({why})")
    state_path = ckpt / STATE_NAME
    if os.path.lexists(state_path):
        state = read_state_json(state_path, run)
        if state is not None:
            apply_state(run, state, state_path)
    read_checkpoint_artifacts(ckpt, run)
    return run


def read_state_file(path: Path) -> Run:
    """A bare trainer_state.json (or a `{"log_history": [...]}` wrapper): curves only."""
    run = Run(path=path, layout="trainer_state.json", label=path.name)
    state = read_state_json(path, run)
    if state is not None:
        apply_state(run, state, path)
    return run
