"""The demo's heal step: a `kl_rev` round next to a plain `nll` round on the kept completions that
ship with trainmedic, then what each did to the model.

The kept file mixes completions in a new answer style with random-token strings a filter let
through. Both rounds train on it under `watch`, with the toy kit's LoRA rate (the heal default is
the rate for real models). Afterwards both adapters are measured on held-out names the rounds never
saw: the NLL of clean completions in the style (did it learn the style), the NLL of fresh
incoherent strings (did it learn the noise), and the KL to the original on held-out prompts (how
far it moved where nobody asked it to).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from trainmedic.demo.progress import Narrator
from trainmedic.findings import Verdict

if TYPE_CHECKING:
    from trainmedic.heal import HealResult

KEPT = Path(__file__).resolve().parent.parent / "heal" / "examples" / "kept.jsonl"
ROUNDS = ("nll", "kl_rev")
COMPARED = (  # (row label, Measured field, decimals)
    ("NLL, clean answers in the style (lower: learned it)", "clean_nll", 3),
    ("NLL, random-token answers (higher: resisted the noise)", "noise_nll", 3),
    ("KL to the original on prompts (lower: stayed close)", "kl", 4),
)


@dataclass(frozen=True)
class Measured:
    """One model on the held-out sets."""

    clean_nll: float
    noise_nll: float
    kl: float | None  # to the original; None for the original itself


@dataclass(frozen=True)
class HealStep:
    """The demo's heal rounds: their directories by name (for `check`) and how they compare."""

    paths: dict[str, Path]
    measured: dict[str, Measured]

    def rows(self) -> tuple[list[str], list[list[str]]]:
        """The comparison as plain strings: headers and rows (for the HTML report)."""
        headers = ["on held-out names", *self.measured]
        rows = [
            [
                label,
                *(
                    "-" if v is None else f"{v:.{digits}f}"
                    for v in (getattr(m, attr) for m in self.measured.values())
                ),
            ]
            for label, attr, digits in COMPARED
        ]
        return headers, rows


def heal_rounds(out: Path, base: Path, console: Console) -> HealStep:
    """Train both rounds into `out/heal-<divergence>`, print each and the comparison."""
    from trainmedic.heal import heal_round
    from trainmedic.toy.training import LORA_LR

    console.print(
        f"  kept completions: {KEPT.name}, shipped with trainmedic ({len(read_records(KEPT))} examples)"
    )
    results: dict[str, HealResult] = {}
    for divergence in ROUNDS:
        result = heal_round(
            base, KEPT, out / f"heal-{divergence}", divergence=divergence, lr=LORA_LR, echo=_echo(console)
        )
        results[divergence] = result
        console.print(f"  {divergence:<7} {_round_line(result)}")
    measured = _compare(base, results, console)
    return HealStep({f"heal {d}": r.out for d, r in results.items()}, measured)


def _echo(console: Console) -> Any:
    """The round's watcher lines, less its passed preflight (the watched run above showed one)."""
    narrator = Narrator(console)

    def echo(line: str) -> None:
        if not line.removeprefix("[trainmedic] ").startswith("preflight ok"):
            narrator.echo(line)

    return echo


def _round_line(result: HealResult) -> str:
    """The round in one line: its length, what it learned, its barrier, its own expectations."""
    rows = result.rows
    heal = result.heal_nll
    from trainmedic.heal.expectations import TAIL

    first = sum(r.nll for r in rows[:TAIL]) / max(len(rows[:TAIL]), 1)
    fired = sum(r.fired > 0 for r in rows)
    passed = sum(f.verdict is Verdict.PASS for f in result.expectations)
    failed = [f"{f.name} {f.verdict.value}" for f in result.expectations if f.verdict is not Verdict.PASS]
    verdicts = f"{passed} of {len(result.expectations)} expectations pass" + (
        f" ({', '.join(failed)})" if failed else ""
    )
    barrier = f", barrier pulled back on {fired} of {len(rows)} steps" if fired else ""
    nll = f"nll {first:.3f} -> {heal:.3f}" if heal is not None else "no nll"
    return f"{len(rows)} steps in {result.seconds:.1f} s, {nll}{barrier}; {verdicts}"


def comparison_table(measured: dict[str, Measured]) -> Table:
    """The heal comparison. On a narrow terminal (or 80 columns when the output is a file) the
    labels fold; a number column is never narrower than its header or values: no figure is cut."""
    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 2))
    table.add_column("  on held-out names", overflow="fold", ratio=1)
    for name in measured:
        table.add_column(name, justify="right", no_wrap=True, min_width=len(name))
    for label, attr, digits in COMPARED:
        values = [getattr(m, attr) for m in measured.values()]
        table.add_row(f"  {label}", *("-" if v is None else f"{v:.{digits}f}" for v in values))
    return table


def _compare(base: Path, results: dict[str, HealResult], console: Console) -> dict[str, Measured]:
    measured = _measure(base, {d: r.out for d, r in results.items()})
    console.print(comparison_table(measured))
    anchored, plain = measured["kl_rev round"].kl, measured["nll round"].kl
    if anchored and plain:
        if plain >= anchored:
            console.print(f"  => the KL anchor kept the round {plain / anchored:.1f}x closer to the original")
        else:
            console.print(f"  => here the kl_rev round drifted {anchored / plain:.1f}x further than nll")
    return measured


def read_records(path: Path) -> list[dict[str, Any]]:
    import json

    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _measure(base: Path, rounds: dict[str, Path]) -> dict[str, Measured]:
    from trainmedic.heal.measure import completion_nll, kl_to_original, load_stacked
    from trainmedic.toy.base import load_base
    from trainmedic.toy.style import style_sets

    model, tokenizer = load_base(base)
    sets = style_sets(tokenizer)  # the recipe that wrote the shipped kept file; its held-out names
    kept = {r["prompt"] for r in read_records(KEPT)}
    seen = [p for p in sets.heldout_prompts if p in kept]
    if seen:
        raise RuntimeError(
            f"{KEPT}: {len(seen)} held-out prompt(s) also occur in the kept data (first: {seen[0]!r}); "
            "the comparison would not be held out"
        )
    found = {
        "original": Measured(
            completion_nll(model, tokenizer, sets.heldout_clean),
            completion_nll(model, tokenizer, sets.heldout_incoherent),
            None,
        )
    }
    for divergence in sorted(rounds, key=lambda d: d != "nll"):
        stacked, tok = load_stacked(base, [rounds[divergence]])
        found[f"{divergence} round"] = Measured(
            completion_nll(stacked, tok, sets.heldout_clean),
            completion_nll(stacked, tok, sets.heldout_incoherent),
            kl_to_original(stacked, tok, sets.heldout_prompts),
        )
    return found
