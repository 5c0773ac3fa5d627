"""Preflight on real toy trainers: problems are reported (never raised) and the model is left as it was."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import numpy as np  # noqa: E402

from trainmedic.watcher.preflight import preflight  # noqa: E402


@pytest.fixture(scope="module")
def base() -> Path:
    from trainmedic.toy.base import toy_base

    return toy_base()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """The toy model is too small to gain from two threads, and on a busy 2-core machine torch's
    threads wait on each other: one thread keeps this file fast and its timing steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trainer_on(base: Path, out: Path, rows: dict[str, list[Any]] | None = None, **kw: Any) -> Any:
    from datasets import Dataset

    from trainmedic.toy.training import toy_trainer

    data = Dataset.from_dict(rows) if rows is not None else None
    return toy_trainer(
        out, base=base, train_dataset=data, **{"steps": 2, "batch_size": 4, "seq_len": 16, **kw}
    )


def tensors(model: Any) -> dict[str, bytes]:
    named = [*model.named_parameters(), *(("buffer:" + n, b) for n, b in model.named_buffers())]
    return {n: t.detach().cpu().contiguous().numpy().tobytes() for n, t in named}


def losses(trainer: Any) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def wrap_loss(trainer: Any, change: Any) -> None:
    original = trainer.compute_loss

    def compute_loss(*args: Any, **kwargs: Any) -> Any:
        return change(original(*args, **kwargs))

    trainer.compute_loss = compute_loss


def test_preflight_leaves_lora_model_bit_identical_and_training_unchanged(base: Path, tmp_path: Path) -> None:
    from trainmedic.toy.training import toy_trainer

    watched = toy_trainer(tmp_path / "a", base=base, steps=4, batch_size=4, seq_len=16)
    before = tensors(watched.model)
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    report = preflight(watched, batches=2)
    assert report.ok, report.summary()
    assert len(report.batches) == 2
    assert all(b.loss is not None and 3 < b.loss < 10 for b in report.batches)  # a real LM loss
    assert all(b.grad_norm is not None and b.grad_norm > 0 for b in report.batches)
    assert all(b.seconds > 0 and (b.peak_memory_mb or 0) > 0 for b in report.batches)
    assert 0 < report.trainable_params < report.total_params
    assert tensors(watched.model) == before
    assert all(p.grad is None for p in watched.model.parameters())
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert np.array_equal(np.random.get_state()[1], rng[1]) and random.getstate() == rng[2]

    watched.train()
    plain = toy_trainer(tmp_path / "b", base=base, steps=4, batch_size=4, seq_len=16)
    plain.train()
    assert losses(watched) == losses(plain) and len(losses(plain)) == 4


def test_preflight_runs_in_train_mode_and_restores_eval_mode_buffers_and_grads(
    base: Path, tmp_path: Path
) -> None:
    trainer = trainer_on(base, tmp_path)
    model = trainer.model
    model.eval()
    seen: list[bool] = []
    head = model.get_base_model().lm_head
    head.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def count(module: Any, inputs: Any, output: Any) -> None:  # a running statistic, like BatchNorm's
        seen.append(module.training)
        module.calls += 1

    head.register_forward_hook(count)
    param = next(p for p in model.parameters() if p.requires_grad)
    grad = torch.full_like(param, 0.25)
    param.grad = grad
    report = preflight(trainer, batches=1)
    assert report.ok, report.summary()
    assert seen == [True]
    assert not any(m.training for m in model.modules())
    assert int(head.calls) == 0
    assert param.grad is grad and bool((grad == 0.25).all())


def test_ragged_input_ids_with_default_collator_are_reported_not_raised(base: Path, tmp_path: Path) -> None:
    ids = [[5, 6, 7, 8], [5, 6, 7], [9, 10, 11, 12, 13]] * 4
    report = preflight(trainer_on(base, tmp_path, {"input_ids": ids, "labels": ids}))
    assert not report.ok and report.kinds == ["data"]
    assert "different lengths" in report.problems[0][1]


def test_float_labels_are_reported_as_a_dtype_problem(base: Path, tmp_path: Path) -> None:
    rows = {"input_ids": [[5, 6, 7, 8]] * 8, "labels": [[5.5, 6.0, 7.0, 8.0]] * 8}
    report = preflight(trainer_on(base, tmp_path, rows))
    assert not report.ok and report.kinds == ["dtype"]
    assert "batch 0" in report.problems[0][1]


