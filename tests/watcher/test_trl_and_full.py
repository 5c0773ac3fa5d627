"""`watch` on TRL's SFTTrainer and DPOTrainer, and on a full fine-tune without PEFT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("trl")

from trainmedic.watcher import Vitals, WatchConfig, watch

# Judge learning early enough for a short CPU run; the same config for both DPO runs.
SHORT = WatchConfig(plateau_min_steps=20, plateau_every=10)


@pytest.fixture(scope="module")
def base() -> Path:
    from trainmedic.toy.base import toy_base

    return toy_base()


def quiet(_: str) -> None:
    return None


def test_sft_trainer_is_watched_per_step(base: Path, tmp_path: Path) -> None:
    from trainmedic.record.load import load_run
    from trainmedic.toy.training import toy_sft_trainer

    trainer = toy_sft_trainer(tmp_path, base=base, steps=20)
    result = watch(trainer, echo=quiet)
    assert result.status == "completed"
    assert [e for e in result.events if e.severity != "info"] == []
    run = load_run(tmp_path)
    assert len(run.train_loss) == 20  # every optimizer step, not just logging steps
    assert len(run.grad_norm) == 20


def test_full_fine_tune_without_peft_is_watched(base: Path, tmp_path: Path) -> None:
    from trainmedic.toy.training import toy_trainer

    trainer = toy_trainer(tmp_path, base=base, lora=False, steps=20)
    result = watch(trainer, echo=quiet)
    assert result.status == "completed"
    assert result.final_loss is not None


def _dpo(base: Path, out: Path, **kw: Any) -> Any:
    from trainmedic.toy.training import toy_dpo_trainer

    trainer = toy_dpo_trainer(out, base=base, steps=40, **kw)
    return watch(trainer, SHORT, echo=quiet)


def test_dpo_starting_at_ln2_raises_no_alarm(base: Path, tmp_path: Path) -> None:
    result = _dpo(base, tmp_path)
    assert not [e for e in result.events if e.rule == "not_learning"], result.events
    from trainmedic.record.load import load_run

    run = load_run(tmp_path)
    assert abs(float(run.train_loss.values[0]) - 0.6931) < 0.02  # it did start at chance
    assert "rewards/margins" in run.extra


def test_dpo_stuck_at_ln2_after_warmup_raises_the_alarm(base: Path, tmp_path: Path) -> None:
    result = _dpo(base, tmp_path, lr=0.0)
    stuck = [e for e in result.events if e.rule == "not_learning"]
    assert stuck, result.events
    assert "ln 2" in stuck[0].message


def test_vitals_alone_as_a_callback_clips_and_detects(base: Path, tmp_path: Path) -> None:
    from trainmedic.toy.training import toy_trainer

    vitals = Vitals(echo=quiet, run_log=False)
    trainer = toy_trainer(tmp_path, base=base, steps=12, logging_steps=1)
    trainer.add_callback(vitals)
    trainer.train()
    assert trainer.args.max_grad_norm == 0.0  # trainmedic clips itself
    assert vitals.last is not None and vitals.last.grad_norm is not None
    assert vitals.last.loss is None  # alone, the raw per-step loss is not captured
