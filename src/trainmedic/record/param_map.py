"""Which optimizer id is which parameter: derived from module order, then verified by shape.

PyTorch numbers optimizer state by position: param group 0's parameters first, then group 1's,
each in the order they were handed to the optimizer (the model's `named_parameters()` order of
trainable parameters). Safetensors keys are sorted alphabetically (`layers.10` before `layers.2`,
`mlp.*` before `self_attn.*`) and drop PEFT's `.default`, so id i is generally not the i-th key.
We rebuild the order the trainer would have used and accept it only when every id's moment shape
equals its name's shape; when that cannot be shown, names stay unset and the note says why.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from trainmedic.run import AdapterWeights, OptimizerState, ParamMoments

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")

# Position of a name component among its siblings in the usual `__init__` order of HF models and
# PEFT wrappers; only siblings are ever compared. Unknown components sort after known ones.
_RANK: dict[str, int] = {
    # wrappers and containers come before the heads that sit beside them
    **dict.fromkeys(("base_model", "model", "transformer", "gpt_neox", "language_model"), 0),
    **dict.fromkeys(("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings"), 1),
    **dict.fromkeys(("embeddings", "wpe", "embed_positions"), 2),
    **dict.fromkeys(("layers", "layer", "h", "blocks"), 5),
    **dict.fromkeys(("norm", "final_layernorm", "ln_f", "final_layer_norm"), 50),
    **dict.fromkeys(("lm_head", "embed_out", "score", "classifier"), 60),
    # inside a block: GPT-2 style pre-norms, attention, MLP, then Llama style norms
    "ln_1": 8,
    **dict.fromkeys(("self_attn", "attn", "attention", "self_attention"), 10),
    "ln_2": 15,
    **dict.fromkeys(("mlp", "feed_forward", "ffn", "block_sparse_moe"), 20),
    "input_layernorm": 30,
    "post_attention_layernorm": 31,
    # projections
    **dict.fromkeys(("q_proj", "qkv_proj", "query_key_value", "c_attn", "query", "c_fc", "fc1", "w1"), 40),
    **dict.fromkeys(("k_proj", "key"), 41),
    **dict.fromkeys(("v_proj", "value"), 42),
    **dict.fromkeys(("o_proj", "dense", "out_proj"), 43),
    **dict.fromkeys(("gate_proj", "dense_h_to_4h"), 44),
    **dict.fromkeys(("up_proj", "w3"), 45),
    **dict.fromkeys(("down_proj", "c_proj", "fc2", "w2", "dense_4h_to_h"), 46),
    # a LoRA-wrapped module: base layer (its bias), then A, B, embedding factors, DoRA magnitude
    "base_layer": 0,
    "weight": 0,
    "bias": 1,
    "lora_A": 2,
    "lora_B": 3,
    "lora_embedding_A": 4,
    "lora_embedding_B": 5,
    "lora_magnitude_vector": 6,
}
# Components PEFT has in `named_parameters()` but drops (or never has) in saved keys.
_DROPPED = frozenset({"default", "modules_to_save", "original_module"})
# Hugging Face Trainer's no-weight-decay rule (`Trainer.get_decay_parameter_names`), plus GPT-2's
# `ln_*` LayerNorm modules, which it excludes by type.
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)|(?:^|\.)ln_")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ParamMapping:
    """Result of mapping optimizer ids to tensor names; `names` is empty unless verified."""

    verified: bool
    note: str
    names: dict[int, str]


def layer_index(name: str) -> int | None:
    """Transformer block index from `.layers.N.` (also `.h.N.`, `.layer.N.`, `.blocks.N.`)."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def module_order_key(name: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key giving the usual module (definition) order; layer numbers sort numerically."""
    key = []
    for part in name.split("."):
        if part in _DROPPED:
            continue
        if part.isdigit():
            key.append((500, int(part), ""))
        else:
            key.append((_RANK.get(part, 1000), 0, part))
    return tuple(key)


