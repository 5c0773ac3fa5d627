from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from trainmedic.toy.base import toy_base
from trainmedic.toy.tokenizer import BOS, EOS, PAD, VOCAB_SIZE, train_tokenizer


@pytest.fixture(scope="session")
def base_dir() -> Path:
    return toy_base()


@pytest.fixture(scope="module")
def tok(base_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir, local_files_only=True)


def roundtrip(tok, text: str) -> str:
    return tok.decode(tok(text)["input_ids"])


def test_saved_tokenizer_has_the_trained_vocab_and_special_tokens(tok) -> None:
    assert len(tok) == VOCAB_SIZE
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, PAD)
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert tok(f"a{EOS}b")["input_ids"].count(tok.eos_token_id) == 1  # a special token is one id
    # Trained on docstrings, common words are single tokens rather than bytes.
    assert len(tok(" Return the")["input_ids"]) == 2


def test_non_ascii_text_never_seen_in_training_round_trips(tok) -> None:
    text = "naïve café — Ελληνικά, 日本語, emoji 🙂🚀, tabs\tand\nnewlines, \x00 nul"
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert roundtrip(tok, text) == text


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=80))
def test_any_text_round_trips(tok, text: str) -> None:
    assert roundtrip(tok, text) == text


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=64))
def test_any_bytes_round_trip_through_latin1_text(tok, data: bytes) -> None:
    # Byte-level BPE: every byte value 0..255 has a token, so arbitrary byte strings survive.
    assert roundtrip(tok, data.decode("latin-1")).encode("latin-1") == data


def test_chat_template_renders_the_prompt_as_a_prefix_of_the_conversation(tok) -> None:
    prompt = [{"role": "user", "content": "What does json.loads do?"}]
    full = [*prompt, {"role": "assistant", "content": "Deserialize a JSON document."}]
    rendered_prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    rendered_full = tok.apply_chat_template(full, tokenize=False)
    assert rendered_full.startswith(rendered_prompt)
    assert rendered_full.endswith(f"Deserialize a JSON document.{EOS}\n")
    ids = tok.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"]
    assert tok.convert_tokens_to_ids("<|assistant|>") in ids


def test_training_is_deterministic_and_byte_complete() -> None:
    texts = ["def parse(text): Return the parsed value of text."] * 20 + [
        "Read the file and return bytes."
    ] * 20
    a = train_tokenizer(texts, vocab_size=300)
    b = train_tokenizer(texts, vocab_size=300)
    assert a.get_vocab() == b.get_vocab()
    assert roundtrip(a, "Zürich ∑ 🙂") == "Zürich ∑ 🙂"  # none of these characters were in `texts`
