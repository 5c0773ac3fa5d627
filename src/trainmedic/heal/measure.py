"""Measuring rounds after the fact: stacked adapters on the base, NLL of held-out completions, and
the KL of the stacked model to the original on held-out prompts.

These are the numbers the benchmark compares (and what a user checks before keeping a round):
did it learn the target (clean NLL falls), did it learn the noise (incoherent NLL falls), and how
far did it move from the original where it was not asked to move (KL on prompts).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from trainmedic.heal.data import from_records
from trainmedic.heal.loss import per_example_kl, shift
from trainmedic.heal.tokens import Collator, encode

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

BATCH = 16


def load_stacked(
    base: str | Path, adapters: Sequence[str | Path]
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The base with every adapter in `adapters` applied at once (frozen, eval mode)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not adapters:
        raise ValueError("load_stacked needs at least one adapter directory")
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype="float32")
    names = [f"round_{i}" for i in range(len(adapters))]
    with warnings.catch_warnings():  # PEFT asks a deprecated transformers property; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        stacked = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name=names[0])
        for name, path in zip(names[1:], adapters[1:], strict=True):
            stacked.load_adapter(str(path), adapter_name=name)
    cast(Any, stacked.base_model).set_adapter(names, inference_mode=True)
    stacked.eval()
    return stacked, tokenizer


def completion_nll(
    model: Any, tokenizer: PreTrainedTokenizerBase, records: Sequence[Mapping[str, Any]], max_len: int = 256
) -> float:
    """Mean NLL per completion token (EOS included) of `records` (kept.jsonl-shaped)."""
    import torch
    import torch.nn.functional as F

    rows = encode(from_records(records), tokenizer, max_len).rows
    collate = Collator(_pad_id(tokenizer))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), BATCH):
            batch = collate(rows[i : i + BATCH])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits, targets, mask = shift(logits, batch["labels"])
            nll = F.cross_entropy(
                logits.float().transpose(1, 2), targets.masked_fill(~mask, 0), reduction="none"
            )
            total += float((nll * mask).sum())
            count += int(mask.sum())
    return total / max(count, 1)


def kl_to_original(model: PeftModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> float:
    """Mean KL(current || original) per next-token position over `texts`, every adapter off for the
    original. Token-weighted, so long and short prompts count by their positions."""
    import torch

    collate = Collator(_pad_id(tokenizer))
    rows = [_all_positions(list(tokenizer(t)["input_ids"])) for t in texts]
    rows = [r for r in rows if len(r["input_ids"]) >= 2]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), BATCH):
            batch = collate(rows[i : i + BATCH])
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            logits = model(**inputs).logits
            with cast(Any, model).disable_adapter():
                ref = model(**inputs).logits
            shifted, _, mask = shift(logits, batch["labels"])
            n = mask.sum(-1)
            total += float((per_example_kl(shifted, ref[:, :-1], mask, "kl_rev") * n).sum())
            count += int(n.sum())
    return total / max(count, 1)


def _all_positions(ids: list[int]) -> dict[str, list[int]]:
    return {"input_ids": ids, "labels": list(ids)}


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return int(pad)