def apply_param_names(state: OptimizerState, adapter: AdapterWeights | None) -> None:
    """Set each `ParamMoments.name` and the mapping flags of `state` from `adapter`'s header."""
    if adapter is None:
        state.mapping_verified = False
        state.mapping_note = "no adapter file: optimizer ids could not be mapped to parameter names"
        return
    mapping = map_param_names(state.params, {k: v.shape for k, v in adapter.header.items()})
    for p in state.params:
        p.name = mapping.names.get(p.id)
    state.mapping_verified = mapping.verified
    state.mapping_note = mapping.note


def map_param_names(params: Sequence[ParamMoments], shapes: dict[str, Shape]) -> ParamMapping:
    """Map optimizer ids to tensor names, verified by shape; unverified mappings name nothing."""
    names = [n for n in shapes if not n.startswith("__")]
    ordered = sorted(params, key=lambda p: p.id)
    if not ordered:
        return ParamMapping(False, "the optimizer state lists no parameters", {})
    if len(ordered) != len(names):
        return _unverified(f"{len(ordered)} optimizer tensors vs {len(names)} adapter tensors")
    known = [p for p in ordered if p.shape or p.state_keys]
    if not known:
        return _unverified("no optimizer id holds state, so no shape can be checked")

    failures: list[str] = []
    verified: dict[tuple[str, ...], str] = {}
    for label, candidate in _candidates(ordered, names):
        problem = _shape_mismatch(ordered, candidate, shapes)
        if problem is None:
            verified.setdefault(tuple(candidate), label)
        else:
            failures.append(f"{label}: {problem}")
    if len(verified) > 1:
        return _unverified("more than one module order fits every shape: " + ", ".join(verified.values()))
    stateless = [p.id for p in ordered if not p.shape and not p.state_keys]
    extra = f"; {_ids(stateless)} held no state and were placed by order" if stateless else ""
    if verified:
        (order, label), *_ = verified.items()
        shared = _shared_shapes(order, shapes)
        if shared:
            extra += f" (names sharing a shape within a layer, e.g. {shared}, follow the usual module order)"
        note = f"verified: {len(ordered)} ids matched by shape in {label}{extra}"
        return ParamMapping(True, note, {p.id: n for p, n in zip(ordered, order, strict=True)})
    if stateless:
        return _unverified("; ".join(failures) + f"; {_ids(stateless)} held no state to match by shape")
    return _by_unique_shapes(ordered, names, shapes, failures)


def _unverified(why: str) -> ParamMapping:
    return ParamMapping(False, f"unverified: {why}; parameter names left unset", {})


def _candidates(ordered: list[ParamMoments], names: list[str]) -> list[tuple[str, list[str]]]:
    """Orders the trainer may have used: HF's decay / no-decay split, and plain module order."""
    out: list[tuple[str, list[str]]] = []
    sizes = _group_sizes(ordered)
    if len(sizes) > 1:
        parts = _decay_split(names, sizes)
        if parts is not None:
            out.append(
                (
                    "module order per param group (weight decay, then no decay)",
                    [n for part in parts for n in part],
                )
            )
    out.append(("module order", sorted(names, key=module_order_key)))
    return out


def _group_sizes(ordered: list[ParamMoments]) -> list[int]:
    """Sizes of the runs of consecutive ids in the same group (empty groups have no ids)."""
    sizes: list[int] = []
    last: int | None = None
    for p in ordered:
        if p.group != last:
            sizes.append(0)
            last = p.group
        sizes[-1] += 1
    return sizes


def _decay_split(names: list[str], sizes: list[int]) -> list[list[str]] | None:
    if len(sizes) != 2:
        return None
    decay = sorted((n for n in names if not _NO_DECAY.search(n.lower())), key=module_order_key)
    no_decay = sorted((n for n in names if _NO_DECAY.search(n.lower())), key=module_order_key)
    return [decay, no_decay] if [len(decay), len(no_decay)] == sizes else None


