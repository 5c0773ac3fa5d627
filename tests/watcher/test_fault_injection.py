"""Faults injected into real toy training runs: each is detected, and treated where it can be.

The runs are LoRA fine-tunes of the pre-trained toy base on CPU; a fault hits one chosen
optimizer step (or every step from one on). Each test compares against what a clean run does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import TrainerCallback  # noqa: E402

from trainmedic.watcher import WatchConfig, watch  # noqa: E402
from trainmedic.watcher.supervisor import WatchResult  # noqa: E402

STEPS = 60


@pytest.fixture(scope="module")
def base() -> Path:
    from trainmedic.toy.base import toy_base

    return toy_base()


class StepClock(TrainerCallback):
    """Knows which optimizer step is running (1-based), for faults keyed on a step."""

    def __init__(self) -> None:
        self.step = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step = state.global_step + 1


def run(
    base: Path,
    out: Path,
    *,
    fault: Callable[[Any, StepClock], None] | None = None,
    config: WatchConfig | None = None,
    steps: int = STEPS,
    **kw: Any,
) -> tuple[WatchResult, Any]:
    from trainmedic.toy.training import toy_trainer

    trainer = toy_trainer(out, base=base, steps=steps, **kw)
    clock = StepClock()
    trainer.add_callback(clock)
    if fault is not None:
        fault(trainer, clock)
    result = watch(trainer, config, echo=lambda line: None)
    return result, trainer


def tail_loss(out: Path, n: int = 8) -> float:
    """Median raw loss of the last `n` steps, from the run log the watcher wrote."""
    from trainmedic.record.load import load_run

    loss = load_run(out).train_loss.values
    finite = loss[~(loss != loss)][-n:]
    return float(sorted(finite)[len(finite) // 2])


def wrap_step(trainer: Any, after: Callable[[Any, int], None], clock: StepClock) -> None:
    """Run `after(model, step)` once a micro-batch's backward is done (before the optimizer)."""
    original = trainer.training_step

    def training_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        loss = original(model, inputs, *args, **kwargs)
        after(model, clock.step)
        return loss

    trainer.training_step = training_step


def warnings_of(result: WatchResult) -> list[str]:
    return [f"{e.step}:{e.rule}" for e in result.events if e.severity != "info"]


