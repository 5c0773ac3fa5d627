"""The round table and its checked expectations, for the terminal.

A long round is thinned to about MAX_ROWS evenly spaced steps (the last always shown); every
step is in the round's `trainmedic-heal.json`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trainmedic.findings import Verdict

if TYPE_CHECKING:
    from trainmedic.heal.expectations import StepRow
    from trainmedic.heal.round import HealResult

MAX_ROWS = 30
_STYLE = {Verdict.PASS: "green", Verdict.WARN: "yellow", Verdict.FAIL: "red", Verdict.SKIP: "dim"}


def shown_rows(rows: list[StepRow], limit: int = MAX_ROWS) -> list[StepRow]:
    """Every step when there are few; otherwise evenly spaced ones, the last always included."""
    if len(rows) <= limit:
        return rows
    every = math.ceil(len(rows) / limit)
    picked = rows[::every]
    return picked if picked[-1] is rows[-1] else [*picked, rows[-1]]


def render(result: HealResult, console: Console) -> None:
    cfg = result.config
    anchor = "" if cfg.divergence in ("nll",) else f", lam {cfg.lam:g}"
    if cfg.divergence in ("kl_fwd", "kl_rev"):
        anchor += f", tau {cfg.tau:g}"
    console.print(
        f"[bold]trainmedic heal[/] {escape(str(result.out))}  divergence {cfg.divergence}{anchor}, "
        f"{result.examples} example(s), {len(result.rows)} step(s), {result.seconds:.1f} s"
    )
    rows = shown_rows(result.rows)
    table = Table(box=None, header_style="bold")
    for name in ("step", "nll", "divergence", "loss", "grad norm", "barrier"):
        table.add_column(name, justify="right")
    for r in rows:
        norm = "-" if r.grad_norm is None else f"{r.grad_norm:.4g}"
        table.add_row(
            str(r.step), f"{r.nll:.4f}", f"{r.divergence:.4f}", f"{r.loss:.4f}", norm, f"{r.fired:.0%}"
        )
    console.print(table)
    if len(rows) < len(result.rows):
        console.print(f"[dim]({len(rows)} of {len(result.rows)} steps shown; all in trainmedic-heal.json)[/]")
    heal = result.heal_nll
    console.print(f"heal_nll {heal:.4f} (mean nll of the last 5 steps)" if heal is not None else "heal_nll -")
    for f in result.expectations:
        style = _STYLE.get(f.verdict, "")
        console.print(f"  [{style}]{f.verdict.value.upper():5}[/] {f.name}: {escape(f.message)}")
    for note in result.notes:
        console.print(f"  [dim]note:[/] {escape(note)}")
    verdict = "ok" if result.ok else "FAILED an expectation"
    where = escape(str(result.out))
    console.print(f"=> {verdict}; adapter in {where} (loads with peft.PeftModel.from_pretrained)")
