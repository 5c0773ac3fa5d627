"""The data window a rollback skips: dropped from the epoch iterator, across an epoch's end."""

from __future__ import annotations

import types
from typing import Any

import pytest

pytest.importorskip("torch")

from trainmedic.watcher.capture import wire


def trainer_with_batches() -> Any:
    def get_batch_samples(epoch_iterator: Any, num_batches: int, device: Any = None) -> list[Any]:
        return [b for _, b in zip(range(num_batches), epoch_iterator, strict=False)]

    return types.SimpleNamespace(
        training_step=lambda *a, **k: None, log=lambda *a, **k: None, get_batch_samples=get_batch_samples
    )


def test_a_skipped_window_past_the_end_of_an_epoch_goes_on_in_the_next() -> None:
    vitals: Any = types.SimpleNamespace(skip_batches=5)
    trainer = trainer_with_batches()
    wire(vitals, trainer)
    first_epoch = iter(["a7", "a8", "a9"])
    assert trainer.get_batch_samples(first_epoch, 2) == []  # the epoch's 3 batches were all in the window
    assert vitals.skip_batches == 2
    second_epoch = iter(["b0", "b1", "b2", "b3"])
    assert trainer.get_batch_samples(second_epoch, 2) == ["b2", "b3"]
    assert vitals.skip_batches == 0
    assert trainer.get_batch_samples(iter(["c0"]), 1) == ["c0"]  # nothing more is dropped
