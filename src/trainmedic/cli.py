"""The `trainmedic` command line: parse, call the library, render, exit.

Exit codes for commands that judge: 0 nothing reached `--fail-on`, 1 something did (ERROR always
counts), 2 usage error (bad flag, missing PATH, bad spec file).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from trainmedic import __version__
from trainmedic.gate import FailOn

if TYPE_CHECKING:
    from trainmedic.findings import RunReport

app = typer.Typer(
    name="trainmedic",
    help="Keeps LLM fine-tuning runs healthy: audit finished runs from their files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_OK, EXIT_GATE, EXIT_USAGE = 0, 1, 2


def _usage_error(message: str) -> typer.Exit:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(EXIT_USAGE)


def _version(value: bool) -> None:
    if value:
        print(f"trainmedic {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """trainmedic: audit, supervise and heal LLM fine-tuning runs."""


def _check_exists(path: Path) -> None:
    if path.exists():
        return
    if os.path.lexists(path):
        raise _usage_error(f"{path}: broken symlink or symlink loop")
    raise _usage_error(f"{path}: no such file or directory")


def _check_writable_target(target: Path | None, option: str) -> None:
    """Refuse an output path that cannot be written, before any work: name the part that is wrong
    (`notes.txt/x.json`: notes.txt is a file, not a directory) instead of the OS error's words."""
    if target is None:
        return
    if target.is_dir():
        raise _usage_error(f"{option} {target}: is a directory; give a file name")
    for parent in (target.parent, *target.parent.parents):
        if os.path.lexists(parent):
            if not parent.is_dir():
                what = "a broken symlink" if not parent.exists() else "a file"
                raise _usage_error(f"{option} {target}: {parent} is {what}, not a directory")
            return


@app.command()
def check(
    paths: Annotated[list[Path], typer.Argument(help="Run directories, checkpoints or log files.")],
    spec: Annotated[Path | None, typer.Option("--spec", help="YAML file picking probes/thresholds.")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the strict JSON report here.")
    ] = None,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Write a Markdown report here.")] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write a JUnit XML report here.")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML report.")] = None,
    fail_on: Annotated[
        FailOn, typer.Option("--fail-on", help="Lowest verdict that fails the gate (ERROR always fails).")
    ] = FailOn.FAIL,
    jobs: Annotated[
        int | None, typer.Option("--jobs", "-j", min=1, help="Worker processes (default: auto).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Per-run tables for many runs.")] = False,
) -> None:
    """Audit finished runs from their files: loss logs, optimizer state, adapter weights."""
    from trainmedic.check import check_paths
    from trainmedic.gate import gate_fails
    from trainmedic.spec import SpecError, default_spec, load_spec

    for path in paths:
        _check_exists(path)
    for option, target in (
        ("--json", json_out),
        ("--markdown", markdown),
        ("--junit", junit),
        ("--html", html),
    ):
        _check_writable_target(target, option)
    try:
        check_spec = load_spec(spec) if spec is not None else default_spec()
    except SpecError as exc:
        raise _usage_error(str(exc)) from None
    reports = check_paths(paths, check_spec, jobs=jobs)
    _write_outputs(reports, fail_on, json_out=json_out, markdown=markdown, junit=junit, html=html)
    from trainmedic.report import terminal

    terminal.render(reports, Console(highlight=False), fail_on=fail_on.value, verbose=verbose)
    raise typer.Exit(EXIT_GATE if gate_fails(reports, fail_on) else EXIT_OK)


