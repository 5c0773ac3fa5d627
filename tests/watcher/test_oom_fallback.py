"""OOM that splitting cannot get through: roll back and resume with smaller micro-batches."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_oom import FakeOom  # noqa: E402  (same folder: pytest puts it on sys.path)

from trainmedic.watcher import Vitals, WatchConfig, watch  # noqa: E402
from trainmedic.watcher.oom import OomGuard, OomNotRecoverable  # noqa: E402

CFG = WatchConfig(certify_after=5)
STEPS = 30


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    from trainmedic.toy.base import toy_base

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield toy_base()
    torch.set_num_threads(threads)


def quiet(_: str) -> None:
    return None


def trainer_for(base: Path, out: Path, **kw: Any) -> Any:
    from trainmedic.toy.training import toy_trainer

    args = {"steps": STEPS, "save_strategy": "steps", "save_steps": 10, "gradient_accumulation_steps": 2}
    return toy_trainer(out, base=base, **(args | kw))


def guarded(trainer: Any) -> Vitals:
    """Vitals whose OOM guard cannot copy gradients (as for full fine-tuning of a large model): an
    OOM late in the backward of a step's second micro-batch cannot be split exactly."""
    vitals = Vitals(CFG, echo=quiet)
    vitals.oom = OomGuard(vitals._act, snapshot_limit_bytes=0).attach(trainer)
    return vitals


def test_unsplittable_oom_resumes_from_a_certified_checkpoint_with_half_the_micro_batch(
    base: Path, tmp_path: Path
) -> None:
    trainer = trainer_for(base, tmp_path / "run")
    vitals = guarded(trainer)
    # from step 25's second micro-batch on, more than 4 rows run out of memory in the backward
    oom = FakeOom(trainer.model, fits=4, where="backward", start=50)
    result = watch(trainer, vitals=vitals, preflight=0, echo=quiet)

    assert result.status == "completed" and result.steps == STEPS, result.summary()
    (fallback,) = [a for a in result.actions if a.action == "oom_fallback"]
    assert fallback.step == 25
    assert fallback.detail["to_step"] == 10  # checkpoint-20's clean window had not run out yet
    assert fallback.detail["before"] == {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2}
    assert fallback.detail["after"] == {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4}
    assert trainer._train_batch_size == 4
    assert oom.raised == 1  # the smaller micro-batches fit: no second OOM
    assert result.final_loss is not None and math.isfinite(result.final_loss)

    # the same examples in the same order, in halves: the final loss matches a run that used the
    # small micro-batches from the start
    clean = trainer_for(
        base, tmp_path / "clean", per_device_train_batch_size=4, gradient_accumulation_steps=4
    )
    clean_result = watch(clean, CFG, preflight=0, echo=quiet)
    assert clean_result.final_loss == pytest.approx(result.final_loss, rel=0.02)


def test_unsplittable_oom_without_a_certified_checkpoint_is_raised_with_the_advice(
    base: Path, tmp_path: Path
) -> None:
    trainer = trainer_for(base, tmp_path, save_strategy="no")
    vitals = guarded(trainer)
    FakeOom(trainer.model, fits=4, where="backward", start=10)
    with pytest.raises(OomNotRecoverable) as caught:
        watch(trainer, vitals=vitals, preflight=0, echo=quiet)
    notes = " ".join(getattr(caught.value, "__notes__", []))
    assert "no certified checkpoint before step 5" in notes
    assert "'per_device_train_batch_size': 4" in notes
    assert (tmp_path / "trainmedic-postmortem.json").is_file()  # crashed, said why, re-raised


def test_a_micro_batch_the_preflight_finds_too_large_is_split_not_stopped(base: Path, tmp_path: Path) -> None:
    from trainmedic.toy.training import toy_trainer

    trainer = toy_trainer(tmp_path, base=base, steps=4)
    oom = FakeOom(trainer.model, fits=4, where="forward")
    result = watch(trainer, WatchConfig(), echo=quiet)  # preflight on (2 batches)
    assert result.status == "completed" and result.steps == 4, result.summary()
    assert [(e.rule, e.severity) for e in result.events if e.rule.startswith("preflight")] == [
        ("preflight_memory", "warn")
    ]
    assert [a.action for a in result.actions].count("oom_split") == 1
    assert oom.raised >= 2  # the preflight's batch, then the first step's (split from then on)


def test_a_resumed_run_takes_up_the_smaller_micro_batch_it_had_fallen_back_to(
    base: Path, tmp_path: Path
) -> None:
    first = trainer_for(base, tmp_path)
    FakeOom(first.model, fits=4, where="backward", start=50)
    vitals = guarded(first)
    assert watch(first, vitals=vitals, preflight=0, echo=quiet).status == "completed"

    # the process is gone; the same script starts again with its own (too large) micro-batch,
    # on a machine that still has too little memory for it
    again = trainer_for(base, tmp_path, steps=40)
    oom = FakeOom(again.model, fits=4, where="backward")
    said: list[str] = []
    result = watch(again, vitals=guarded(again), resume=True, preflight=0, echo=said.append)
    assert result.status == "completed" and result.steps == 40, result.summary()
    assert again.args.per_device_train_batch_size == 4 and again.args.gradient_accumulation_steps == 4
    assert oom.raised == 0  # no OOM paid again
    assert not [a for a in result.actions if a.action.startswith("oom")]
    assert any("fallen back to after running out of memory" in line for line in said)


@pytest.mark.parametrize(
    ("saved", "now", "expected"),
    [
        ((4, 4), (8, 2), {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4}),
        ((8, 2), (8, 2), None),  # nothing had changed
        ((4, 4), (4, 4), None),  # the script already asks for it
        ((4, 2), (8, 2), None),  # another effective batch: the user changed the recipe, keep theirs
        ((None, 4), (8, 2), None),  # saved before the field existed
    ],
)
def test_the_fallen_back_batch_is_taken_up_only_for_the_same_effective_batch(
    saved: tuple[Any, Any], now: tuple[int, int], expected: dict[str, int] | None
) -> None:
    import types

    from trainmedic.watcher.treatment_state import fallen_back_batch

    args = types.SimpleNamespace(per_device_train_batch_size=now[0], gradient_accumulation_steps=now[1])
    payload = {"micro_batch": saved[0], "accumulation": saved[1]}
    assert fallen_back_batch(payload, args) == expected
