"""Rollback: to a certified checkpoint from before the trouble, with a really lower learning rate."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from transformers import TrainerCallback  # noqa: E402

from trainmedic.watcher import WatchConfig, watch  # noqa: E402

# Certify 5 clean steps after each save every 10 steps: short enough for a CPU test. The LR faults
# here must reach the loss, so the in-step cap of learning-rate jumps is off.
CFG = WatchConfig(certify_after=5, cap_lr_jumps=False)


@pytest.fixture(scope="module")
def base() -> Path:
    from trainmedic.toy.base import toy_base

    return toy_base()


def quiet(_: str) -> None:
    return None


class LrBlowUp(TrainerCallback):
    """Multiplies the learning rate by 100 at step `at` (once, or on every pass if `persist`)."""

    def __init__(self, trainer: Any, at: int, *, persist: bool = False) -> None:
        self.trainer, self.at, self.persist, self.fired = trainer, at, persist, False

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step + 1 == self.at and (self.persist or not self.fired):
            self.fired = True
            sched = self.trainer.lr_scheduler
            sched.base_lrs = [lr * 100 for lr in sched.base_lrs]
            for group in self.trainer.optimizer.param_groups:
                group["lr"] *= 100


def step_records(out: Path) -> list[dict[str, Any]]:
    """Step records of every log file of the run, oldest file first (a resume opens a new one)."""
    lines = [
        line for log in sorted((out / "logs").glob("train-*.jsonl")) for line in log.read_text().splitlines()
    ]
    return [r for r in map(json.loads, lines) if r["type"] == "step"]


def trainer_for(base: Path, out: Path, steps: int = 80) -> Any:
    from trainmedic.toy.base import load_base
    from trainmedic.toy.data import lm_dataset
    from trainmedic.toy.training import toy_trainer

    # more data than the steps need: the skipped window's batches are dropped, not replayed
    _, tokenizer = load_base(base)
    data = lm_dataset(tokenizer, n=1024, seq_len=64, seed=0)
    return toy_trainer(out, base=base, steps=steps, save_strategy="steps", save_steps=10, train_dataset=data)


def test_divergence_rolls_back_with_half_the_learning_rate_really_used(base: Path, tmp_path: Path) -> None:
    trainer = trainer_for(base, tmp_path)
    trainer.add_callback(LrBlowUp(trainer, at=45))
    result = watch(trainer, CFG, echo=quiet)
    rollbacks = [a for a in result.actions if a.action == "rollback"]
    assert len(rollbacks) == 1, result.summary()
    to_step = rollbacks[0].detail["to_step"]
    assert to_step < 45
    assert result.status == "completed" and result.steps == 80
    # the same step logged twice: before the rollback and after it; the second LR is half the first
    seen: dict[int, list[float]] = {}
    for rec in step_records(tmp_path):
        seen.setdefault(rec["step"], []).append(rec["lr"])
    probe = to_step + 2
    before, after = seen[probe][0], seen[probe][-1]
    assert after == pytest.approx(before * 0.5, rel=1e-6)
    assert result.final_loss is not None and math.isfinite(result.final_loss)


def test_nan_weights_are_rolled_back_to_a_finite_certified_checkpoint(base: Path, tmp_path: Path) -> None:
    trainer = trainer_for(base, tmp_path, steps=60)

    class Poison(TrainerCallback):
        done = False

        def on_step_begin(
            self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
        ) -> None:
            if state.global_step + 1 == 35 and not self.done:
                self.done = True
                p = next(p for p in model.parameters() if p.requires_grad)
                with torch.no_grad():
                    p.fill_(float("nan"))

    trainer.add_callback(Poison())
    result = watch(trainer, CFG, echo=quiet)
    assert [a.action for a in result.actions].count("rollback") == 1, result.summary()
    assert result.status == "completed"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_without_a_certified_checkpoint_it_stops_and_says_why(base: Path, tmp_path: Path) -> None:
    from trainmedic.toy.training import toy_trainer

    trainer = toy_trainer(tmp_path, base=base, steps=80)  # no checkpoints at all
    trainer.add_callback(LrBlowUp(trainer, at=45))
    result = watch(trainer, CFG, echo=quiet)
    assert result.status == "stopped"
    assert "no certified checkpoint" in result.reason
    assert not [a for a in result.actions if a.action == "rollback"]


def test_rollbacks_have_a_budget(base: Path, tmp_path: Path) -> None:
    trainer = trainer_for(base, tmp_path)
    trainer.add_callback(LrBlowUp(trainer, at=45, persist=True))  # the fault comes back every time
    result = watch(trainer, WatchConfig(certify_after=5, max_rollbacks=1, cap_lr_jumps=False), echo=quiet)
    assert [a.action for a in result.actions].count("rollback") == 1
    assert result.status == "stopped"


def test_a_learning_rate_jump_is_capped_before_it_hurts(base: Path, tmp_path: Path) -> None:
    trainer = trainer_for(base, tmp_path)
    trainer.add_callback(LrBlowUp(trainer, at=45))
    result = watch(trainer, WatchConfig(certify_after=5), echo=quiet)
    assert result.status == "completed" and result.steps == 80
    caps = [a for a in result.actions if a.action == "lr_cap"]
    assert [a.step for a in caps] == [45]
    assert not [a for a in result.actions if a.action in ("rollback", "skip", "stop")]
    assert any(e.rule == "lr_jump" and e.step == 45 for e in result.events)
    lrs = {rec["step"]: rec["lr"] for rec in step_records(tmp_path)}
    assert lrs[45] == pytest.approx(lrs[44]) and lrs[70] == pytest.approx(lrs[44])  # the update never used it


def test_a_resume_after_a_rollback_drops_the_same_data_again(base: Path, tmp_path: Path) -> None:
    """The Trainer fast-forwards its data by step count alone; batches a rollback dropped must be
    dropped again on a later resume, or every later step would see different data."""
    trainer = trainer_for(base, tmp_path)
    trainer.add_callback(LrBlowUp(trainer, at=45))
    result = watch(trainer, CFG, echo=quiet)
    assert [a.action for a in result.actions].count("rollback") == 1
    first = {rec["step"]: rec["loss"] for rec in step_records(tmp_path)}  # latest record wins
    state = json.loads((tmp_path / "checkpoint-60" / "trainmedic_state.json").read_text())
    assert state["dropped"] > 0

    again = trainer_for(base, tmp_path)
    watch(again, CFG, echo=quiet, resume_from_checkpoint=str(tmp_path / "checkpoint-60"))
    second = {rec["step"]: rec["loss"] for rec in step_records(tmp_path)}
    # same weights, same batch: step 61 reproduces the loss the first run logged there
    assert second[61] == pytest.approx(first[61], rel=1e-4)


def test_checkpoint_every_gives_a_rollback_a_nearer_certified_checkpoint(base: Path, tmp_path: Path) -> None:
    from trainmedic.toy.training import toy_trainer

    class Poison(TrainerCallback):
        done = False

        def on_step_begin(
            self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
        ) -> None:
            if state.global_step + 1 == 37 and not self.done:
                self.done = True
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    # the Trainer itself saves nothing; the watcher saves every 10 steps
    trainer = toy_trainer(tmp_path, base=base, steps=50)
    trainer.add_callback(Poison())
    result = watch(trainer, WatchConfig(certify_after=5, checkpoint_every=10), echo=quiet)
    rollbacks = [a for a in result.actions if a.action == "rollback"]
    assert len(rollbacks) == 1, result.summary()
    assert rollbacks[0].detail["to_step"] == 30  # saved at 30, certified after steps 31-35
    assert result.status == "completed"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*"))[:3] == [
        "checkpoint-10",
        "checkpoint-20",
        "checkpoint-30",
    ]
