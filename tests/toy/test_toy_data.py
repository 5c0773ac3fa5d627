from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("datasets")

from trainmedic.toy.base import toy_base
from trainmedic.toy.corpus import MIN_CHARS, corpus_docs, corpus_texts, stdlib_docs
from trainmedic.toy.data import (
    lm_dataset,
    preference_dataset,
    prompt_completion_dataset,
    scrambled,
    summary,
)


@pytest.fixture(scope="session")
def base_dir() -> Path:
    return toy_base()


@pytest.fixture(scope="module")
def tok(base_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir, local_files_only=True)


def test_corpus_is_unique_normalised_docstrings_split_without_overlap() -> None:
    train, heldout = corpus_texts("train"), corpus_texts("heldout")
    assert len(train) > 1000 and len(heldout) > 50
    assert 0.02 < len(heldout) / (len(train) + len(heldout)) < 0.10
    assert not set(train) & set(heldout)
    everything = train + heldout
    assert len(set(everything)) == len(everything)
    assert all(len(t) >= MIN_CHARS and "\n" not in t and "  " not in t for t in everything)
    assert 500_000 < sum(map(len, everything)) <= 4_000_000


def test_corpus_is_the_same_on_every_call_and_named() -> None:
    assert corpus_texts("heldout") == corpus_texts("heldout")
    docs = corpus_docs("heldout")
    assert all(d.name and d.module and d.kind in ("module", "class", "function") for d in docs)
    assert any(d.module.startswith("json") for d in stdlib_docs())
    with pytest.raises(ValueError, match="split must be"):
        corpus_docs("validation")  # type: ignore[arg-type]


def test_summary_keeps_the_first_sentence_and_bounds_its_length() -> None:
    assert summary("Return the value. Raise KeyError otherwise.") == "Return the value."
    long = "word " * 100
    assert len(summary(long)) <= 165 and summary(long).endswith(" ...")


def test_lm_dataset_is_packed_labelled_and_deterministic(tok) -> None:
    ds = lm_dataset(tok, n=16, seq_len=32, seed=3)
    assert ds.column_names == ["input_ids", "attention_mask", "labels"]
    assert len(ds) == 16
    assert all(len(r) == 32 for r in ds["input_ids"])
    assert ds["labels"] == ds["input_ids"]
    assert all(set(m) == {1} for m in ds["attention_mask"])
    assert lm_dataset(tok, n=16, seq_len=32, seed=3)["input_ids"] == ds["input_ids"]
    assert lm_dataset(tok, n=16, seq_len=32, seed=4)["input_ids"] != ds["input_ids"]
    text = tok.decode(ds["input_ids"][0])
    assert "def " in text or "class " in text


def test_lm_dataset_refuses_more_blocks_than_the_corpus_holds(tok) -> None:
    with pytest.raises(ValueError, match="blocks of 256"):
        lm_dataset(tok, n=10**6, seq_len=256)


def test_prompt_completion_pairs_name_the_same_thing() -> None:
    ds = prompt_completion_dataset(n=20, seed=1)
    assert ds.column_names == ["prompt", "completion"]
    assert len(ds) == 20
    for prompt, completion in zip(ds["prompt"], ds["completion"], strict=True):
        name = prompt.removeprefix("Write a stub for ").rstrip(".\n").rsplit(".", 1)[-1]
        assert completion.startswith((f"def {name}():", f"class {name}:"))
    assert prompt_completion_dataset(n=20, seed=1)["completion"] == ds["completion"]


def test_preference_rejects_the_same_words_scrambled() -> None:
    ds = preference_dataset(n=30, seed=2)
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    for chosen, rejected in zip(ds["chosen"], ds["rejected"], strict=True):
        assert chosen != rejected
        assert Counter(chosen.split()) == Counter(rejected.split())
    assert preference_dataset(n=30, seed=2)["rejected"] == ds["rejected"]
    assert scrambled("a b", seed=0) == "b a"  # a shuffle that changes nothing is rotated instead


def test_dataset_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="n must be between 1 and"):
        prompt_completion_dataset(n=0)
    with pytest.raises(ValueError, match="n must be between 1 and"):
        preference_dataset(n=10**7)
