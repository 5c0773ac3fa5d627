"""What every run of the fault benchmark shares, in this process or in a worker process.

`faults.py` trains scenarios 1-7 in its own process; `fault_worker.py` trains scenarios 8 (a
process killed mid-save, then a fresh one resuming) and 9 (two ranks under torchrun). Both build
the same training here, so their eval losses compare with the same clean run: the toy base,
seed 0, the same packed data stream with the same held-out eval blocks, micro-batch 8,
checkpoints every 20 steps, the same watcher config; and they read a run's end the same way.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from trainmedic.watcher import WatchConfig

STEPS = 200
FAULT_STEP = 100  # where a fault keyed on a step strikes in a full-length run
SAVE_STEPS = 20
BATCH = 8
SEQ_LEN = 64
EVAL_BLOCKS = 96  # held out from the same packed stream: blocks the training never sees
TRAIN_BLOCKS = 1872  # 234 steps of data for a 200-step run: a rollback drops its skipped window
CONFIG = WatchConfig(certify_after=10, checkpoint_every=5)
INTERVENTIONS = ("skip", "clip", "lr_cap", "rollback", "oom_split", "oom_fallback", "retry", "stop")


class Clock(TrainerCallback):
    """The optimizer step now running (1-based), for faults keyed on a step."""

    def __init__(self) -> None:
        self.step = 0
        self.started_at: int | None = None  # global_step of the first train() start (a resume's step)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.started_at is None:
            self.started_at = int(state.global_step)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step = state.global_step + 1


@dataclass
class Outcome:
    """One run of one scenario (for scenario 8: the killed process and the one that resumed)."""

    mode: str  # plain | watch
    ended: str  # completed | stopped | crashed
    steps: int
    eval_loss: float | None
    seconds: float
    fault_step: int | None = None
    reason: str = ""
    recomputed: int = 0
    interventions: Counter[str] = field(default_factory=Counter)
    latency: int | None = None
    rollbacks: list[str] = field(default_factory=list)  # "from->to (lr xS)" per rollback
    started_at: int | None = None  # the step training (re)started from
    finished: str = ""  # the table's "finished" cell, when the default wording does not say enough
    latency_note: str = ""  # the latency cell, when a latency in steps does not apply

    notes: list[str] = field(default_factory=list)  # evidence printed under the table

    def ending(self) -> str:
        """How the run ended, in the table's words."""
        if self.finished:
            return self.finished
        if self.ended == "completed":
            return f"completed ({self.steps})"
        if self.ended == "crashed":
            return f"crashed in step {self.steps + 1} ({self.reason.split(':')[0]})"
        return f"{self.ended} at step {self.steps}"

    def to_json(self) -> dict[str, Any]:
        """JSON-safe (NaN as null plus `eval_nan`): how a worker process hands it back."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["interventions"] = dict(self.interventions)
        nan = self.eval_loss is not None and not math.isfinite(self.eval_loss)
        out["eval_loss"], out["eval_nan"] = (None, True) if nan else (self.eval_loss, False)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["interventions"] = Counter(fields.get("interventions") or {})
        if data.get("eval_nan"):
            fields["eval_loss"] = math.nan
        return cls(**fields)


def load_data(tokenizer: Any) -> tuple[Any, Any]:
    """The training blocks and the held-out eval blocks, from one packed stream (seed 0)."""
    from trainmedic.toy.data import lm_dataset

    stream = lm_dataset(tokenizer, n=TRAIN_BLOCKS + EVAL_BLOCKS, seq_len=SEQ_LEN, seed=0)
    train = stream.select(range(TRAIN_BLOCKS))
    held_out = stream.select(range(TRAIN_BLOCKS, TRAIN_BLOCKS + EVAL_BLOCKS))
    seen = {tuple(row) for row in train["input_ids"]}
    overlap = sum(tuple(row) in seen for row in held_out["input_ids"])
    if overlap:
        raise RuntimeError(f"{overlap} eval blocks also occur in the training data; the eval is not held out")
    return train, held_out


def save_data(train: Any, held_out: Any, path: Path) -> Path:
    """Write the data for worker processes, which then load it in milliseconds, not rebuild it."""
    from datasets import DatasetDict

    DatasetDict(train=train, eval=held_out).save_to_disk(str(path))
    return path


def load_saved_data(path: Path) -> tuple[Any, Any]:
    """What `save_data` wrote: the training blocks and the held-out eval blocks."""
    from datasets import load_from_disk

    saved = load_from_disk(str(path))
    return saved["train"], saved["eval"]


def make_trainer(out: Path, base: Path, steps: int, train: Any, held_out: Any, **overrides: Any) -> Any:
    """The benchmark's LoRA fine-tune of the toy base; `overrides` go to the training arguments."""
    from trainmedic.toy.training import toy_trainer

    kwargs: dict[str, Any] = {
        "save_strategy": "steps",
        "save_steps": SAVE_STEPS,
        "per_device_eval_batch_size": BATCH,
        "batch_size": BATCH,
        **overrides,
    }
    return toy_trainer(out, base=base, steps=steps, train_dataset=train, eval_dataset=held_out, **kwargs)


def nan_loss_at(trainer: Any, clock: Clock, step: int) -> None:
    """The loss of optimizer step `step` becomes NaN, once (a rollback replaying it meets none)."""
    original, fired = trainer.compute_loss, [False]

    def compute_loss(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if clock.step != step or fired[0]:
            return out
        fired[0] = True
        loss = out[0] if isinstance(out, tuple) else out
        return (loss * math.nan, *out[1:]) if isinstance(out, tuple) else loss * math.nan

    trainer.compute_loss = compute_loss


def train_one_way(trainer: Any, mode: str, *, resume: bool = False) -> tuple[Outcome, Any]:
    """Train with `trainer.train()` (plain) or under `watch`; an exception is the run's result
    (crashed), not the benchmark's end. `resume`: a plain run resumes the way users do,
    `train(resume_from_checkpoint=True)`; a watched one resumes through `TRAINMEDIC_RESUME`."""
    from trainmedic.watcher import watch

    try:
        if mode == "plain":
            trainer.train(resume_from_checkpoint=True if resume else None)
            return Outcome(mode, "completed", trainer.state.global_step, None, 0.0), None
        result = watch(trainer, CONFIG, echo=lambda line: None)
    except Exception as exc:
        return Outcome(mode, "crashed", trainer.state.global_step, None, 0.0, reason=short(exc)), None
    outcome = Outcome(mode, result.status, result.steps, None, 0.0, reason=result.reason)
    outcome.interventions = Counter(a.action for a in result.actions if a.action in INTERVENTIONS)
    outcome.recomputed = recomputed_steps(result.actions)
    outcome.rollbacks = [
        f"{a.step}->{a.detail['to_step']} (lr x{a.detail.get('lr_scale', 1.0):g})"
        for a in result.actions
        if a.action == "rollback"
    ]
    return outcome, result


def recomputed_steps(actions: list[Any]) -> int:
    """Steps run twice: for each rollback, the step it left from minus the checkpoint it went to."""
    return sum(max(a.step - int(a.detail["to_step"]), 0) for a in actions if a.action == "rollback")


def detection_latency(events: list[Any], actions: list[Any], fault: int) -> int | None:
    """Steps from the fault to the watcher's first warning or treatment at or after it."""
    seen = [e.step for e in events if e.severity != "info" and e.step >= fault]
    seen += [a.step for a in actions if a.step >= fault]
    return min(seen) - fault if seen else None


def short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:160]}"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    import logging

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("trainmedic").setLevel(logging.ERROR)
    yield
