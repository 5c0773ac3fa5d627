"""How PEFT names LoRA tensors and scales their updates, read from names and adapter_config.json.

PEFT saves `<module>.lora_A.weight` (`r x in`) and `<module>.lora_B.weight` (`out x r`) per
adapted module (`lora_embedding_A`/`_B` for embeddings, no `.weight`), dropping the adapter
name `.default` on save, and applies `scale * B @ A` with `scale = lora_alpha / r`
(`lora_alpha / sqrt(r)` under rsLoRA), where `r` and `lora_alpha` may be overridden per module
by `rank_pattern` / `alpha_pattern`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

# Transformer blocks are `.layers.N.` in Llama-style models; `.h.N.` (GPT-2), `.layer.N.` (BERT)
# and `.blocks.N.` name the same thing elsewhere.
_LAYER = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")
_FACTOR = re.compile(r"lora_(?:embedding_)?([AB])")
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraPair:
    """One adapted module: the names of its A and B tensors (None when missing from the file)."""

    module: str  # as in the file, e.g. base_model.model.model.layers.0.self_attn.q_proj
    adapter: str  # PEFT adapter name ("" when dropped on save, as for "default")
    a: str | None = None
    b: str | None = None

    @cached_property
    def layer(self) -> int | None:
        match = _LAYER.search(self.module + ".")
        return int(match.group(1)) if match else None

    @cached_property
    def kind(self) -> str:
        """The module's role, shared by the same projection in every layer (e.g. self_attn.q_proj)."""
        match = _LAYER.search(self.module + ".")
        base = self.module[match.end() :] if match else short_name(self.module)
        return f"{base}[{self.adapter}]" if self.adapter else base

    @property
    def label(self) -> str:
        """A short name for messages: `layer 3 self_attn.q_proj`."""
        layer = self.layer
        return f"layer {layer} {self.kind}" if layer is not None else self.kind


def short_name(name: str) -> str:
    """A tensor or module name without PEFT's `base_model.model.` wrapper prefix."""
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


def lora_pairs(names: Iterable[str]) -> list[LoraPair]:
    """Group LoRA factor tensors by module; non-LoRA tensors (and LoRA biases) are ignored."""
    pairs: dict[tuple[str, str], LoraPair] = {}
    for name in names:
        if "lora_" not in name:
            continue
        parts = name.split(".")
        idx = next((i for i, p in enumerate(parts) if _FACTOR.fullmatch(p)), None)
        if idx is None or idx == 0:
            continue
        rest = parts[idx + 1 :]
        if rest and rest[-1] == "weight":
            rest = rest[:-1]
        if len(rest) > 1 or "bias" in rest:
            continue
        module, adapter = ".".join(parts[:idx]), (rest[0] if rest else "")
        if adapter == "default":
            adapter = ""
        pair = pairs.setdefault((module, adapter), LoraPair(module, adapter))
        match = _FACTOR.fullmatch(parts[idx])
        assert match is not None
        if match.group(1) == "A":
            pair.a = name
        else:
            pair.b = name
    return sorted(pairs.values(), key=lambda p: (p.layer is None, p.layer or 0, p.kind, p.module))


@dataclass(frozen=True)
class LoraScaling:
    """The factor PEFT multiplies `B @ A` by, per module, and where it came from."""

    default_scale: float
    note: str
    config: dict[str, Any] | None = None

    def scale(self, module: str) -> float:
        cfg = self.config
        if cfg is None:
            return self.default_scale
        r = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
        if r <= 0:
            return self.default_scale
        return alpha / math.sqrt(r) if cfg.get("use_rslora") is True else alpha / r


def lora_scaling(config: dict[str, Any] | None) -> LoraScaling:
    """Read `r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`, `use_rslora` from adapter_config.json."""
    if config is None:
        return LoraScaling(1.0, "no adapter_config.json: scale 1, norms are of B @ A")
    r, alpha = _number(config.get("r")), _number(config.get("lora_alpha"))
    if r is None or alpha is None or r <= 0:
        got = f"r={config.get('r')!r}, lora_alpha={config.get('lora_alpha')!r}"
        return LoraScaling(1.0, f"adapter_config.json has no usable r / lora_alpha ({got}): scale 1")
    rslora = config.get("use_rslora") is True
    patterns = [k for k in ("rank_pattern", "alpha_pattern") if isinstance(config.get(k), dict) and config[k]]
    formula = "lora_alpha / sqrt(r) (rsLoRA)" if rslora else "lora_alpha / r"
    note = f"scale = {formula} from adapter_config.json: lora_alpha={alpha}, r={r}"
    if patterns:
        note += " with " + " and ".join(patterns)
    return LoraScaling(alpha / math.sqrt(r) if rslora else alpha / r, note, config)


def _pattern_value(patterns: Any, module: str, default: float) -> float:
    """PEFT's rule: the first pattern key matching the end of the module name (regex) wins."""
    if not isinstance(patterns, dict):
        return default
    for key, value in patterns.items():
        if _number(value) is None:
            continue
        try:
            hit = re.match(rf"(.*\.)?({key})$", module) is not None
        except re.error:
            hit = module == key or module.endswith("." + key)
        if hit:
            return float(value)
    return default


def _number(x: Any) -> float | None:
    if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None
