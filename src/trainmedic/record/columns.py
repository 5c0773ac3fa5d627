"""What every reader of another tool's log does with the values it found: a curve per metric
(steps ascending, a repeated step keeping the later value) and the problems, capped."""

from __future__ import annotations

from pathlib import Path

from trainmedic.findings import Problem
from trainmedic.run import Run, Series

MAX_PROBLEMS = 20

Columns = dict[str, dict[int, float]]  # metric name -> step -> value (later writes win)


def series_of(points: dict[int, float]) -> Series:
    steps = sorted(points)
    return Series.of(steps, [points[s] for s in steps])


def pick(columns: Columns, names: tuple[str, ...]) -> Series:
    """The curve of the first of `names` that was logged (the usual spellings, in preference)."""
    for name in names:
        if name in columns:
            return series_of(columns[name])
    return Series.empty()


def add_problems(run: Run, problems: list[Problem], path: Path) -> None:
    """The first MAX_PROBLEMS problems, then one line counting the rest."""
    run.problems.extend(problems[:MAX_PROBLEMS])
    if len(problems) > MAX_PROBLEMS:
        run.problems.append(
            Problem(str(path), f"and {len(problems) - MAX_PROBLEMS} more problem(s)", None, "log")
        )
