"""The user's own logged metrics stay true after a treated step: no NaN the watcher handled ever
reaches `log_history`, `train_loss` or a `report_to` logger, and the logged loss is the mean of
the updates that were applied."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import TrainerCallback  # noqa: E402

from trainmedic import watch  # noqa: E402

NAN_AT = 10
STEPS = 40
EVERY = 5


class Recorder(TrainerCallback):
    """What a TensorBoard/W&B-style logger callback receives."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        self.logs.append(dict(logs or {}))


@pytest.fixture(scope="module")
def treated_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Recorder, Path]:
    from trainmedic.toy.base import toy_base
    from trainmedic.toy.training import toy_trainer

    out = tmp_path_factory.mktemp("nan-once")
    recorder = Recorder()
    trainer = toy_trainer(
        out,
        base=toy_base(),
        steps=STEPS,
        logging_steps=EVERY,
        save_strategy="steps",
        save_steps=10,
        callbacks=[recorder],
    )
    original = trainer.compute_loss

    def compute_loss(*args: Any, **kwargs: Any) -> Any:
        loss = original(*args, **kwargs)
        if trainer.state.global_step + 1 == NAN_AT:
            return loss * float("nan")
        return loss

    trainer.compute_loss = compute_loss
    result = watch(trainer, echo=lambda line: None)
    return result, trainer, recorder, out


def _finite(values: list[Any]) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def test_the_treated_nan_is_skipped_and_never_logged(treated_run: tuple[Any, Any, Recorder, Path]) -> None:
    result, trainer, recorder, _ = treated_run
    assert [a.step for a in result.actions if a.action == "skip"] == [NAN_AT]
    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    norms = [e["grad_norm"] for e in history if "grad_norm" in e]
    assert len(losses) == STEPS // EVERY and _finite(losses), losses
    assert len(norms) == STEPS // EVERY and _finite(norms), norms
    train_loss = next(e["train_loss"] for e in history if "train_loss" in e)
    assert math.isfinite(train_loss)
    assert math.isfinite(result.train_output.training_loss)
    received = [
        v for logs in recorder.logs for k, v in logs.items() if k in ("loss", "grad_norm", "train_loss")
    ]
    assert len(received) >= 2 * STEPS // EVERY and _finite(received)


def test_the_logged_loss_is_the_mean_of_the_applied_updates(
    treated_run: tuple[Any, Any, Recorder, Path],
) -> None:
    from trainmedic.record.load import load_run

    _, trainer, _, out = treated_run
    raw = load_run(out).train_loss  # the watcher's per-step raw losses (NaN at the treated step)
    by_step = dict(zip(raw.steps.tolist(), raw.values.tolist(), strict=True))
    assert math.isnan(by_step[NAN_AT])
    logged = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    for end, entry in logged.items():
        window = [by_step[s] for s in range(end - EVERY + 1, end + 1) if math.isfinite(by_step[s])]
        assert entry["loss"] == pytest.approx(sum(window) / len(window), rel=1e-5), end
    assert logged[NAN_AT]["trainmedic/treated_steps"] == 1.0
    assert logged[NAN_AT + EVERY]["trainmedic/treated_steps"] == 0.0
    assert logged[NAN_AT]["trainmedic/skips"] == 1.0
    # the treated step counts with its window's applied mean, so train_loss is the windows' mean
    train_loss = next(e["train_loss"] for e in trainer.state.log_history if "train_loss" in e)
    means = [e["loss"] for e in logged.values()]
    assert train_loss == pytest.approx(sum(means) / len(means), rel=1e-5)


def test_the_checkpoints_saved_after_the_treatment_hold_no_nan(
    treated_run: tuple[Any, Any, Recorder, Path],
) -> None:
    import json

    _, _, _, out = treated_run
    for n in (10, 20, 30, 40):
        state = json.loads((out / f"checkpoint-{n}" / "trainer_state.json").read_text())
        values = [e[k] for e in state["log_history"] for k in ("loss", "grad_norm") if k in e]
        assert values and _finite(values), n
