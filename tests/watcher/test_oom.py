"""OOM inside a training step: the micro-batch is split, the step's gradient stays the same.

Out-of-memory errors are simulated on CPU: a hook on a decoder layer raises
`torch.OutOfMemoryError` whenever it sees more rows than "fit", either in the forward or late in
the backward (after the upper layers' LoRA gradients were already accumulated, so a failure
leaves a partial gradient behind that must be thrown away).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import TrainerCallback  # noqa: E402

from trainmedic.watcher.events import Action  # noqa: E402
from trainmedic.watcher.oom import OomGuard, OomNotRecoverable, fallback_args, is_oom  # noqa: E402


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    from trainmedic.toy.base import toy_base

    # The toy model is too small to gain from a second thread; on a busy 2-core machine OpenMP's
    # waiting makes two threads many times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield toy_base()
    torch.set_num_threads(threads)


def make_trainer(base: Path, out: Path, **kw: Any) -> Any:
    from trainmedic.toy.training import toy_trainer

    return toy_trainer(out, base=base, **kw)


class FakeOom:
    """Raises a CUDA-style OOM when a decoder layer sees more than `fits` rows, from call `start` on
    (a call is one forward of that layer), in the forward or in the backward."""

    def __init__(self, model: Any, fits: int, *, where: str = "forward", start: int = 1) -> None:
        self.fits, self.where, self.start = fits, where, start
        self.calls = self.raised = 0
        self.rows_run = 0  # rows that got through (forward and backward)
        layers = [m for name, m in model.named_modules() if name.endswith("layers.1")]
        self.handle = layers[0].register_forward_hook(self._forward)

    def _fail(self) -> None:
        self.raised += 1
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    def _forward(self, module: Any, args: Any, output: Any) -> None:
        self.calls += 1
        hidden = output[0] if isinstance(output, tuple) else output
        rows = int(hidden.shape[0])
        too_big = self.calls >= self.start and rows > self.fits
        if too_big and self.where == "forward":
            self._fail()
        if too_big:
            hidden.register_hook(lambda grad: self._fail())
        else:
            self.rows_run += rows


def masked_batches(trainer: Any, n: int) -> list[dict[str, Any]]:
    """`n` micro-batches whose examples have different numbers of label tokens, so a mean weighted
    by examples differs from one weighted by tokens."""
    loader = iter(trainer.get_train_dataloader())
    batches = []
    for b in range(n):
        batch = dict(next(loader))
        labels = batch["labels"].clone()
        for i in range(labels.shape[0]):
            labels[i, : 5 * i + 3 * b] = -100
        batch["labels"] = labels
        batches.append(batch)
    return batches


def accumulate(trainer: Any, batches: list[dict[str, Any]], with_num_items: bool) -> tuple[list[Any], float]:
    """One optimizer step's worth of `training_step` calls; the trainable gradients and summed loss."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = len(batches)
    num_items = trainer._get_num_items_in_batch(batches, torch.device("cpu")) if with_num_items else None
    loss = sum(float(trainer.training_step(model, b, num_items)) for b in batches)
    return [p.grad.clone() for p in model.parameters() if p.requires_grad], loss


