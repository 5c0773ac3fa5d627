"""The documented recipe: three consecutive rounds, each stacking the earlier adapters as history."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trainmedic.heal import heal_round


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
def test_three_stacked_rounds_anchor_every_round_to_the_original(
    base_dir: Path, tmp_path: Path, records: Any, fast: dict[str, Any]
) -> None:
    from safetensors import safe_open

    from trainmedic.heal.measure import kl_to_original, load_stacked

    rounds: list[Path] = []
    for k in range(3):
        out = tmp_path / f"round-{k + 1}"
        result = heal_round(base_dir, records(16, 16 * k), out, history=rounds, **fast)
        assert result.ok, [f.message for f in result.expectations]
        first = result.rows[0].divergence
        # round 1 starts at the original (its new LoRA is zero); later rounds start at base + history,
        # which the reference (every adapter off) sees as already drifted
        assert first == 0.0 if k == 0 else first > 0.0
        saved = json.loads((out / "trainmedic-heal.json").read_text())
        assert saved["history"] == [str(r) for r in rounds]
        rounds.append(out)

    def keys(path: Path) -> set[str]:
        with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
            return set(f.keys())

    assert keys(rounds[0]) == keys(rounds[2])  # each round saves its own adapter only, not its history
    prompts = [r["prompt"] for r in records(8, 100)]
    drift = [kl_to_original(*load_stacked(base_dir, rounds[: k + 1]), prompts) for k in range(3)]
    assert all(d > 0.0 for d in drift) and len(set(drift)) == 3  # every stacked adapter is applied
