"""LLaMA-Factory's `trainer_log.jsonl`: one JSON object per logging step, in the output dir.

Each line carries `current_steps`/`total_steps` and the logged values: `loss`, the learning rate
as `lr` (newer) or `learning_rate` (older), `grad_norm` where logged, `accuracy` for DPO and
reward-model runs. What real files hold besides (`../shared/real_logs/INDEX.md`):

- older versions write `"eval_loss": null, "predict_loss": null, ...` on every line, and an
  all-null last line; eval values come on lines of their own (`eval_loss` without `loss`);
- `throughput` may be the string `"0.00"`, `elapsed_time` may read `"9 days, 21:39:23"`: neither
  is read;
- a log may stop long before `total_steps` (a killed run): `max_steps` is `total_steps`, and the
  run is complete only when the last step reaches it;
- a prediction-only run writes progress lines and no loss at all.

A line that is not JSON, or whose step or value has the wrong type, is a problem naming the file
and line; the rest of the file is read. A torn last line is tolerated (the writer was killed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from trainmedic.findings import Problem
from trainmedic.record.columns import Columns, add_problems, pick, series_of
from trainmedic.run import Run

LOG_NAME = "trainer_log.jsonl"
MAX_BYTES = 512 * 1024 * 1024
LR_KEYS = ("lr", "learning_rate")
# DPO / reward-model runs log `accuracy` beside the loss: that makes the objective a preference one
EXTRA_KEYS = {"accuracy": "rewards/accuracies", "reward": "reward"}


def looks_like(first_line: bytes) -> bool:
    """A first line with LLaMA-Factory's progress fields (for a file not named trainer_log.jsonl)."""
    return b'"current_steps"' in first_line and b'"total_steps"' in first_line


def read_trainer_log(path: Path, run: Run) -> None:
    """Curves, planned length and completion from `path` into `run`; problems go to `run`."""
    try:
        if path.stat().st_size > MAX_BYTES:
            run.problems.append(
                Problem(str(path), f"is over {MAX_BYTES >> 20} MB, too large for a log", None, "log")
            )
            return
        data = path.read_bytes()
    except OSError as exc:
        run.problems.append(Problem(str(path), f"cannot read: {exc.strerror or exc}", None, "log"))
        return
    run.sources.append(path)
    columns: Columns = {}
    problems: list[Problem] = []
    total_steps: int | None = None
    last_step: int | None = None
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = orjson.loads(raw)
        except orjson.JSONDecodeError:
            if number == len(lines) or (number == len(lines) - 1 and not lines[-1].strip()):
                run.notes.append(f"{path.name}: line {number} is torn (the writer was stopped); not read")
                continue
            problems.append(Problem(str(path), "not valid JSON", number, "log"))
            continue
        if not isinstance(rec, dict):
            problems.append(Problem(str(path), "not a JSON object", number, "log"))
            continue
        step = _as_int(rec.get("current_steps"))
        if step is None:
            if any(rec.get(k) is not None for k in ("loss", "eval_loss")):
                problems.append(
                    Problem(str(path), "a logged value without an integer 'current_steps'", number, "log")
                )
            continue
        total = _as_int(rec.get("total_steps"))
        if total is not None and total > 0:
            total_steps = total
        last_step = step if last_step is None else max(last_step, step)
        for key, name in (("loss", "loss"), ("eval_loss", "eval_loss"), ("grad_norm", "grad_norm")):
            _take(rec, key, name, step, columns, problems, path, number)
        lr_key = next((k for k in LR_KEYS if rec.get(k) is not None), None)
        if lr_key is not None:
            _take(rec, lr_key, "lr", step, columns, problems, path, number)
        for key, name in EXTRA_KEYS.items():
            _take(rec, key, name, step, columns, problems, path, number)
    add_problems(run, problems, path)
    run.train_loss = pick(columns, ("loss",))
    run.eval_loss = pick(columns, ("eval_loss",))
    run.grad_norm = pick(columns, ("grad_norm",))
    run.learning_rate = pick(columns, ("lr",))
    run.extra = {name: series_of(columns[name]) for name in EXTRA_KEYS.values() if name in columns}
    if total_steps is not None:
        run.max_steps = total_steps
        run.completed = last_step is not None and last_step >= total_steps
    if not len(run.train_loss) and not len(run.eval_loss):
        run.notes.append(f"{path.name} logs progress but no loss (a prediction-only run?)")


def _take(
    rec: dict[str, Any],
    key: str,
    name: str,
    step: int,
    columns: Columns,
    problems: list[Problem],
    path: Path,
    number: int,
) -> None:
    value = rec.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(Problem(str(path), f"'{key}' is {type(value).__name__}, not a number", number, "log"))
        return
    try:
        number_value = float(value)
    except OverflowError:  # an integer beyond any float: one bad value, not a lost file
        problems.append(Problem(str(path), f"'{key}' is out of range", number, "log"))
        return
    columns.setdefault(name, {})[step] = number_value  # a step written again (a resume): the later wins


def _as_int(value: Any) -> int | None:
    """An integer step within any sane range; None for anything else (bools included)."""
    if isinstance(value, int) and not isinstance(value, bool) and -(2**62) < value < 2**62:
        return value
    return None
