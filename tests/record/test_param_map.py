"""Optimizer id -> parameter name: derived from module order, verified by shape, never guessed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainmedic.record.param_map import (
    apply_param_names,
    layer_index,
    map_param_names,
    module_order_key,
)
from trainmedic.run import AdapterWeights, OptimizerState, ParamMoments, TensorInfo

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
REAL_VERSION = SHARED / "dlm_stores/healthy/adapter/versions/v0001"
P = "base_model.model.model"

Shape = tuple[int, ...]


def llama_lora(
    layers: int,
    *,
    hidden: int = 128,
    kv: int = 64,
    rank: int = 8,
    mlp: bool = False,
    names: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
) -> list[tuple[str, Shape]]:
    """(name, shape) in the model's module order: layers ascending, attention then MLP, A then B."""
    out: list[tuple[str, Shape]] = []
    widths = dict(zip(names, (hidden, kv, kv, hidden), strict=True))
    for layer in range(layers):
        for mod in names:
            out.append((f"{P}.layers.{layer}.self_attn.{mod}.lora_A.weight", (rank, hidden)))
            out.append((f"{P}.layers.{layer}.self_attn.{mod}.lora_B.weight", (widths[mod], rank)))
        if mlp:
            for mod, (i, o) in {
                "gate_proj": (hidden, 256),
                "up_proj": (hidden, 256),
                "down_proj": (256, hidden),
            }.items():
                out.append((f"{P}.layers.{layer}.mlp.{mod}.lora_A.weight", (rank, i)))
                out.append((f"{P}.layers.{layer}.mlp.{mod}.lora_B.weight", (o, rank)))
    return out


def moments(tensors: list[tuple[str, Shape]], groups: list[int] | None = None) -> list[ParamMoments]:
    groups = groups or [0] * len(tensors)
    return [
        ParamMoments(id=i, group=g, shape=s, state_keys=("step", "exp_avg", "exp_avg_sq"))
        for i, ((_, s), g) in enumerate(zip(tensors, groups, strict=True))
    ]


def header(tensors: list[tuple[str, Shape]]) -> dict[str, Shape]:
    """Shapes keyed like a safetensors header: alphabetical."""
    return {n: s for n, s in sorted(tensors)}


def test_layer_index_reads_the_block_number() -> None:
    assert layer_index(f"{P}.layers.12.self_attn.q_proj.lora_A.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.lora_B.weight") == 3
    assert layer_index(f"{P}.embed_tokens.weight") is None
    assert layer_index("base_model.model.lm_head.weight") is None


def test_module_order_sorts_layers_numerically_and_modules_by_definition() -> None:
    names = [n for n, _ in llama_lora(12, mlp=True)]
    names += [f"{P}.embed_tokens.weight", f"{P}.norm.weight", "base_model.model.lm_head.weight"]
    expected = [
        f"{P}.embed_tokens.weight",
        *names[:-3],
        f"{P}.norm.weight",
        "base_model.model.lm_head.weight",
    ]
    assert sorted(sorted(names), key=module_order_key) == expected
    assert sorted(names) != expected  # alphabetical puts layers.10 before layers.2 and mlp before self_attn


def test_alphabetical_keys_are_mapped_to_module_order_ids_with_layers_past_ten() -> None:
    tensors = llama_lora(12, mlp=True)
    m = map_param_names(moments(tensors), header(tensors))
    assert m.verified and m.note.startswith("verified: 168 ids matched by shape in module order")
    assert [m.names[i] for i in range(len(tensors))] == [n for n, _ in tensors]
    assert m.names[14 * 10] == f"{P}.layers.10.self_attn.q_proj.lora_A.weight"


def test_hf_decay_then_no_decay_groups_with_modules_to_save() -> None:
    tensors = [
        *llama_lora(3),
        (f"{P}.layers.0.input_layernorm.weight", (128,)),
        (f"{P}.norm.weight", (128,)),
        ("base_model.model.lm_head.weight", (500, 128)),
    ]
    lora = tensors[:24]
    decay = [*lora, tensors[26]]  # lm_head decays; norms don't
    no_decay = [tensors[24], tensors[25]]
    ordered = decay + no_decay
    m = map_param_names(moments(ordered, [0] * 25 + [1] * 2), header(tensors))
    assert m.verified and "weight decay, then no decay" in m.note
    assert [m.names[i] for i in range(27)] == [n for n, _ in ordered]


