"""Two plain-text metric logs: torchtune's `DiskLogger` file and MLflow's file store.

- torchtune writes `log_<unix time>.txt` in its `output_dir`, one line per logged step:
  `Step 12 | loss:2.3451 lr:2e-05 tokens_per_second_per_gpu:812.3 grad_norm:0.91 `.
- MLflow's file store keeps each metric of a run in `mlruns/<experiment>/<run>/metrics/<name>`,
  one `<timestamp ms> <value> <step>` line per logged value (the HF Trainer's `MLflowCallback`
  names them `loss`, `grad_norm`, `learning_rate`, `eval_loss`).

A line that does not parse is a problem naming the file and line; the rest is read.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from trainmedic.findings import Problem
from trainmedic.fsutil import subdirs
from trainmedic.record.columns import Columns, add_problems, pick
from trainmedic.run import Run

MAX_BYTES = 256 * 1024 * 1024
TORCHTUNE_RE = re.compile(r"^log_\d+\.txt$")
_STEP_RE = re.compile(r"^Step (\d+) \| (.*)$")

TRAIN_LOSS = ("loss", "train_loss", "train/loss")
EVAL_LOSS = ("eval_loss", "val_loss", "eval/loss")
GRAD_NORM = ("grad_norm", "train/grad_norm")
LEARNING_RATE = ("lr", "learning_rate", "train/learning_rate")


def torchtune_logs(folder: Path) -> list[Path]:
    """torchtune's `log_<time>.txt` files in `folder`, oldest first (a restart writes a new one)."""
    try:
        return sorted(p for p in folder.iterdir() if TORCHTUNE_RE.match(p.name) and p.is_file())
    except OSError:
        return []


def mlflow_runs(root: Path) -> list[Path]:
    """MLflow run folders (those with a `metrics/` folder) under `root`: a run itself, an
    experiment, or the `mlruns` store; oldest first by their start (`meta.yaml`'s time)."""
    candidates = [root, *subdirs(root), *(g for c in subdirs(root) for g in subdirs(c))]
    runs = [c for c in candidates if (c / "metrics").is_dir()]
    return sorted(runs, key=_start_time)


def _start_time(run: Path) -> tuple[int, str]:
    try:
        for line in (run / "meta.yaml").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("start_time:"):
                return int(line.split(":", 1)[1].strip()), run.name
    except (OSError, ValueError):
        pass
    return 0, run.name


def read_torchtune(files: list[Path], run: Run) -> None:
    columns: Columns = {}
    problems: list[Problem] = []
    for path in files:
        text = _read(path, run)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            m = _STEP_RE.match(line.strip())
            if m is None:
                problems.append(Problem(str(path), "not a 'Step N | name:value ...' line", number, "log"))
                continue
            step = int(m.group(1))
            for pair in m.group(2).split():
                name, sep, raw = pair.partition(":")
                if not sep:
                    continue
                value = _number(raw)
                if value is None:
                    problems.append(Problem(str(path), f"{name} {raw[:40]!r} is not a number", number, "log"))
                    continue
                columns.setdefault(name, {})[step] = value
    _fill(run, columns, problems, files)


def read_mlflow(run_dir: Path, run: Run) -> None:
    metrics = run_dir / "metrics"
    columns: Columns = {}
    problems: list[Problem] = []
    files = sorted(p for p in _files(metrics))
    for path in files:
        text = _read(path, run)
        if text is None:
            continue
        name = str(path.relative_to(metrics))
        for number, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            value = _number(parts[1]) if len(parts) == 3 else None
            if value is None or not parts[2].lstrip("-").isdigit():
                problems.append(Problem(str(path), "not a '<timestamp> <value> <step>' line", number, "log"))
                continue
            columns.setdefault(name, {})[int(parts[2])] = value
    _fill(run, columns, problems, files or [metrics])


def _files(folder: Path) -> list[Path]:
    """Metric files, nested names (`train/loss` is `metrics/train/loss`) included."""
    out: list[Path] = []
    for p in subdirs(folder):
        out.extend(_files(p))
    with contextlib.suppress(OSError):
        out.extend(p for p in folder.iterdir() if p.is_file())
    return out


def _read(path: Path, run: Run) -> str | None:
    try:
        if path.stat().st_size > MAX_BYTES:
            run.problems.append(Problem(str(path), f"is over {MAX_BYTES >> 20} MB; not read", None, "log"))
            return None
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        run.problems.append(Problem(str(path), f"cannot read: {exc.strerror or exc}", None, "log"))
        return None
    run.sources.append(path)
    return text


def _number(raw: str) -> float | None:
    """The logged value (NaN and inf as logged: the nonfinite probe judges them)."""
    try:
        return float(raw)
    except ValueError:
        return None


def _fill(run: Run, columns: Columns, problems: list[Problem], files: list[Path]) -> None:
    add_problems(run, problems, files[0])
    run.train_loss, run.eval_loss = pick(columns, TRAIN_LOSS), pick(columns, EVAL_LOSS)
    run.grad_norm, run.learning_rate = pick(columns, GRAD_NORM), pick(columns, LEARNING_RATE)
    if not run.has_log:
        run.notes.append(f"no loss metric among: {', '.join(sorted(columns)[:8]) or 'none'}")
