"""The supervisor's end of a run: budgets, crashes, postmortems and the Trainer's own logs."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from transformers import TrainerCallback  # noqa: E402

from trainmedic.watcher import watch  # noqa: E402
from trainmedic.watcher.alerts import trackio_alert  # noqa: E402
from trainmedic.watcher.events import Event  # noqa: E402


@pytest.fixture(scope="module")
def base() -> Path:
    from trainmedic.toy.base import toy_base

    return toy_base()


def quiet(_: str) -> None:
    return None


def test_poison_on_every_step_exhausts_the_skip_budget_and_stops_with_a_diagnosis(
    base: Path, tmp_path: Path
) -> None:
    from trainmedic.toy.training import toy_trainer

    trainer = toy_trainer(tmp_path, base=base, steps=40)
    original = trainer.compute_loss

    def compute_loss(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if trainer.state.global_step >= 10:
            return out * float("nan") if not isinstance(out, tuple) else (out[0] * float("nan"), *out[1:])
        return out

    trainer.compute_loss = compute_loss
    result = watch(trainer, echo=quiet)
    assert result.status == "stopped"
    assert "consecutive skipped updates" in result.reason
    assert result.steps < 20
    assert any(e.rule == "budget" and e.severity == "fail" for e in result.events)
    pm = json.loads((tmp_path / "trainmedic-postmortem.json").read_text())
    assert pm["status"] == "stopped"


def test_a_crash_is_re_raised_with_a_postmortem_and_a_closed_log(base: Path, tmp_path: Path) -> None:
    from trainmedic.record.load import load_run
    from trainmedic.toy.training import toy_trainer

    trainer = toy_trainer(tmp_path, base=base, steps=30)

    class Boom(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 7:
                raise RuntimeError("disk on fire")

    trainer.add_callback(Boom())
    with pytest.raises(RuntimeError, match="disk on fire"):
        watch(trainer, echo=quiet)
    pm = json.loads((tmp_path / "trainmedic-postmortem.json").read_text())
    assert pm["status"] == "crashed"
    assert "disk on fire" in json.dumps(pm)
    run = load_run(tmp_path)
    assert run.completed is False
    assert len(run.train_loss) == 7


def test_trainmedic_metrics_reach_the_trainers_own_logs(base: Path, tmp_path: Path) -> None:
    from trainmedic.toy.training import toy_trainer

    trainer = toy_trainer(tmp_path, base=base, steps=6, logging_steps=2)
    watch(trainer, echo=quiet)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("trainmedic/skips" in h and "trainmedic/clips" in h for h in logged)


def test_trackio_gets_an_alert_for_warnings_when_it_is_the_reporter(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    fake = types.SimpleNamespace(
        AlertLevel=types.SimpleNamespace(WARN="warn", ERROR="error"),
        alert=lambda **kw: calls.append(kw),
    )
    monkeypatch.setitem(sys.modules, "trackio", fake)
    trainer = types.SimpleNamespace(args=types.SimpleNamespace(report_to=["trackio"]))
    trackio_alert(trainer, Event(3, "loss_spike", "warn", "spike"))
    trackio_alert(trainer, Event(4, "divergence", "fail", "diverged"))
    trackio_alert(trainer, Event(5, "note", "info", "fyi"))
    assert [c["level"] for c in calls] == ["warn", "error"]
    trainer.args.report_to = ["tensorboard"]
    trackio_alert(trainer, Event(6, "loss_spike", "warn", "spike"))
    assert len(calls) == 2


def test_a_resumed_run_restores_zclip_and_keeps_its_run_id(base: Path, tmp_path: Path) -> None:
    from trainmedic.record.load import load_run
    from trainmedic.toy.training import toy_trainer
    from trainmedic.watcher import Vitals

    seen: dict[str, Any] = {}

    class Snapshot(TrainerCallback):
        def __init__(self, vitals: Vitals) -> None:
            self.vitals = vitals

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 30:
                seen["zclip"] = self.vitals.zclip.state_dict()

    first = Vitals(echo=quiet)
    trainer = toy_trainer(tmp_path, base=base, steps=40, save_strategy="steps", save_steps=30)
    trainer.add_callback(Snapshot(first))
    watch(trainer, vitals=first)
    assert seen["zclip"]["mean"] is not None  # past the 25-step warm-up

    second = Vitals(echo=quiet)
    restored: dict[str, Any] = {}

    class AtStart(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            restored["zclip"] = second.zclip.state_dict()

    again = toy_trainer(tmp_path, base=base, steps=40, save_strategy="steps", save_steps=30)
    again.add_callback(AtStart())
    watch(again, vitals=second, resume_from_checkpoint=str(tmp_path / "checkpoint-30"))
    assert restored["zclip"] == seen["zclip"]
    assert second.run_id == first.run_id
    run = load_run(tmp_path)
    assert len(run.train_loss) == 40  # steps 31-40 replayed: latest record wins, one run


def test_attaching_twice_does_not_count_the_loss_twice(base: Path, tmp_path: Path) -> None:
    from trainmedic.toy.training import toy_trainer
    from trainmedic.watcher import Vitals

    once = watch(toy_trainer(tmp_path / "a", base=base, steps=5), echo=quiet)
    vitals = Vitals(echo=quiet)
    trainer = toy_trainer(tmp_path / "b", base=base, steps=5)
    vitals.attach(trainer)
    twice = watch(trainer, vitals=vitals)
    assert once.final_loss is not None and twice.final_loss is not None
    assert abs(twice.final_loss - once.final_loss) < 1e-6


def test_watch_certifies_checkpoints_after_a_clean_window_and_logs_it(base: Path, tmp_path: Path) -> None:
    from trainmedic.record.load import load_run
    from trainmedic.toy.training import toy_trainer
    from trainmedic.watcher.checkpoints import newest_certified

    trainer = toy_trainer(tmp_path, base=base, steps=30, save_strategy="steps", save_steps=10)
    watch(trainer, echo=quiet)
    assert (tmp_path / "checkpoint-10" / "trainmedic-certified.json").is_file()
    assert newest_certified(tmp_path) == tmp_path / "checkpoint-20"  # 30 has no clean window after it
    (log,) = (tmp_path / "logs").glob("train-*.jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    certified = [r for r in records if r["type"] == "checkpoint" and r.get("certified")]
    assert [r["step"] for r in certified] == [10, 20]
    assert load_run(tmp_path).completed


def test_watch_leaves_the_users_training_arguments_as_they_were(base: Path, tmp_path: Path) -> None:
    from trainmedic.toy.training import toy_trainer

    trainer = toy_trainer(tmp_path, base=base, steps=3, max_grad_norm=0.7)
    watch(trainer, echo=quiet)
    assert trainer.args.max_grad_norm == 0.7  # watch clips itself while it runs, then gives it back


def test_a_second_watch_carries_on_with_the_first_watcher_and_never_stacks(
    base: Path, tmp_path: Path
) -> None:
    from trainmedic.toy.training import toy_trainer
    from trainmedic.watcher import Vitals

    trainer = toy_trainer(tmp_path, base=base, steps=4)
    first = watch(trainer, echo=quiet)
    second = watch(trainer, echo=quiet)
    assert [type(cb) for cb in trainer.callback_handler.callbacks].count(Vitals) == 1
    assert first.status == second.status == "completed"
    records = [json.loads(line) for log in (tmp_path / "logs").glob("train-*.jsonl") for line in log.open()]
    banners = [r for r in records if r["type"] == "banner"]
    assert len(banners) == 2 and len({b["run_id"] for b in banners}) == 1  # one banner per call: one watcher
    assert [r["step"] for r in records if r["type"] == "step"] == [1, 2, 3, 4, 1, 2, 3, 4]
    # the loss is captured once per micro-batch: the watcher's last loss is the Trainer's logged one
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert second.final_loss == pytest.approx(logged[-1], rel=1e-5)
    with pytest.raises(ValueError, match="another WatchConfig"):
        watch(trainer, "aggressive", echo=quiet)
    with pytest.raises(ValueError, match="another trainmedic Vitals"):
        watch(trainer, vitals=Vitals(echo=quiet))
