"""Model shapes for synthetic LoRA artifacts, named after the real models they imitate."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """Just enough of a Llama-style model to lay out a LoRA adapter and its optimizer state."""

    name: str
    layers: int
    hidden: int
    kv_dim: int  # k/v projection output size (GQA makes it smaller than hidden)
    intermediate: int
    modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def io(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection."""
        h, kv, ff = self.hidden, self.kv_dim, self.intermediate
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, ff),
            "up_proj": (h, ff),
            "down_proj": (ff, h),
        }[module]

    def prefix(self, module: str) -> str:
        return "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The 6-layer GQA model of the real dlm stores in shared/ (hidden 128, 4 query / 2 kv heads).
TINY = ModelShape("tiny-llama", layers=6, hidden=128, kv_dim=64, intermediate=256)
SMOLLM2_135M = ModelShape("smollm2-135m", layers=30, hidden=576, kv_dim=192, intermediate=1536)
SMOLLM2_360M = ModelShape("smollm2-360m", layers=32, hidden=960, kv_dim=320, intermediate=2560)
