"""Token ids and completion-only labels that provably line up with the completion text.

The completion mask is a token index: everything from the first completion token on is trained.
If the prompt's tokens are not a prefix of the prompt+completion tokens (a BPE merge across the
boundary, e.g. a prompt ending in a space), cutting the joint ids at `len(prompt_ids)` would move
the mask by a token, silently training on a prompt token or skipping a completion one. So each
example is tokenized jointly only when the prompt is a clean prefix; otherwise prompt and
completion are tokenized separately and the ids concatenated, and the example's line is
reported. Either way the labelled ids decode to exactly the completion (plus EOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainmedic.heal.data import Example
from trainmedic.heal.errors import HealError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE = -100  # the label of a token that is not trained (prompt, padding)


@dataclass
class Encoded:
    """The tokenized round data and what happened on the way."""

    rows: list[dict[str, list[int]]] = field(default_factory=list)  # input_ids, labels
    lines: list[int] = field(default_factory=list)  # the kept.jsonl line of each row
    empty_after_truncation: list[int] = field(default_factory=list)  # lines skipped: nothing left to learn
    truncated: list[int] = field(default_factory=list)  # lines cut at max_len that kept some completion
    boundary_merges: list[int] = field(default_factory=list)  # lines tokenized in two parts (see above)

    def notes(self) -> list[str]:
        """What the user should know about the data, one line each."""
        out = []
        if self.empty_after_truncation:
            out.append(
                f"{len(self.empty_after_truncation)} example(s) skipped: no completion token left after "
                f"truncation to max_len (lines {_lines(self.empty_after_truncation)})"
            )
        if self.truncated:
            out.append(f"{len(self.truncated)} completion(s) cut at max_len (lines {_lines(self.truncated)})")
        if self.boundary_merges:
            out.append(
                f"{len(self.boundary_merges)} example(s) whose prompt merges with the completion into one "
                f"token when tokenized together (lines {_lines(self.boundary_merges)}): tokenized in two "
                "parts so the mask stays exact; a prompt that ends in a space or mid-word causes this"
            )
        return out


def _lines(lines: Sequence[int], shown: int = 8) -> str:
    head = ", ".join(str(n) for n in lines[:shown])
    return head + (", ..." if len(lines) > shown else "")


def encode(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_len: int, *, source: str = "data"
) -> Encoded:
    """Tokenize `examples` into ids and completion-only labels, at most `max_len` tokens each."""
    out = Encoded()
    eos = tokenizer.eos_token_id
    for ex in examples:
        prompt_text, completion_text, special = _texts(ex, tokenizer, source)
        prompt_ids = _ids(tokenizer, prompt_text, special)
        joint = _ids(tokenizer, prompt_text + completion_text, special)
        if joint[: len(prompt_ids)] == prompt_ids:
            ids = joint
        else:
            ids = prompt_ids + _ids(tokenizer, completion_text, False)
            out.boundary_merges.append(ex.line)
        if not ex.is_chat and eos is not None and ids[-1] != eos:
            ids.append(eos)  # teach the round's model to stop; a chat template writes its own end
        start = len(prompt_ids)
        full = len(ids)
        ids = ids[:max_len]
        # a label at position 0 has no earlier token to be predicted from
        if len(ids) <= max(start, 1):
            out.empty_after_truncation.append(ex.line)
            continue
        if len(ids) < full:
            out.truncated.append(ex.line)
        out.rows.append({"input_ids": ids, "labels": [IGNORE] * start + ids[start:]})
        out.lines.append(ex.line)
    return out


def _texts(ex: Example, tokenizer: PreTrainedTokenizerBase, source: str) -> tuple[str, str, bool]:
    """(prompt text, completion text, add special tokens?) for one example."""
    if isinstance(ex.prompt, str) and isinstance(ex.completion, str):
        return ex.prompt, ex.completion, True
    if not getattr(tokenizer, "chat_template", None):
        raise HealError(
            "chat messages need a tokenizer with a chat template, and this base's has none; "
            "write plain 'prompt'/'completion' strings instead",
            path=source,
            line=ex.line,
        )
    assert isinstance(ex.prompt, list) and isinstance(ex.completion, list)
    render = tokenizer.apply_chat_template
    prompt = str(render(ex.prompt, tokenize=False, add_generation_prompt=True))
    full = str(render(ex.prompt + ex.completion, tokenize=False))
    if not full.startswith(prompt):
        raise HealError(
            "the chat template does not render the prompt (with its generation prompt) as a prefix of "
            "the whole chat, so the completion cannot be located",
            path=source,
            line=ex.line,
        )
    return prompt, full[len(prompt) :], False  # the rendered template carries its own BOS


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


class Collator:
    """Right-pads a batch: pad ids, attention mask 0, labels IGNORE on the padding."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.tensor(row["labels"], dtype=torch.long)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