def same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(
        torch.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("with_num_items", [True, False], ids=["num_items", "mean"])
def test_split_step_has_the_unsplit_gradient_and_loss(
    base: Path, tmp_path: Path, where: str, accumulation: int, with_num_items: bool
) -> None:
    trainer = make_trainer(base, tmp_path, steps=2)
    batches = masked_batches(trainer, accumulation)
    want_grads, want_loss = accumulate(trainer, batches, with_num_items)

    actions: list[Action] = []
    guard = OomGuard(actions.append).attach(trainer)
    # the OOM appears on the last micro-batch, after earlier ones accumulated their gradient
    oom = FakeOom(trainer.model, fits=4, where=where, start=accumulation)
    got_grads, got_loss = accumulate(trainer, batches, with_num_items)

    assert oom.raised == 1
    assert [(a.action, a.detail["split"]) for a in actions] == [("oom_split", 2)]
    assert same(got_grads, want_grads)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    assert guard.split == 2


def test_a_half_that_still_runs_out_is_halved_again_and_the_split_is_remembered(
    base: Path, tmp_path: Path
) -> None:
    trainer = make_trainer(base, tmp_path, steps=2)
    first, second = masked_batches(trainer, 2)
    want = [accumulate(trainer, [b], False) for b in (first, second)]

    guard = OomGuard(lambda a: None).attach(trainer)
    oom = FakeOom(trainer.model, fits=2, where="backward")
    got = [accumulate(trainer, [b], False) for b in (first, second)]

    assert [a.detail["split"] for a in guard.actions] == [2, 4]
    assert oom.raised == 2  # 8 rows, then the first 4: never again, not on the next micro-batch
    assert guard.split == 4
    for (want_grads, want_loss), (got_grads, got_loss) in zip(want, got, strict=True):
        assert same(got_grads, want_grads)
        assert got_loss == pytest.approx(want_loss, rel=1e-5)


class Count(TrainerCallback):
    def __init__(self, oom: FakeOom | None) -> None:
        self.oom = oom
        self.optimizer_steps = 0
        self.rows_per_step: list[int] = []

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.optimizer_steps += 1

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.oom is not None:
            self.rows_per_step.append(self.oom.rows_run - sum(self.rows_per_step))


def test_oom_mid_run_is_survived_once_with_the_same_steps_batch_and_losses(
    base: Path, tmp_path: Path
) -> None:
    steps, k = 8, 4
    clean = make_trainer(base, tmp_path / "clean", steps=steps, gradient_accumulation_steps=2)
    clean.train()
    clean_losses = [h["loss"] for h in clean.state.log_history if "loss" in h]

    trainer = make_trainer(base, tmp_path / "oom", steps=steps, gradient_accumulation_steps=2)
    guard = OomGuard(lambda a: None).attach(trainer)
    # two forwards of layer 1 per step: from step k on, a micro-batch of 8 no longer fits
    oom = FakeOom(trainer.model, fits=4, start=2 * (k - 1) + 1)
    count = Count(oom)
    trainer.add_callback(count)
    trainer.train()

    assert trainer.state.global_step == steps
    assert count.optimizer_steps == steps
    assert oom.raised == 1
    assert [(a.step, a.detail["split"]) for a in guard.actions] == [(k, 2)]
    assert count.rows_per_step == [16] * steps  # 2 micro-batches of 8, split or not
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses == pytest.approx(clean_losses, rel=1e-3)


def test_under_watch_the_split_is_logged_and_vitals_see_one_loss_per_micro_batch(
    base: Path, tmp_path: Path
) -> None:
    from trainmedic.record.load import load_run
    from trainmedic.watcher import Vitals, watch

    steps, k = 6, 3
    clean = make_trainer(base, tmp_path / "clean", steps=steps)
    watch(clean, echo=lambda line: None)

    trainer = make_trainer(base, tmp_path / "oom", steps=steps)
    vitals = Vitals(echo=lambda line: None)
    FakeOom(trainer.model, fits=4, start=k)
    # preflight off: the fault counts forward calls, and preflight would add two
    result = watch(trainer, vitals=vitals, preflight=0)  # watch puts its OomGuard beneath Vitals
    assert vitals.oom is not None and vitals.oom.split == 2

    assert result.status == "completed" and result.steps == steps
    assert [(a.step, a.action, a.detail["split"]) for a in result.actions] == [(k, "oom_split", 2)]
    run = load_run(tmp_path / "oom")
    assert [(a["step"], a["action"]) for a in run.actions] == [(k, "oom_split")]
    want = load_run(tmp_path / "clean").train_loss.values
    assert list(run.train_loss.values) == pytest.approx(list(want), rel=1e-3)


def test_an_error_that_is_not_oom_passes_through_untouched(base: Path, tmp_path: Path) -> None:
    trainer = make_trainer(base, tmp_path, steps=2)
    (batch,) = masked_batches(trainer, 1)
    guard = OomGuard(lambda a: None).attach(trainer)
    boom = ValueError("labels and logits disagree on the sequence length")

    def broken(module: Any, args: Any, output: Any) -> None:
        raise boom

    handle = trainer.model.get_input_embeddings().register_forward_hook(broken)
    with pytest.raises(ValueError) as caught:
        accumulate(trainer, [batch], True)
    handle.remove()
    assert caught.value is boom
    assert guard.split == 1 and guard.actions == [] and guard.ooms == 0


def test_a_single_example_that_still_runs_out_raises_a_clear_error(base: Path, tmp_path: Path) -> None:
    trainer = make_trainer(base, tmp_path, steps=2, gradient_accumulation_steps=2)
    (batch,) = masked_batches(trainer, 1)
    guard = OomGuard(lambda a: None).attach(trainer)
    FakeOom(trainer.model, fits=0, where="backward")
    with pytest.raises(OomNotRecoverable, match="single example") as caught:
        accumulate(trainer, [batch], True)
    err = caught.value
    assert isinstance(err.__cause__, torch.OutOfMemoryError)
    # a smaller per-device batch would still hold one example: no fallback, advice instead
    assert err.fallback is None
    assert "gradient checkpointing" in str(err) and "roll back" not in str(err)
    assert [a.detail["split"] for a in guard.actions] == [2, 4, 8]
    # no partial gradient of the failed example is left for the optimizer
    assert all(p.grad is None for p in trainer.model.parameters())
    assert not is_oom(err)  # an outer handler must not try to split it again


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_without_a_gradient_copy_only_a_failure_before_any_gradient_is_split(
    base: Path, tmp_path: Path, where: str
) -> None:
    trainer = make_trainer(base, tmp_path, steps=2)
    batches = masked_batches(trainer, 2)
    want, _ = accumulate(trainer, batches, True)

    OomGuard(lambda a: None, snapshot_limit_bytes=0).attach(trainer)
    FakeOom(trainer.model, fits=4, where=where, start=2)
    if where == "forward":
        got, _ = accumulate(trainer, batches, True)
        assert same(got, want)
    else:
        with pytest.raises(OomNotRecoverable, match="snapshot_limit_bytes"):
            accumulate(trainer, batches, True)


def test_only_the_last_piece_syncs_gradients_across_processes() -> None:
    syncing = [True]
    synced: list[bool] = []  # for each piece that ran: did its backward sync across processes?

    @contextlib.contextmanager
    def no_sync(model: Any) -> Iterator[None]:
        syncing.append(False)
        try:
            yield
        finally:
            syncing.pop()

    def training_step(model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        if inputs["input_ids"].shape[0] > 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB")
        synced.append(syncing[-1])
        return torch.tensor(1.0)

    trainer = types.SimpleNamespace(
        training_step=training_step,
        accelerator=types.SimpleNamespace(sync_gradients=True, no_sync=no_sync),
        state=types.SimpleNamespace(global_step=0),
        loss_is_scaled_for_ga=True,
    )
    guard = OomGuard(lambda a: None).attach(trainer)
    loss = trainer.training_step(torch.nn.Linear(1, 1), {"input_ids": torch.zeros(8, 3)}, None)
    assert synced == [False, False, False, True]
    assert float(loss) == 4.0  # four pieces of a loss already normalised over the step: they add
    guard.detach()
    assert trainer.training_step is training_step


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"), True),
        (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 bytes"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x3 and 4x5)"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_out_of_memory_is_recognised_from_gpu_and_cpu_allocators(exc: BaseException, expected: bool) -> None:
    assert is_oom(exc) is expected


@pytest.mark.parametrize(
    ("batch", "accumulation", "expected"),
    [(8, 1, (4, 2)), (6, 2, (3, 4)), (3, 4, (1, 12)), (2, 8, (1, 16))],
)
def test_fallback_args_keep_the_effective_batch(
    batch: int, accumulation: int, expected: tuple[int, int]
) -> None:
    args = types.SimpleNamespace(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
    new = fallback_args(args)
    assert (new["per_device_train_batch_size"], new["gradient_accumulation_steps"]) == expected
    assert new["per_device_train_batch_size"] * new["gradient_accumulation_steps"] == batch * accumulation


def test_fallback_args_refuse_a_batch_of_one_with_advice() -> None:
    args = types.SimpleNamespace(per_device_train_batch_size=1, gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        fallback_args(args)
