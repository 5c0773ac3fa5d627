"""The demo's two fine-tunes: the same LoRA run of the toy base with the same faults, once under
`watch` and once as a plain `trainer.train()`.

Both train on one epoch of packed docstrings-as-code blocks with checkpoints every `SAVE_STEPS`
steps; the data holds enough blocks beyond the run's steps that a rollback skipping a window still
stays inside the one epoch (in a second epoch the poisoned batches would come back).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from trainmedic.demo.faults import FaultPlan, inject
from trainmedic.demo.progress import LiveProgress, Narrator, watcher_logs_to

if TYPE_CHECKING:
    from datasets import Dataset

SAVE_STEPS = 20
CERTIFY_AFTER = 10  # clean steps after a checkpoint before a rollback may go back to it
SEQ_LEN = 64
BATCH = 8
SPARE_STEPS = 40  # data beyond the run's steps, for the window a rollback skips


@dataclass(frozen=True)
class TrainedRun:
    """One fine-tune of the demo: where it is and how it ended, in one line."""

    name: str
    path: Path
    steps: int
    seconds: float
    ending: str


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """No download bars, deprecation notes or info logs from transformers under the live bar."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@dataclass(frozen=True)
class Setup:
    """What both runs share: the base, the data, the length and where the faults hit."""

    base: Path
    data: Dataset
    steps: int
    plan: FaultPlan


def setup(base: Path, steps: int) -> Setup:
    from trainmedic.toy.base import load_base
    from trainmedic.toy.data import lm_dataset

    _, tokenizer = load_base(base)
    data = lm_dataset(tokenizer, n=(steps + SPARE_STEPS) * BATCH, seq_len=SEQ_LEN, seed=0)
    return Setup(base, data, steps, FaultPlan.for_steps(steps, SAVE_STEPS, CERTIFY_AFTER))


def _trainer(out: Path, s: Setup) -> Any:
    from trainmedic.toy.training import toy_trainer

    return toy_trainer(
        out,
        base=s.base,
        steps=s.steps,
        batch_size=BATCH,
        train_dataset=s.data,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        save_total_limit=2,
    )


def watched_run(out: Path, s: Setup, console: Console) -> TrainedRun:
    """Train under `watch`: each fault, detection and treatment is narrated as it happens."""
    from trainmedic.watcher import Vitals, WatchConfig, watch

    trainer = _trainer(out, s)
    narrator = Narrator(console)
    inject(trainer, s.plan, narrator.fault)
    vitals = Vitals(WatchConfig(certify_after=CERTIFY_AFTER), echo=narrator.echo)
    narrator.follow(vitals, out)
    trainer.add_callback(narrator)

    def counts() -> tuple[int, int]:
        return sum(e.severity != "info" for e in vitals.events), len(vitals.actions)

    start = time.perf_counter()
    with watcher_logs_to(narrator), LiveProgress(console, "watched  ", s.steps, counts) as bar:
        trainer.add_callback(bar)
        result = watch(trainer, vitals=vitals, echo=narrator.echo)
    return TrainedRun("watched", out, result.steps, time.perf_counter() - start, result.summary())


def unwatched_run(out: Path, s: Setup, console: Console) -> TrainedRun:
    """The same training, same faults, plain `trainer.train()`: nobody says anything."""
    trainer = _trainer(out, s)
    inject(trainer, s.plan, Narrator(console).fault)
    start = time.perf_counter()
    with LiveProgress(console, "unwatched", s.steps, None) as bar:
        trainer.add_callback(bar)
        trainer.train()
    seconds = time.perf_counter() - start
    return TrainedRun("unwatched", out, int(trainer.state.global_step), seconds, _plain_ending(trainer))


def _plain_ending(trainer: Any) -> str:
    """How the plain Trainer itself reports the end: its last logged loss and gradient norm."""
    last: dict[str, Any] = next((h for h in reversed(trainer.state.log_history) if "loss" in h), {})

    def show(key: str) -> str:
        value = last.get(key)
        if isinstance(value, int | float):
            return f"{value:.4g}" if math.isfinite(value) else str(value)
        return "not logged"

    return (
        f"completed {trainer.state.global_step} steps without a warning; last logged loss "
        f"{show('loss')}, grad norm {show('grad_norm')}"
    )
