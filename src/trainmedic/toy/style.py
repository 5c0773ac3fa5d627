"""Kept data for a heal round on the toy base: a new answer style, with noise a filter missed.

Prompts ask about a standard-library name (`Q: What does json.dumps do?\\nA:`). Clean completions
answer in one fixed frame the toy base never saw in pre-training (it read raw docstrings):

    " Briefly: <the docstring's first sentence> (dumps)"

so a round has a style to learn, built from prose the base already models. About a fifth of the
kept completions are incoherent instead: uniformly random token strings, the samples a real
filter lets slip through. Held-out sets (other names) measure what a round learned: NLL of clean
completions in the style, NLL of fresh incoherent strings, and drift on held-out prompts.

python -m trainmedic.toy.style OUT.jsonl   writes a kept.jsonl (the shipped example is one).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainmedic.toy.corpus import Doc
from trainmedic.toy.data import _docs, question, summary

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

INCOHERENT_FRACTION = 0.2
FIRST_ORDINARY_ID = 6  # ids below are the toy tokenizer's special tokens (pad, bos, eos, roles)
NOISE_TOKENS = (12, 28)  # like the clean completions' length in tokens


def styled(doc: Doc) -> str:
    """The target style: a fixed frame around the first sentence, the name repeated at the end."""
    return f" Briefly: {summary(doc.text)} ({doc.name})"


def noise(tokenizer: PreTrainedTokenizerBase, rng: random.Random) -> str:
    """A string of uniformly random ordinary tokens: fluent to no one, the original model included."""
    n = rng.randint(*NOISE_TOKENS)
    ids = [rng.randrange(FIRST_ORDINARY_ID, len(tokenizer)) for _ in range(n)]
    text = str(tokenizer.decode(ids))
    return " " + text.strip() if text.strip() else " ?"


@dataclass(frozen=True)
class StyleSets:
    """Kept examples (with noise) for one or more rounds, and the held-out sets that measure them."""

    rounds: list[list[dict[str, str]]]  # the kept examples of each round, on names no other set uses
    heldout_clean: list[dict[str, str]]
    heldout_incoherent: list[dict[str, str]]

    @property
    def kept(self) -> list[dict[str, str]]:
        return self.rounds[0]

    @property
    def heldout_prompts(self) -> list[str]:
        return [r["prompt"] for r in self.heldout_clean]


def style_sets(
    tokenizer: PreTrainedTokenizerBase,
    *,
    n_kept: int = 100,
    n_heldout: int = 64,
    rounds: int = 1,
    incoherent_fraction: float = INCOHERENT_FRACTION,
    seed: int = 0,
) -> StyleSets:
    """Held-out sets and `rounds` kept sets, all on disjoint names; the same seed, the same sets."""
    if n_kept < 1 or n_heldout < 1 or rounds < 1 or not 0 <= incoherent_fraction < 1:
        raise ValueError(
            "style_sets needs n_kept, n_heldout and rounds >= 1 and 0 <= incoherent_fraction < 1"
        )
    docs = _docs(seed)
    need = n_heldout + rounds * n_kept
    if need > len(docs):
        raise ValueError(f"style_sets: only {len(docs)} documented names, asked for {need}")
    rng = random.Random(seed)
    held_docs = docs[:n_heldout]
    kept = [
        _kept(docs[n_heldout + r * n_kept :][:n_kept], tokenizer, rng, incoherent_fraction)
        for r in range(rounds)
    ]
    clean = [{"prompt": question(d), "completion": styled(d)} for d in held_docs]
    incoherent = [{"prompt": question(d), "completion": noise(tokenizer, rng)} for d in held_docs]
    return StyleSets(kept, clean, incoherent)


def _kept(
    docs: list[Doc], tokenizer: PreTrainedTokenizerBase, rng: random.Random, fraction: float
) -> list[dict[str, str]]:
    noisy = set(rng.sample(range(len(docs)), round(fraction * len(docs))))
    return [
        {"prompt": question(d), "completion": noise(tokenizer, rng) if i in noisy else styled(d)}
        for i, d in enumerate(docs)
    ]


def write_jsonl(rows: list[dict[str, str]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m trainmedic.toy.style OUT.jsonl", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    from trainmedic.toy.base import toy_base

    tokenizer = AutoTokenizer.from_pretrained(toy_base(), local_files_only=True)
    print(f"wrote {write_jsonl(style_sets(tokenizer).kept, Path(args[0]))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