def _shape_mismatch(
    ordered: list[ParamMoments], candidate: list[str], shapes: dict[str, Shape]
) -> str | None:
    for p, name in zip(ordered, candidate, strict=True):
        if (p.shape or p.state_keys) and tuple(p.shape) != tuple(shapes[name]):
            return f"id {p.id} has shape {_fmt(p.shape)} but {name} has {_fmt(shapes[name])}"
    return None


def _shared_shapes(candidate: Sequence[str], shapes: dict[str, Shape]) -> str:
    """An example of two names in one layer with equal shapes (shape can't tell them apart)."""
    seen: dict[tuple[int | None, Shape], str] = {}
    for name in candidate:
        key = (layer_index(name), tuple(shapes[name]))
        if key in seen:
            return f"{_module(seen[key])}/{_module(name)}"
        seen[key] = name
    return ""


def _by_unique_shapes(
    ordered: list[ParamMoments], names: list[str], shapes: dict[str, Shape], failures: list[str]
) -> ParamMapping:
    """Assume only layer order (ids run through blocks in order) and match by shape inside each block.

    Unique only when no two names of a block share a shape; otherwise the order is not provable.
    """
    why = "; ".join(failures)
    sizes = _group_sizes(ordered)
    parts = _decay_split(names, sizes) if len(sizes) > 1 else None
    if parts is None:
        if len(sizes) > 1:
            return _unverified(f"{why}; {len(sizes)} param groups whose members can't be told apart by name")
        parts = [sorted(names, key=module_order_key)]
    blocks: list[list[str]] = []
    for part in parts:
        start = len(blocks)
        for name in part:
            if len(blocks) > start and layer_index(blocks[-1][-1]) == layer_index(name):
                blocks[-1].append(name)
            else:
                blocks.append([name])
    result: dict[int, str] = {}
    pos = 0
    for block in blocks:
        ids = ordered[pos : pos + len(block)]
        pos += len(block)
        where = _where(block[0])
        by_shape: dict[Shape, list[str]] = defaultdict(list)
        for name in block:
            by_shape[tuple(shapes[name])].append(name)
        id_shapes = Counter(tuple(p.shape) for p in ids)
        if id_shapes != Counter({s: len(v) for s, v in by_shape.items()}):
            return _unverified(f"{why}; {where}: the ids' shapes do not match the names' shapes")
        for shape, group in by_shape.items():
            if len(group) > 1:
                fitting = [p.id for p in ids if tuple(p.shape) == shape]
                mods = "/".join(dict.fromkeys(_module(n) for n in group))
                return _unverified(
                    f"{why}; {_ids(fitting)} all fit {mods} shapes in {where}: order not provable"
                )
            fit = next(p for p in ids if tuple(p.shape) == shape)
            result[fit.id] = group[0]
    note = f"verified: {len(ordered)} ids matched by unique shapes within each layer, in layer order ({why})"
    return ParamMapping(True, note, result)


def _module(name: str) -> str:
    """The projection a tensor belongs to: `q_proj` for `...q_proj.lora_A.weight`."""
    parts = [p for p in name.split(".") if p not in _DROPPED]
    while parts and (parts[-1] in ("weight", "bias") or parts[-1].startswith("lora_")):
        parts.pop()
    return parts[-1] if parts else name


def _where(name: str) -> str:
    layer = layer_index(name)
    return f"layer {layer}" if layer is not None else "the parameters outside the layers"


def _ids(ids: Sequence[int]) -> str:
    """`id 3`, `ids 3 and 5`, `ids 0, 2, 4`: as a note names them."""
    if len(ids) == 1:
        return f"id {ids[0]}"
    if len(ids) == 2:
        return f"ids {ids[0]} and {ids[1]}"
    more = f", ... ({len(ids)} in all)" if len(ids) > 8 else ""
    return "ids " + ", ".join(str(i) for i in ids[:8]) + more


def _fmt(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
