"""PyTorch Lightning's `CSVLogger` output: `lightning_logs/version_N/metrics.csv`.

One header row names every metric ever logged; each later row fills the cells logged at that
moment and leaves the rest empty. Step-level and epoch-level metrics come on separate rows
(`train_loss_step` / `train_loss_epoch`), learning-rate-monitor columns (`lr-AdamW`) interleave,
and the names are the user's own (`loss`, `train_loss`, `val_loss`, ...): the columns are matched
against the usual spellings, step-level ones first. A resumed run may start at any step.

A cell that is not a number, or a row whose `step` is not an integer, is a problem naming the file
and line; the rest is read.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from trainmedic.findings import Problem
from trainmedic.record.columns import Columns, add_problems, series_of
from trainmedic.run import Run, Series

METRICS_NAME = "metrics.csv"
MAX_BYTES = 512 * 1024 * 1024
TRAIN_LOSS = (
    "train_loss_step",
    "train/loss_step",
    "train_loss",
    "train/loss",
    "loss_step",
    "loss",
    "training_loss",
)
EVAL_LOSS = (
    "val_loss",
    "val/loss",
    "val_loss_epoch",
    "valid_loss",
    "validation_loss",
    "eval_loss",
    "eval/loss",
)
GRAD_NORM = ("grad_norm", "grad_2.0_norm_total", "train/grad_norm")
LEARNING_RATE = ("lr", "learning_rate")


def looks_like(header: list[str]) -> bool:
    """A header a Lightning-style metrics CSV has: a `step` column and a loss column."""
    names = set(header)
    return "step" in names and any(c in names for c in TRAIN_LOSS + EVAL_LOSS)


def version_dirs(root: Path) -> list[Path]:
    """`lightning_logs/version_N` folders holding a metrics.csv, newest (largest N) last."""
    found = []
    try:
        for p in (root / "lightning_logs").iterdir():
            tail = p.name.removeprefix("version_")
            if p.name.startswith("version_") and tail.isdigit() and (p / METRICS_NAME).is_file():
                found.append((int(tail), p))
    except OSError:
        return []
    return [p for _, p in sorted(found)]


def read_metrics_csv(path: Path, run: Run) -> None:
    """Curves from a metrics.csv into `run`; problems go to `run`."""
    try:
        if path.stat().st_size > MAX_BYTES:
            run.problems.append(Problem(str(path), f"is over {MAX_BYTES >> 20} MB; not read", None, "log"))
            return
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        run.problems.append(Problem(str(path), f"cannot read: {exc.strerror or exc}", None, "log"))
        return
    run.sources.append(path)
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None or "step" not in header:
        run.problems.append(Problem(str(path), "no header with a 'step' column: not a metrics.csv", 1, "log"))
        return
    wanted = {
        "train_loss": _first(header, TRAIN_LOSS),
        "eval_loss": _first(header, EVAL_LOSS),
        "grad_norm": _first(header, GRAD_NORM),
        "learning_rate": _first(header, LEARNING_RATE)
        or next((c for c in header if c.startswith("lr-")), None),
    }
    index = {name: header.index(col) for name, col in wanted.items() if col is not None}
    step_at = header.index("step")
    columns: Columns = {name: {} for name in index}
    problems: list[Problem] = []
    for number, row in enumerate(rows, 2):
        if not row:
            continue
        cell = row[step_at].strip() if step_at < len(row) else ""
        try:
            step = int(float(cell))
        except (ValueError, OverflowError):
            if any(i < len(row) and row[i].strip() for i in index.values()):
                problems.append(Problem(str(path), f"step {cell!r} is not an integer", number, "log"))
            continue
        for name, i in index.items():
            text_value = row[i].strip() if i < len(row) else ""
            if not text_value:
                continue
            try:
                value = float(text_value)
            except ValueError:
                problems.append(
                    Problem(str(path), f"{header[i]} {text_value[:40]!r} is not a number", number, "log")
                )
                continue
            columns[name][step] = value  # a repeated step (a resumed run) keeps the later row
    add_problems(run, problems, path)
    series = {name: series_of(points) for name, points in columns.items()}
    run.train_loss = series.get("train_loss", Series.empty())
    run.eval_loss = series.get("eval_loss", Series.empty())
    run.grad_norm = series.get("grad_norm", Series.empty())
    run.learning_rate = series.get("learning_rate", Series.empty())
    used = ", ".join(f"{name} <- {header[i]}" for name, i in index.items())
    run.notes.append(f"columns read: {used or 'none recognised'}")


def _first(header: list[str], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in header), None)
