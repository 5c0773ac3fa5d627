"""The completion mask lines up with the completion's tokens, a BPE merge across the boundary included."""

from __future__ import annotations

from typing import Any

from trainmedic.heal.data import Example
from trainmedic.heal.tokens import IGNORE, Collator, encode


def labelled(row: dict[str, list[int]]) -> list[int]:
    return [t for t in row["labels"] if t != IGNORE]


def test_labels_cover_exactly_the_completion_and_eos(tok: Any) -> None:
    ex = Example(1, "Q: What does json.dumps do?\nA:", " Briefly: Serialize obj. (dumps)")
    enc = encode([ex], tok, max_len=128)
    (row,) = enc.rows
    assert tok.decode(labelled(row)) == ex.completion + tok.eos_token
    n_prompt = row["labels"].index(labelled(row)[0])
    assert tok.decode(row["input_ids"][:n_prompt]) == ex.prompt
    assert enc.boundary_merges == [] and enc.lines == [1]


def test_a_bpe_merge_across_the_boundary_is_detected_and_never_shifts_the_mask(tok: Any) -> None:
    prompt, completion = "Q: What does it do?\nA: ", "Return the value."
    joint = tok(prompt + completion)["input_ids"]
    alone = tok(prompt)["input_ids"]
    # the premise: " Return" is one token when joined, so the prompt is not a prefix of the joint ids
    assert joint[: len(alone)] != alone
    enc = encode([Example(7, prompt, completion)], tok, max_len=128)
    assert enc.boundary_merges == [7]
    (row,) = enc.rows
    assert tok.decode(labelled(row)) == completion + tok.eos_token  # not " Return", not "eturn"
    assert tok.decode(row["input_ids"]) == prompt + completion + tok.eos_token
    assert any("merges with the completion" in note and "lines 7" in note for note in enc.notes())


def test_completions_emptied_by_truncation_are_skipped_and_counted(tok: Any) -> None:
    long_prompt = "Q: " + "word " * 60 + "\nA:"
    short = Example(1, "Q: x?\nA:", " Briefly: yes. (x)")
    starved = Example(2, long_prompt, " Briefly: no. (y)")
    enc = encode([short, starved], tok, max_len=12)
    assert enc.lines == [1] and enc.empty_after_truncation == [2]
    assert len(enc.rows[0]["input_ids"]) <= 12
    assert any("1 example(s) skipped" in n and "lines 2" in n for n in enc.notes())


def test_chat_messages_train_on_the_rendered_assistant_turn_only(tok: Any) -> None:
    prompt = [{"role": "user", "content": "Hi?"}]
    completion = [{"role": "assistant", "content": "Hello there."}]
    (row,) = encode([Example(1, prompt, completion)], tok, max_len=128).rows
    assert tok.decode(labelled(row)).startswith("Hello there.<|eos|>")
    assert "Hi?" not in tok.decode(labelled(row))


def test_the_collator_pads_right_and_masks_padding_out_of_the_loss(tok: Any) -> None:
    rows = encode([Example(1, "a", " b"), Example(2, "a longer prompt", " and completion")], tok, 64).rows
    batch = Collator(tok.pad_token_id)(rows)
    short = len(rows[0]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0, :short].all() and not batch["attention_mask"][0, short:].any()
    assert (batch["labels"][0, short:] == IGNORE).all()
    assert (batch["input_ids"][0, short:] == tok.pad_token_id).all()
