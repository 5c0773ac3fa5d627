"""What the terminal shows while the demo trains: a live progress bar, and one plain line for each
fault, detection and treatment at the moment it happens.

`Narrator` is given to `Vitals` as its `echo`. Vitals appends an event or action to its lists and
then echoes it, so at each echo the narrator prints the new records from those lists, with their
step, severity and kind, rather than parsing the echoed text. Lines printed on the console while
the bar is live appear above it (rich redirects them).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from transformers import TrainerCallback

from trainmedic.watcher.checkpoints import MARKER as CERTIFIED

TREATED = {
    "skip": "update skipped",
    "lr_cap": "learning rate brought back",
    "rollback": "rolled back",
    "stop": "run stopped",
    "oom_split": "micro-batch split",
    "oom_fallback": "smaller micro-batches",
    "retry": "retried",
}
SEVERITY_STYLE = {"info": "dim", "warn": "yellow", "fail": "bold red"}


def _line(step: int | None, tag: str, style: str, message: str) -> Table:
    """One narrated line; a long message wraps under itself, not under the step."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=11, no_wrap=True)
    grid.add_column(width=9, no_wrap=True)
    grid.add_column(overflow="fold")
    where = f"  step {step:>4}" if step is not None else ""
    grid.add_row(Text(where, style="dim"), Text(tag, style=style), Text(message))
    return grid


class Narrator(TrainerCallback):
    """Prints faults, the watcher's detections and treatments, and checkpoint certifications."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.vitals: Any = None
        self.output_dir: Path | None = None
        self._events = 0
        self._actions = 0
        self._certified: set[str] = set()

    def follow(self, vitals: Any, output_dir: Path) -> Narrator:
        """Narrate `vitals`' records, and the certifications of checkpoints under `output_dir`."""
        self.vitals, self.output_dir = vitals, output_dir
        self._events, self._actions = len(vitals.events), len(vitals.actions)
        return self

    def fault(self, step: int, what: str) -> None:
        self._certifications(self.output_dir)  # a certification from the step before comes first
        self.console.print(_line(step, "fault", "magenta", what))

    def note(self, message: str, step: int | None = None) -> None:
        self.console.print(_line(step, "watcher", "dim", message))

    def echo(self, line: str) -> None:
        """Vitals' echo: show what was just recorded; a line with no new record is a note. Where
        the run log is and how the run ended the demo tells in its own words."""
        if _bookkeeping(line):
            return
        if self.vitals is None:
            self.note(line.removeprefix("[trainmedic] "))
            return
        self._certifications(self.output_dir)
        events, actions = self.vitals.events[self._events :], self.vitals.actions[self._actions :]
        self._events, self._actions = len(self.vitals.events), len(self.vitals.actions)
        for e in events:
            label = "detected" if e.severity != "info" else "noticed"
            self.console.print(_line(e.step, label, SEVERITY_STYLE.get(e.severity, ""), e.message))
        for a in actions:
            if a.action == "clip":  # ZClip's routine rescales show in the bar's count, not one by one
                continue
            verb = TREATED.get(a.action, a.action)
            self.console.print(_line(a.step, "treated", "green", f"{verb}: {a.reason}"))
        if not events and not actions:
            self.note(line.removeprefix("[trainmedic] "))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._certifications(Path(args.output_dir))
        return control

    def _certifications(self, output_dir: Path | None) -> None:
        """A checkpoint certified since last looked (its marker appears once the clean window after
        it has run) is news: it is where a rollback can go."""
        if output_dir is None:
            return
        for marker in sorted(output_dir.glob(f"checkpoint-*/{CERTIFIED}")):
            name = marker.parent.name
            if name in self._certified:
                continue
            try:
                info = json.loads(marker.read_text(encoding="utf-8"))
                first, last = info["clean_window"]
                at = int(info["certified_at_step"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being written or rotated away right now: seen next time, or gone
            self._certified.add(name)
            self.note(f"{name} certified: steps {first}-{last} after it ran clean", at)


class _LogToNarrator(logging.Handler):
    def __init__(self, narrator: Narrator) -> None:
        super().__init__(logging.INFO)
        self.narrator = narrator

    def emit(self, record: logging.LogRecord) -> None:
        self.narrator.note(record.getMessage().removeprefix("[trainmedic] "))


@contextmanager
def watcher_logs_to(narrator: Narrator) -> Iterator[None]:
    """Route the `trainmedic` logger (checkpoint revocations, OOM splits) through the narrator, so
    nothing writes to stderr under the live bar."""
    logger = logging.getLogger("trainmedic")
    handler, propagate = _LogToNarrator(narrator), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


class LiveProgress(TrainerCallback):
    """A rich progress bar over optimizer steps: the step (it moves back on a rollback), the latest
    logged loss, and the watcher's events and treatments so far (`counts`), when there is one."""

    def __init__(
        self, console: Console, title: str, total: int, counts: Callable[[], tuple[int, int]] | None
    ) -> None:
        self.counts = counts
        self.progress = Progress(
            TextColumn("  {task.description}"),
            BarColumn(bar_width=28),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:>7}"),
            TextColumn("{task.fields[watch]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(title, total=total, loss="-", watch=self._watch_text())

    def _watch_text(self) -> str:
        if self.counts is None:
            return "not watched"
        events, treatments = self.counts()
        return f"{events} event(s), {treatments} treatment(s)"

    def __enter__(self) -> LiveProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.refresh()
        self.progress.stop()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> Any:
        loss = (logs or {}).get("loss")
        if isinstance(loss, int | float):
            text = f"{loss:.4f}" if math.isfinite(loss) else str(loss)
            self.progress.update(self.task, loss=text)
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.progress.update(self.task, completed=state.global_step, watch=self._watch_text())
        return control


def _bookkeeping(line: str) -> bool:
    """The watcher's start and end lines (its paths and summary), which the demo shows itself."""
    text = line.removeprefix("[trainmedic] ")
    return text.startswith("watching ") or (
        text.startswith(("completed after ", "stopped after ")) and "run log " in text
    )