def test_labels_all_ignored_are_reported_once_as_a_data_problem(base: Path, tmp_path: Path) -> None:
    rows = {"input_ids": [[5, 6, 7, 8]] * 8, "labels": [[-100] * 4] * 8}
    report = preflight(trainer_on(base, tmp_path, rows))
    assert report.kinds == ["data", "data"]  # one per batch, not also a NaN-loss or no-gradient problem
    assert "-100" in report.problems[0][1]
    assert report.batches[0].supervised_tokens == 0


def test_empty_dataset_is_reported(base: Path, tmp_path: Path) -> None:
    rows = {"input_ids": [[5, 6, 7, 8]], "labels": [[5, 6, 7, 8]]}
    trainer = trainer_on(base, tmp_path, rows)
    trainer.train_dataset = trainer.train_dataset.select([])
    report = preflight(trainer)
    assert report.kinds == ["data"] and "empty" in report.problems[0][1]


def test_frozen_model_is_reported_and_its_forward_still_checked(base: Path, tmp_path: Path) -> None:
    trainer = trainer_on(base, tmp_path, lora=False)
    for p in trainer.model.parameters():
        p.requires_grad_(False)
    report = preflight(trainer)
    assert report.kinds == ["no_gradient"] and report.trainable_params == 0
    assert "no parameter is trainable" in report.problems[0][1]
    assert all(loss is not None and loss > 0 for loss in report.losses)


@pytest.mark.parametrize(("input_grads", "said"), [(False, "no grad_fn"), (True, "no gradient reached")])
def test_trainable_parameter_the_loss_never_reaches_is_reported(
    base: Path, tmp_path: Path, input_grads: bool, said: str
) -> None:
    trainer = trainer_on(base, tmp_path, lora=False)
    for p in trainer.model.parameters():
        p.requires_grad_(False)
    trainer.model.register_parameter("orphan", torch.nn.Parameter(torch.zeros(3)))
    if input_grads:  # as gradient checkpointing with an adapter sets up: the loss has a graph all the same
        trainer.model.enable_input_require_grads()
    report = preflight(trainer, batches=1)
    assert report.kinds == ["no_gradient"] and report.trainable_params == 3
    assert said in report.problems[0][1]


def test_nan_loss_is_reported_with_strict_json(base: Path, tmp_path: Path) -> None:
    trainer = trainer_on(base, tmp_path)
    wrap_loss(trainer, lambda loss: loss * float("nan"))
    report = preflight(trainer, batches=1)
    assert report.kinds == ["nonfinite"] and "loss is nan" in report.problems[0][1]
    record = report.to_dict()
    json.dumps(record, allow_nan=False)
    assert record["batches"][0]["loss"] is None and "loss" in record["batches"][0]["nonfinite"]
    assert [e.rule for e in report.events()] == ["preflight_nonfinite"]


def test_out_of_memory_is_reported_and_stops_the_preflight(base: Path, tmp_path: Path) -> None:
    trainer = trainer_on(base, tmp_path)
    calls: list[int] = []

    def oom(loss: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return loss

    wrap_loss(trainer, oom)
    report = preflight(trainer, batches=3)
    assert report.kinds == ["memory"] and "per_device_train_batch_size" in report.problems[0][1]
    assert len(calls) == 2 and len(report.batches) == 2
    assert all(p.grad is None for p in trainer.model.parameters())


def test_keyboard_interrupt_propagates_after_the_model_is_restored(base: Path, tmp_path: Path) -> None:
    trainer = trainer_on(base, tmp_path)
    trainer.model.eval()

    def interrupt(loss: Any) -> Any:
        loss.backward()  # leave gradients behind, as a half-done step would
        raise KeyboardInterrupt

    wrap_loss(trainer, interrupt)
    with pytest.raises(KeyboardInterrupt):
        preflight(trainer)
    assert not trainer.model.training
    assert all(p.grad is None for p in trainer.model.parameters())


def test_sft_trainer_runs_trl_loss_and_keeps_its_metrics_untouched(base: Path, tmp_path: Path) -> None:
    from trainmedic.toy.training import toy_sft_trainer

    trainer = toy_sft_trainer(tmp_path, base=base, steps=2, batch_size=4, n_examples=16)
    before = tensors(trainer.model)
    metrics = json.dumps(trainer._metrics, sort_keys=True)
    tokens = trainer._total_train_tokens
    seen: list[int] = []
    wrap_loss(trainer, lambda loss: seen.append(1) or loss)
    report = preflight(trainer)
    assert report.ok, report.summary()
    assert len(seen) == 2 and all(b.supervised_tokens for b in report.batches)
    assert json.dumps(trainer._metrics, sort_keys=True) == metrics
    assert trainer._total_train_tokens == tokens
    assert tensors(trainer.model) == before
    assert "preflight ok" in report.summary()