@app.command()
def report(
    json_file: Annotated[Path, typer.Argument(help="A JSON report written by `check --json`.")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="markdown, html, junit or terminal.")
    ] = "terminal",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here instead of stdout.")] = None,
    fail_on: Annotated[
        FailOn, typer.Option("--fail-on", help="Gate level shown in the report.")
    ] = FailOn.FAIL,
) -> None:
    """Re-render a JSON report as Markdown, HTML, JUnit or a terminal table."""
    from trainmedic.record.errors import ReadError
    from trainmedic.report import jsonio

    renderers = {"markdown", "html", "junit", "terminal"}
    if fmt not in renderers:
        raise _usage_error(f"--format must be one of {sorted(renderers)}, not {fmt!r}")
    _check_exists(json_file)
    try:
        reports = jsonio.loads(json_file.read_bytes(), source=str(json_file))
    except ReadError as exc:
        raise _usage_error(str(exc)) from None
    except OSError as exc:
        raise _usage_error(f"{json_file}: {exc.strerror or exc}") from None
    if fmt == "terminal":
        from trainmedic.report import terminal

        terminal.render(reports, Console(highlight=False), fail_on=fail_on.value, verbose=True)
        return
    _check_writable_target(out, "--out")
    text = _render(fmt, reports, fail_on.value)
    if out is None:
        sys.stdout.write(text)
    else:
        from trainmedic.fsutil import atomic_write

        atomic_write(out, text)
        print(f"wrote {out}")


@app.command()
def probes() -> None:
    """List the probes and every threshold with its default and reason."""
    from rich.table import Table

    from trainmedic.probes import all_probes

    table = Table(title="trainmedic probes", show_lines=True)
    table.add_column("probe")
    table.add_column("what it asks")
    table.add_column("thresholds (default: reason)")
    for kind, probe in all_probes().items():
        lines = []
        for name, field in probe.spec_cls.model_fields.items():
            if name == "enabled":
                continue
            lines.append(f"{name} = {field.default!r}: {field.description or ''}")
        table.add_row(kind, probe.summary, "\n".join(lines))
    Console().print(table)


@app.command()
def resume(
    output_dir: Annotated[Path, typer.Argument(help="The output_dir of a run killed mid-way.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be run, and run nothing.")
    ] = False,
) -> None:
    """Continue a killed run from its newest certified checkpoint, with the command it was
    launched with (same directory, same Python) and TRAINMEDIC_RESUME=1, which makes watch()
    resume. Exits with the command's own exit code; 2 when there is nothing to resume."""
    from trainmedic.watcher.resume import ResumeError, plan_resume

    try:
        plan = plan_resume(output_dir)
    except ResumeError as exc:
        raise _usage_error(str(exc)) from None
    print(plan.describe(), flush=True)
    if dry_run:
        print("(dry run: nothing was started)")
        raise typer.Exit(EXIT_OK)
    try:
        code = plan.run()
    except ResumeError as exc:
        raise _usage_error(str(exc)) from None
    raise typer.Exit(code)


