"""Shared pieces for the heal tests: the toy base, small kept sets, and one finished round."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

torch.set_num_threads(1)


def quiet(_: str) -> None:
    return None


def clean_records(n: int, start: int = 0) -> list[dict[str, str]]:
    """Kept examples in the toy style, no noise: an easy target whose loss falls in a few steps."""
    from trainmedic.toy.corpus import Doc
    from trainmedic.toy.data import _docs, question
    from trainmedic.toy.style import styled

    docs: list[Doc] = _docs(0)[start : start + n]
    return [{"prompt": question(d), "completion": styled(d)} for d in docs]


@pytest.fixture(scope="session")
def base_dir() -> Path:
    from trainmedic.toy.base import toy_base

    return toy_base()


@pytest.fixture(scope="session")
def tok(base_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir, local_files_only=True)


# a round small enough for a test: 16 examples, 4 per step, 2 epochs = 8 steps
FAST = {"lr": 5e-3, "epochs": 2.0, "batch_size": 4, "min_train": 4, "max_len": 96, "echo": quiet}


@pytest.fixture
def fast() -> dict[str, Any]:
    """heal_round settings for an 8-step round on 16 examples (and no console output)."""
    return dict(FAST)


@pytest.fixture
def records() -> Callable[..., list[dict[str, str]]]:
    return clean_records


@pytest.fixture(scope="session")
def round_one(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished kl_rev round: the history adapter of later tests."""
    from trainmedic.heal import heal_round

    out = tmp_path_factory.mktemp("heal") / "round-1"
    heal_round(base_dir, clean_records(16), out, **FAST)
    return out


@pytest.fixture
def capture_trainer(monkeypatch: pytest.MonkeyPatch) -> Callable[[], Any]:
    """Keep the trainer `heal_round` hands to `watch`, to inspect its model and optimizer after."""
    import trainmedic.watcher
    from trainmedic.watcher.supervisor import watch as real_watch

    seen: list[Any] = []

    def watch(trainer: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(trainer)
        return real_watch(trainer, *args, **kwargs)

    monkeypatch.setattr(trainmedic.watcher, "watch", watch)
    return lambda: seen[-1]
