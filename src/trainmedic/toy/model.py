"""A tiny Llama: the real architecture (RoPE, RMSNorm, SwiGLU, grouped-query attention), toy sizes.

About 0.85 M parameters, a third of them the tied embedding. It has the module names LoRA targets
(`q_proj`, `k_proj`, `v_proj`, `o_proj`, ...) and the code paths a real Llama fine-tune goes through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

HIDDEN = 128
LAYERS = 4
HEADS = 4
KV_HEADS = 2  # grouped-query attention, like most current models
INTERMEDIATE = 256
MAX_POSITIONS = 512


def toy_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
        use_cache=False,
    )


def build_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised model; the same seed gives the same weights."""
    import torch
    from transformers import LlamaForCausalLM

    config = toy_config(tokenizer)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()