@app.command()
def heal(
    base: Annotated[Path, typer.Option("--base", metavar="DIR", help="The original model's directory.")],
    data: Annotated[
        Path, typer.Option("--data", metavar="FILE", help="kept.jsonl: prompt/completion or messages.")
    ],
    out: Annotated[
        Path, typer.Option("--out", metavar="DIR", help="New directory for this round's adapter.")
    ],
    history: Annotated[
        list[Path] | None,
        typer.Option("--history", metavar="DIR", help="An earlier round's adapter (repeatable)."),
    ] = None,
    divergence: Annotated[
        str, typer.Option("--divergence", metavar="MODE", help="nll, kl_fwd, kl_rev or wd.")
    ] = "kl_rev",
    lam: Annotated[
        float | None, typer.Option("--lam", help="Barrier strength; wd: the weight decay (default 1).")
    ] = None,
    tau: Annotated[
        float | None, typer.Option("--tau", help="KL allowed for free, nats/token (default 0.1).")
    ] = None,
    epochs: Annotated[
        float | None, typer.Option("--epochs", help="Passes over the kept data (default 3).")
    ] = None,
    rank: Annotated[
        int | None, typer.Option("--rank", help="LoRA rank of the new adapter (default 8).")
    ] = None,
    alpha: Annotated[int | None, typer.Option("--alpha", help="LoRA alpha (default 2 x rank).")] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers", metavar="START:END", help="Decoder layers to adapt, END excluded (default all)."
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="AdamW learning rate (default 2e-4).")] = None,
    max_len: Annotated[
        int | None, typer.Option("--max-len", help="Tokens per example, at most (default 512).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Examples per step (default 8).")
    ] = None,
    min_train: Annotated[
        int | None, typer.Option("--min-train", help="Refuse to train on fewer examples (default 8).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seeds LoRA init and data order.")] = 0,
    watch_preset: Annotated[
        str,
        typer.Option("--watch", metavar="PRESET", help="watch preset: default, aggressive or conservative."),
    ] = "default",
) -> None:
    """Train one LoRA round on kept examples with a divergence barrier to the original model,
    under watch; print the round table and its checked expectations. Exits 0 when every
    expectation holds, 1 when one fails, 2 on bad input (nothing is trained then)."""
    from typing import Any

    from rich.markup import escape

    from trainmedic.heal import HealError

    given = {"lam": lam, "tau": tau, "epochs": epochs, "rank": rank, "alpha": alpha, "lr": lr}
    given |= {"max_len": max_len, "batch_size": batch_size, "min_train": min_train}
    knobs: dict[str, Any] = {"divergence": divergence, "seed": seed}
    knobs |= {name: value for name, value in given.items() if value is not None}  # None: the default
    if layers is not None:
        start, sep, end = layers.partition(":")
        if not sep or not start.strip().isdigit() or not end.strip().isdigit():
            raise _usage_error(f"--layers must be START:END (two integers), got {layers!r}")
        knobs["layers"] = (int(start), int(end))
    console = Console(highlight=False, soft_wrap=True)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise _usage_error(
            escape("heal trains a model: install the training extra, pip install 'trainmedic[train]'")
        ) from None
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from trainmedic.heal import heal_round
    from trainmedic.heal.render import render

    try:
        result = heal_round(
            base,
            data,
            out,
            history=history or (),
            watch_config=watch_preset,
            echo=lambda line: console.print(line, markup=False),
            **knobs,
        )
    except HealError as exc:
        raise _usage_error(escape(str(exc))) from None  # paths and messages may hold [brackets]
    render(result, console)
    raise typer.Exit(EXIT_OK if result.ok else EXIT_GATE)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Directory for the demo's runs and report.")] = Path(
        "demo-out"
    ),
    fast: Annotated[bool, typer.Option("--fast", help="A shorter run (the test suite's).")] = False,
) -> None:
    """Watch, heal and check working together on the toy model, in a few minutes on a CPU.

    Faults are injected into a real fine-tune and treated live, then every run is audited and
    one HTML report written. Exits 0 when the watched run passes the gate and the unwatched one
    fails it, 1 when they did not, 2 when --out holds files the demo did not write."""
    from trainmedic.demo import OutDirError, run_demo

    try:
        result = run_demo(out, fast=fast, console=Console(highlight=False))
    except OutDirError as exc:
        raise _usage_error(str(exc)) from None
    raise typer.Exit(EXIT_OK if result.ok else EXIT_GATE)


def _render(fmt: str, reports: list[RunReport], fail_on: str) -> str:
    if fmt == "markdown":
        from trainmedic.report import markdown

        return markdown.render(reports, fail_on=fail_on)
    if fmt == "html":
        from trainmedic.report import html

        return html.render(reports, fail_on=fail_on)
    from trainmedic.report import junit

    return junit.render(reports, fail_on=fail_on)


def _write_outputs(reports: list[RunReport], fail_on: FailOn, **targets: Path | None) -> None:
    from trainmedic.fsutil import atomic_write
    from trainmedic.report import jsonio

    for fmt, target in targets.items():
        if target is None:
            continue
        data: bytes | str
        if fmt == "json_out":
            data = jsonio.dumps(reports, fail_on=fail_on.value)
        else:
            data = _render(fmt, reports, fail_on.value)
        try:
            atomic_write(target, data)
        except OSError as exc:
            raise _usage_error(f"{target}: cannot write report: {exc.strerror or exc}") from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