def test_count_mismatch_is_unverified_with_both_counts() -> None:
    tensors = llama_lora(6)
    m = map_param_names(moments(tensors), header(tensors[:-2]))
    assert not m.verified and m.names == {}
    assert "48 optimizer tensors vs 46 adapter tensors" in m.note


def test_shape_ambiguous_order_is_reported_not_guessed() -> None:
    # unknown module names sort alphabetically (wk, wo, wq, wv) while the model ran wq, wk, wv, wo:
    # the GQA shapes break that order, and equal A shapes leave no unique alternative
    tensors = llama_lora(2, names=("wq", "wk", "wv", "wo"))
    m = map_param_names(moments(tensors), header(tensors))
    assert not m.verified and m.names == {}
    assert "order not provable" in m.note and "layer 0" in m.note and "id 1 has shape" in m.note


def test_unique_shapes_within_each_layer_prove_an_unusual_order() -> None:
    tensors = [
        (f"{P}.layers.{layer}.blk.{mod}.weight", shape)
        for layer in range(11)
        for mod, shape in (("zeta", (3, 4)), ("alpha", (5,)), ("mid", (4, 4)))
    ]
    m = map_param_names(moments(tensors), header(tensors))
    assert m.verified and "unique shapes within each layer" in m.note
    assert [m.names[i] for i in range(len(tensors))] == [n for n, _ in tensors]


def test_inconsistent_shapes_are_unverified() -> None:
    tensors = llama_lora(2)
    wrong = [(n, (s[0] + 1, s[1])) for n, s in tensors]
    m = map_param_names(moments(wrong), header(tensors))
    assert not m.verified and "do not match" in m.note


def test_ids_without_state_are_placed_by_order_between_checked_ones() -> None:
    tensors = llama_lora(2)
    params = moments(tensors)
    params[3] = ParamMoments(id=3, group=0, shape=())
    m = map_param_names(params, header(tensors))
    assert m.verified and "id 3 held no state" in m.note and m.names[3] == tensors[3][0]


def test_apply_param_names_without_adapter_leaves_names_unset() -> None:
    tensors = llama_lora(2)
    state = OptimizerState(source=Path("x.pt"), params=moments(tensors))
    apply_param_names(state, None)
    assert not state.mapping_verified and "no adapter file" in state.mapping_note
    assert all(p.name is None for p in state.params)
    adapter = AdapterWeights(
        source=Path("a.safetensors"),
        header={n: TensorInfo(n, "F32", s, 0, 0) for n, s in header(tensors).items()},
        arrays={},
    )
    apply_param_names(state, adapter)
    assert state.mapping_verified and [p.name for p in state.params] == [n for n, _ in tensors]


@settings(max_examples=40, deadline=None)
@given(
    layers=st.integers(1, 24),
    kv=st.sampled_from([32, 64, 128]),
    rank=st.sampled_from([4, 8, 16]),
    mlp=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_llama_like_lora_maps_back_exactly(layers: int, kv: int, rank: int, mlp: bool, seed: int) -> None:
    tensors = llama_lora(layers, kv=kv, rank=rank, mlp=mlp)
    shuffled = dict(header(tensors))
    keys = list(shuffled)
    np.random.default_rng(seed).shuffle(keys)
    m = map_param_names(moments(tensors), {k: shuffled[k] for k in keys})
    assert m.verified, m.note
    assert [m.names[i] for i in range(len(tensors))] == [n for n, _ in tensors]


def test_real_dlm_store_mapping_verifies() -> None:
    if not (REAL_VERSION / "training_state.pt").exists():
        pytest.skip("shared dlm stores not present")
    torchfile = pytest.importorskip("trainmedic.record.torchfile")
    from trainmedic.record.optimizer import optimizer_state_from
    from trainmedic.record.safetensors import read_safetensors

    adapter = read_safetensors(REAL_VERSION / "adapter_model.safetensors")
    path = REAL_VERSION / "training_state.pt"
    state = optimizer_state_from(torchfile.load_torch_file(path), path, adapter=adapter)
    assert state.mapping_verified, state.mapping_note
    assert state.mapping_note.startswith("verified: 48 ids matched by shape in module order")
    names = [p.name or "" for p in state.params]
    assert names[:3] == [
        f"{P}.layers.0.self_attn.q_proj.lora_A.weight",
        f"{P}.layers.0.self_attn.q_proj.lora_B.weight",
        f"{P}.layers.0.self_attn.k_proj.lora_A.weight",
    ]
    assert names[-1] == f"{P}.layers.5.self_attn.o_proj.lora_B.weight"
    assert state.global_step == 150 and state.params[3].shape == (64, 8)
