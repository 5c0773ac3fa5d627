"""Small fine-tuning data sets for the toy base, in a style it has not seen.

The base was pre-trained on raw docstring prose. The fine-tuning data rewrites the same
docstrings as code stubs (`def name():` + a one-line docstring), or asks about a name and
prefers its real first sentence over the same words scrambled, so a fine-tune has something
real to learn: its loss falls clearly within a few dozen steps, and a fault that breaks the
run shows up as a run that stops learning.
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING

from trainmedic.toy.corpus import Doc, stdlib_docs

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

SUMMARY_MAX_CHARS = 160
_SENTENCE = re.compile(r"(.+?[.!?])(?:\s|$)")


def summary(text: str, max_chars: int = SUMMARY_MAX_CHARS) -> str:
    """The first sentence, cut at a word boundary so one example stays well inside the context."""
    match = _SENTENCE.match(text)
    first = match.group(1) if match else text
    if len(first) <= max_chars:
        return first
    return first[:max_chars].rsplit(" ", 1)[0] + " ..."


def _docs(seed: int) -> list[Doc]:
    """Public functions and classes whose first sentence has a few words, shuffled by `seed`."""
    docs = [
        d
        for d in stdlib_docs()
        if d.kind != "module" and not d.name.startswith("_") and len(summary(d.text).split()) >= 4
    ]
    random.Random(seed).shuffle(docs)
    return docs


def as_code(doc: Doc) -> str:
    """A stub with a one-line docstring: `def name():` (or `class Name:`) and the first sentence."""
    head = f"class {doc.name}:" if doc.kind == "class" else f"def {doc.name}():"
    return f'{head}\n    """{summary(doc.text)}"""\n'


def question(doc: Doc) -> str:
    return f"Q: What does {doc.module}.{doc.name} do?\nA:"


def lm_dataset(tokenizer: PreTrainedTokenizerBase, n: int = 512, seq_len: int = 64, seed: int = 0) -> Dataset:
    """`n` packed blocks of exactly `seq_len` tokens of docstrings-as-code, labels = input_ids.

    Packing means no padding, so `transformers.default_data_collator` batches it as is.
    """
    from datasets import Dataset

    if n < 1 or seq_len < 2:
        raise ValueError(f"lm_dataset needs n >= 1 and seq_len >= 2, got n={n}, seq_len={seq_len}")
    need = n * seq_len
    ids: list[int] = []
    for row in tokenizer([as_code(d) for d in _docs(seed)])["input_ids"]:
        ids.extend(row)
        ids.append(tokenizer.eos_token_id)
    if len(ids) < need:
        raise ValueError(
            f"lm_dataset: the corpus holds {len(ids) // seq_len} blocks of {seq_len}, asked for {n}"
        )
    blocks = [ids[i : i + seq_len] for i in range(0, need, seq_len)]
    return Dataset.from_dict(
        {"input_ids": blocks, "attention_mask": [[1] * seq_len for _ in blocks], "labels": blocks}
    )


def _take(n: int, seed: int, what: str) -> list[Doc]:
    docs = _docs(seed)
    if not 1 <= n <= len(docs):
        raise ValueError(f"{what}: n must be between 1 and {len(docs)}, got {n}")
    return docs[:n]


def prompt_completion_dataset(n: int = 64, seed: int = 0) -> Dataset:
    """`prompt`/`completion` strings: "write a stub for module.name" and the stub (see `as_code`).

    The completion repeats the name from the prompt inside a fixed frame, so supervised
    fine-tuning has structure to learn and its completion-only loss falls clearly.
    """
    from datasets import Dataset

    docs = _take(n, seed, "prompt_completion_dataset")
    return Dataset.from_dict(
        {
            "prompt": [f"Write a stub for {d.module}.{d.name}.\n" for d in docs],
            "completion": [as_code(d) for d in docs],
        }
    )


def scrambled(text: str, seed: int) -> str:
    """The same words in a shuffled order: a disfluent answer the model should learn to disprefer."""
    words = text.split()
    rng = random.Random(seed)
    out = words[:]
    rng.shuffle(out)
    if out == words:
        out = words[1:] + words[:1]
    return " ".join(out)


def preference_dataset(n: int = 64, seed: int = 0) -> Dataset:
    """`prompt`/`chosen`/`rejected`: the docstring's first sentence against the same words scrambled.

    Easy enough that DPO leaves ln 2 within about ten steps, so a run stuck at ln 2 is a real fault.
    """
    from datasets import Dataset

    docs = _take(n, seed, "preference_dataset")
    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for i, doc in enumerate(docs):
        chosen = summary(doc.text)
        rows["prompt"].append(question(doc))
        rows["chosen"].append(f" {chosen}")
        rows["rejected"].append(f" {scrambled(chosen, seed * 1_000_003 + i)}")
    return Dataset.from_dict(rows)
