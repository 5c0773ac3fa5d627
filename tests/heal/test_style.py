"""The toy kept data: a consistent new style, a fifth of noise, held-out sets on other names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trainmedic.heal
from trainmedic.heal.data import read_kept
from trainmedic.toy.style import style_sets

SHIPPED = Path(trainmedic.heal.__file__).parent / "examples" / "kept.jsonl"


def name_of(prompt: str) -> str:
    return prompt.split("What does ", 1)[1].split(" do?", 1)[0]


def test_rounds_and_held_out_sets_use_disjoint_names_and_a_fifth_is_noise(tok: Any) -> None:
    sets = style_sets(tok, n_kept=50, n_heldout=20, rounds=2, seed=3)
    names = [{name_of(r["prompt"]) for r in rows} for rows in (*sets.rounds, sets.heldout_clean)]
    assert [len(n) for n in names] == [50, 50, 20]
    assert not (names[0] & names[1]) and not ((names[0] | names[1]) & names[2])
    for rows in sets.rounds:
        styled = [r for r in rows if r["completion"].startswith(" Briefly: ")]
        assert len(styled) == 40
        assert all(r["completion"].endswith(f"({name_of(r['prompt']).rsplit('.', 1)[-1]})") for r in styled)
    assert [r["prompt"] for r in sets.heldout_incoherent] == sets.heldout_prompts
    assert not any(r["completion"].startswith(" Briefly: ") for r in sets.heldout_incoherent)
    again = style_sets(tok, n_kept=50, n_heldout=20, rounds=2, seed=3)
    assert again == sets


def test_the_shipped_example_reads_cleanly() -> None:
    examples = read_kept(SHIPPED)
    assert len(examples) == 100
    assert sum(str(e.completion).startswith(" Briefly: ") for e in examples) == 80
