"""The demo, top to bottom: base, a watched fine-tune with faults, the same fine-tune unwatched,
a heal round next to a plain one, `check` on every run, one HTML report.

Everything printed comes from the runs as they happen or from their files afterwards; the only
fixed text is the headings. The demo succeeds when the story it tells holds on this machine:
the watched run passes the gate and the unwatched one fails it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from trainmedic.demo import outdir
from trainmedic.findings import RunReport
from trainmedic.report.html import Preface

if TYPE_CHECKING:
    from trainmedic.demo.heal_step import HealStep
    from trainmedic.demo.runs import TrainedRun

FULL_STEPS = 200
FAST_STEPS = 100
FAIL_ON = "fail"


@dataclass
class DemoResult:
    """Where the demo wrote, what `check` said about each run, and how long it all took."""

    out: Path
    report_html: Path
    report_json: Path
    reports: dict[str, RunReport] = field(default_factory=dict)  # run name -> its check report
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """The watched run passes the gate and the unwatched one fails it."""
        from trainmedic.gate import gate_fails

        watched, unwatched = self.reports.get("watched"), self.reports.get("unwatched")
        if watched is None or unwatched is None:
            return False
        return not gate_fails([watched], FAIL_ON) and gate_fails([unwatched], FAIL_ON)


def _heading(console: Console, number: int, title: str) -> None:
    console.print()
    console.print(Text(f"{number}. {title}", style="bold cyan"))


def run_demo(out: Path, *, fast: bool = False, console: Console | None = None) -> DemoResult:
    """Run the whole demo into `out` (see `outdir` for what may be there already)."""
    console = console or Console(highlight=False)
    start = time.perf_counter()
    outdir.prepare(out)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread, more only contend
    try:
        reports, story = _train_and_check(out, FAST_STEPS if fast else FULL_STEPS, console)
    finally:
        torch.set_num_threads(threads)
    result = DemoResult(out, out / "report.html", out / "report.json", reports)
    _heading(console, 6, "one report")
    _write_reports(result, story)
    console.print(f"  {result.report_html}  (self-contained: open it in any browser, nothing is fetched)")
    result.seconds = time.perf_counter() - start
    _verdict(result, console)
    return result


def _train_and_check(out: Path, steps: int, console: Console) -> tuple[dict[str, RunReport], Preface]:
    from trainmedic.demo.heal_step import heal_rounds
    from trainmedic.demo.runs import quiet_libraries, setup, unwatched_run, watched_run

    with quiet_libraries():
        _heading(console, 1, "the toy base model")
        base = _base(console)
        s = setup(base, steps)
        _heading(console, 2, f"a LoRA fine-tune of it under watch, {steps} steps, with faults injected")
        for line in s.plan.describe():
            console.print(f"  planned: {line}")
        watched = watched_run(out / "watched-run", s, console)
        console.print(Text(f"  => {watched.ending} ({watched.seconds:.0f} s)", style="bold"))
        _heading(console, 3, "the same fine-tune, same faults, without trainmedic")
        unwatched = unwatched_run(out / "unwatched-run", s, console)
        console.print(Text(f"  => {unwatched.ending} ({unwatched.seconds:.0f} s)", style="bold"))
        _heading(console, 4, "heal: a KL-anchored round next to a plain one, on kept completions")
        healed = heal_rounds(out, base, console)
    _heading(console, 5, "trainmedic check on every run")
    paths = {"watched": watched.path, "unwatched": unwatched.path, **healed.paths}
    reports = _check(paths, console)
    return reports, _story(steps, s.plan.describe(), watched, unwatched, healed)


def _story(
    steps: int, planned: list[str], watched: TrainedRun, unwatched: TrainedRun, healed: HealStep
) -> Preface:
    """What the report's reader needs before the verdicts: what was done to the runs, how each
    ended, and what the heal rounds measured."""
    headers, rows = healed.rows()
    return Preface(
        "what this demo did",
        paragraphs=[
            f"A LoRA fine-tune of the toy base ran {steps} steps twice with the same data and the same "
            "faults injected: once under trainmedic's watch, once as a plain trainer.train().",
            f"Watched: {watched.ending}. Unwatched: {unwatched.ending}.",
            "Then a heal round with the KL barrier (kl_rev) ran beside a plain nll round on the same "
            "kept completions; the table compares them on held-out names.",
        ],
        items=[f"fault at {line}" for line in planned],
        table_headers=headers,
        table_rows=rows,
        table_caption="heal: a KL-anchored round next to a plain one (lower KL: closer to the original)",
    )


def _base(console: Console) -> Path:
    from trainmedic.toy.base import CACHE_VERSION, build_info, cache_root, is_complete, toy_base

    cached = is_complete(cache_root() / f"toy-base-v{CACHE_VERSION}")
    t0 = time.perf_counter()
    heard: list[str] = []

    def say(line: str) -> None:
        heard.append(line)
        console.print(f"  {line}")

    base = toy_base(say=say)
    info = build_info(base)
    took = time.perf_counter() - t0
    built_here = any(line.startswith("building the toy base") for line in heard)
    how = (
        "reused from the cache"
        if cached
        else f"built in {took:.0f} s"
        if built_here
        else f"built by another process (waited {took:.0f} s)"
    )
    home = Path.home()
    shown = f"~/{base.relative_to(home)}" if base.is_relative_to(home) else str(base)
    console.print(f"  {shown}: {how}")
    console.print(
        f"  {info['parameters']:,} parameters, pre-trained {info['steps']} steps on Python docstrings: "
        f"held-out loss {info['heldout_loss_initial']:.2f} -> {info['heldout_loss_final']:.2f}"
    )
    return base


def _check(paths: dict[str, Path], console: Console) -> dict[str, RunReport]:
    """`trainmedic check`, in process: every run's verdict table."""
    from trainmedic.check import check_paths
    from trainmedic.report import terminal
    from trainmedic.spec import default_spec

    reports = check_paths(list(paths.values()), default_spec())
    for report in reports:
        console.print()
        terminal.render_run(report, console)
    return dict(zip(paths, reports, strict=True))


def _write_reports(result: DemoResult, story: Preface) -> None:
    from trainmedic.fsutil import atomic_write
    from trainmedic.report import html, jsonio

    reports = list(result.reports.values())
    atomic_write(result.report_html, html.render(reports, fail_on=FAIL_ON, preface=story))
    atomic_write(result.report_json, jsonio.dumps(reports, fail_on=FAIL_ON))


def _verdict(result: DemoResult, console: Console) -> None:
    from trainmedic.gate import gate_fails

    console.print()
    for name, report in result.reports.items():
        gate = "fails" if gate_fails([report], FAIL_ON) else "passes"
        console.print(f"  {name:<12} {report.headline()}: the gate {gate}")
    if result.ok:
        console.print(
            Text(
                f"demo done in {result.seconds:.0f} s: trainmedic kept the watched run healthy", style="bold"
            )
        )
    else:
        console.print(
            Text(
                f"demo done in {result.seconds:.0f} s, but the runs did not end as expected: the watched "
                "run should pass the gate and the unwatched one fail it",
                style="bold red",
            )
        )
