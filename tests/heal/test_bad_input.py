"""Bad input stops a round with a clear message before any training starts."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trainmedic.heal import HealError, heal_round


@pytest.fixture
def run(base_dir: Path, tmp_path: Path, records: Any, fast: dict[str, Any]) -> Callable[..., str]:
    """Start a round that must fail; return its message after checking nothing was trained."""

    def start(*, base: Path | None = None, data: Any = None, **knobs: Any) -> str:
        out = tmp_path / "out"
        with pytest.raises(HealError) as err:
            heal_round(base or base_dir, records(16) if data is None else data, out, **{**fast, **knobs})
        assert not (out / "logs").exists() and not (out / "adapter_model.safetensors").exists()
        return str(err.value)

    return start


@pytest.mark.parametrize("name", ["lam", "tau", "lr", "epochs"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_non_positive_numbers_name_their_flag(run: Callable[..., str], name: str, value: float) -> None:
    assert f"--{name} must be a positive number" in run(**{name: value})


@pytest.mark.parametrize(
    ("knobs", "expected"),
    [
        ({"divergence": "kl"}, "--divergence must be one of nll, kl_fwd, kl_rev, wd"),
        ({"rank": 0}, "--rank must be an integer >= 1"),
        ({"max_len": 1}, "--max-len must be an integer >= 2"),
        ({"layers": (2, 9)}, "--layers 2:9 is outside the model: it has 4 decoder layers"),
        ({"layers": (3, 3)}, "0 <= START < END <= 4"),
        ({"max_len": 4096}, "--max-len 4096 exceeds the model's 512 positions"),
        ({"targets": ("c_attn",)}, "target module(s) c_attn not found"),
        ({"watch_config": "reckless"}, "--watch: unknown preset 'reckless'"),
        ({"warmup": 3}, "unknown round setting"),
    ],
)
def test_bad_settings_are_named(run: Callable[..., str], knobs: dict[str, Any], expected: str) -> None:
    assert expected in run(**knobs)


def test_a_starved_filter_is_an_error_that_says_fix_upstream(run: Callable[..., str], records: Any) -> None:
    message = run(data=records(3), min_train=8)
    assert "the filter starved the data: 3 usable kept example(s)" in message
    assert "fix upstream, do not train" in message


def test_examples_emptied_by_truncation_do_not_count_toward_min_train(run: Callable[..., str]) -> None:
    long = [{"prompt": "Q: " + "word " * 80, "completion": " yes"}] * 6
    message = run(data=long, max_len=16, min_train=4)
    assert "0 usable kept example(s) (6 skipped as empty after truncation)" in message


def test_a_malformed_data_file_is_named_with_its_line(run: Callable[..., str], tmp_path: Path) -> None:
    data = tmp_path / "kept.jsonl"
    data.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "p"\n', encoding="utf-8")
    assert run(data=data).startswith(f"{data}:2: not valid JSON")


def test_a_base_that_is_not_a_model_directory(run: Callable[..., str], tmp_path: Path) -> None:
    assert "not a model directory" in run(base=tmp_path)


def test_history_that_is_not_an_adapter_or_is_given_twice(
    run: Callable[..., str], tmp_path: Path, round_one: Path
) -> None:
    assert "not a PEFT adapter directory" in run(history=[tmp_path])
    assert "is given twice as --history" in run(history=[round_one, round_one])


def test_history_whose_rank_contradicts_its_config(
    run: Callable[..., str], round_one: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad-rank"
    shutil.copytree(round_one, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["r"] = 4
    (bad / "adapter_config.json").write_text(json.dumps(config))
    message = run(history=[bad])
    assert message.startswith(str(bad / "adapter_model.safetensors"))
    assert "rank 8/8 but adapter_config.json says r=4" in message


def _other_base(tmp_path: Path, tok: Any, hidden: int) -> Path:
    from transformers import LlamaForCausalLM

    from trainmedic.toy.model import toy_config

    config = toy_config(tok)
    config.hidden_size, config.intermediate_size = hidden, 2 * hidden
    path = tmp_path / f"base-{hidden}"
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_history_from_another_base_of_the_same_shape(
    run: Callable[..., str], round_one: Path, tmp_path: Path, tok: Any
) -> None:
    other = _other_base(tmp_path, tok, hidden=128)  # same architecture, other weights
    message = run(base=other, history=[round_one])
    assert message.startswith(f"{round_one}: was trained on a different base model")


def test_history_that_does_not_fit_the_base_layers(
    run: Callable[..., str], round_one: Path, tmp_path: Path, tok: Any
) -> None:
    bare = tmp_path / "bare"  # an adapter from elsewhere: no heal record, its base not on this machine
    shutil.copytree(round_one, bare)
    (bare / "trainmedic-heal.json").unlink()
    config = json.loads((bare / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/some-model"
    (bare / "adapter_config.json").write_text(json.dumps(config))
    message = run(base=_other_base(tmp_path, tok, hidden=64), history=[bare])
    assert "do not fit the base's layer (64 -> 64): it was trained on a different base" in message


def test_out_that_already_holds_a_round(base_dir: Path, round_one: Path) -> None:
    with pytest.raises(HealError, match="already holds an adapter"):
        heal_round(base_dir, [{"prompt": "p", "completion": "c"}], round_one)


def test_out_that_holds_anything_is_refused_and_left_as_it_was(base_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")  # a round would write its own README.md here
    with pytest.raises(HealError, match=r"is not empty \(README.md\); --out takes a new or empty directory"):
        heal_round(base_dir, [{"prompt": "p", "completion": "c"}] * 10, out)
    assert [p.name for p in out.iterdir()] == ["README.md"]
    assert (out / "README.md").read_text() == "my notes\n"