@pytest.fixture(scope="module")
def clean(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[WatchResult, Path]:
    out = tmp_path_factory.mktemp("clean")
    result, _ = run(base, out)
    return result, out


def test_clean_run_raises_no_warning_and_skips_nothing(clean: tuple[WatchResult, Path]) -> None:
    result, out = clean
    assert result.status == "completed", result.summary()
    assert warnings_of(result) == []
    assert not [a for a in result.actions if a.action in ("skip", "stop")]
    assert tail_loss(out) < 0.8 * result_first_loss(out)


def result_first_loss(out: Path) -> float:
    from trainmedic.record.load import load_run

    return float(load_run(out).train_loss.values[:3].mean())


def test_nan_loss_is_skipped_and_the_run_ends_like_the_clean_one(
    base: Path, tmp_path: Path, clean: tuple[WatchResult, Path]
) -> None:
    k = 30

    def fault(trainer: Any, clock: StepClock) -> None:
        original = trainer.compute_loss

        def compute_loss(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if clock.step == k:
                loss = out[0] if isinstance(out, tuple) else out
                poisoned = loss * float("nan")
                return (poisoned, *out[1:]) if isinstance(out, tuple) else poisoned
            return out

        trainer.compute_loss = compute_loss

    result, _ = run(base, tmp_path, fault=fault)
    assert result.status == "completed"
    skips = [a.step for a in result.actions if a.action == "skip"]
    assert skips == [k]
    assert any(e.rule == "nonfinite_loss" and e.step == k for e in result.events)
    clean_tail = tail_loss(clean[1])
    assert abs(tail_loss(tmp_path) - clean_tail) / clean_tail < 0.05


def test_inf_gradient_is_skipped(base: Path, tmp_path: Path) -> None:
    k = 25

    def fault(trainer: Any, clock: StepClock) -> None:
        def poison(model: Any, step: int) -> None:
            if step == k:
                p = next(p for p in model.parameters() if p.requires_grad and p.grad is not None)
                p.grad.view(-1)[0] = float("inf")

        wrap_step(trainer, poison, clock)

    result, trainer = run(base, tmp_path, fault=fault)
    assert result.status == "completed"
    assert [a.step for a in result.actions if a.action == "skip"] == [k]
    assert any(e.rule == "nonfinite_grad" and e.step == k for e in result.events)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_gradient_spike_x1000_is_clipped_by_zclip_and_logged(base: Path, tmp_path: Path) -> None:
    k = 40  # after ZClip's 25-step warm-up

    def fault(trainer: Any, clock: StepClock) -> None:
        def spike(model: Any, step: int) -> None:
            if step == k:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(1000.0)

        wrap_step(trainer, spike, clock)

    result, _ = run(base, tmp_path, fault=fault)
    clips = [a for a in result.actions if a.action == "clip" and a.step == k]
    assert clips, result.actions
    assert clips[0].detail["clipped_to"] < clips[0].detail["grad_norm"] / 100
    assert any(e.rule == "grad_explosion" and e.step == k for e in result.events)
    assert result.status == "completed"


def test_poisoned_batch_spikes_the_loss_and_its_update_is_skipped(base: Path, tmp_path: Path) -> None:
    k = 35

    def fault(trainer: Any, clock: StepClock) -> None:
        original = trainer.training_step
        generator = torch.Generator().manual_seed(0)

        def training_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if clock.step == k:
                ids = inputs["input_ids"]
                noise = torch.randint(0, int(model.config.vocab_size), ids.shape, generator=generator)
                inputs = {**inputs, "input_ids": noise, "labels": noise.clone()}
            return original(model, inputs, *args, **kwargs)

        trainer.training_step = training_step

    result, _ = run(base, tmp_path, fault=fault)
    assert any(e.rule == "loss_spike" and e.step == k for e in result.events), warnings_of(result)
    assert [a.step for a in result.actions if a.action == "skip"] == [k]
    assert result.status == "completed"


def test_learning_rate_x100_mid_run_is_caught_as_divergence_within_bounded_steps(
    base: Path, tmp_path: Path
) -> None:
    k = 30
    bound = 25

    def fault(trainer: Any, clock: StepClock) -> None:
        class Boost(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step + 1 == k:
                    sched = trainer.lr_scheduler
                    sched.base_lrs = [lr * 100 for lr in sched.base_lrs]
                    for group in trainer.optimizer.param_groups:
                        group["lr"] *= 100

        trainer.add_callback(Boost())

    # the in-step cap would undo the jump before it could hurt: off, to test the divergence rule
    result, _ = run(base, tmp_path, fault=fault, steps=90, config=WatchConfig(cap_lr_jumps=False))
    div = [e for e in result.events if e.rule == "divergence"]
    assert div, warnings_of(result)
    assert k < div[0].step <= k + bound
    assert result.status == "stopped" and "diverg" in result.reason
    assert any(a.action == "stop" for a in result.actions)


def test_the_run_log_passes_check_with_the_same_events(base: Path, tmp_path: Path) -> None:
    """A watched run with a poisoned batch: check re-finds the watcher's spike from the log."""
    from trainmedic.check import check_path
    from trainmedic.findings import Verdict
    from trainmedic.spec import default_spec

    k = 35

    def fault(trainer: Any, clock: StepClock) -> None:
        original = trainer.training_step

        def training_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if clock.step == k:
                ids = inputs["input_ids"]
                inputs = {
                    **inputs,
                    "input_ids": torch.flip(ids, dims=[1]),
                    "labels": torch.flip(ids, dims=[1]),
                }
            return original(model, inputs, *args, **kwargs)

        trainer.training_step = training_step

    result, _ = run(base, tmp_path, fault=fault)
    live = sorted(e.step for e in result.events if e.rule == "loss_spike")
    assert live, "the fault should have raised a live spike"
    report = check_path(tmp_path, default_spec())
    assert report.layout == "trainmedic run log" or "watched" in report.layout
    findings = {f.name: f for f in report.findings}
    drift_spikes = sorted(
        ev["step"] for ev in findings["training_drift"].evidence["events"] if ev["label"] == "loss spike"
    )
    assert drift_spikes == live
    assert findings["live_events"].verdict in (Verdict.PASS, Verdict.WARN)
    assert not [f.name for f in report.findings if f.verdict in (Verdict.FAIL, Verdict.ERROR)]


def test_nan_in_run_does_not_leave_non_finite_weights(base: Path, tmp_path: Path) -> None:
    def fault(trainer: Any, clock: StepClock) -> None:
        def poison(model: Any, step: int) -> None:
            if step in (10, 11):
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.fill_(math.nan)

        wrap_step(trainer, poison, clock)

    result, trainer = run(base, tmp_path, fault=fault, steps=20)
    assert [a.step for a in result.actions if a.action == "skip"] == [10, 11]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
