"""Fault injection: the same toy training under faults, run by the plain Trainer and under `watch`.

    python bench/faults.py [--steps N] [--threads N] [--only 1,4] [--no-readme]

Each scenario trains the same LoRA fine-tune of the toy base (fixed seed, checkpoints every 20
steps; `fault_setup.py`) twice, once with `trainer.train()` and once with `watch(trainer,
CONFIG)`, injects the same fault into both, and then evaluates the model left at the end on
held-out blocks. Scenarios 1-7 train in this process; 8 (a process killed mid-save, then a fresh
one resuming) and 9 (two ranks under torchrun) run `fault_worker.py` in processes of their own
(`fault_procs.py`). The table
says for each run how it ended, its eval loss against the clean plain run, the steps a rollback
made it compute twice, the watcher's interventions and how many steps after the fault the
watcher first reacted. It is written between the `faults` markers of `bench/README.md`.

A fault keyed on a step fires again when a rollback replays that step only where the issue asks
for it ("the learning rate x100 for the rest of the run"); the poisoned batches are poisoned
data, recognised by their content, so a rollback that skips their window never meets them again.
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

import fault_procs
from fault_setup import (
    CONFIG,
    FAULT_STEP,
    INTERVENTIONS,
    STEPS,
    Clock,
    Outcome,
    detection_latency,
    load_data,
    make_trainer,
    nan_loss_at,
    quiet,
    save_data,
    train_one_way,
)

README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- faults:start -->", "<!-- faults:end -->"
HEADING = "## Fault injection: plain Trainer vs watch"
LOSS_TARGET = 0.05
RECOMPUTE_TARGET = 0.10


@dataclass
class Fault:
    """What a scenario did to one run: the step it first hit, and what to undo before evaluation."""

    step: int | None = None
    cleanup: Callable[[], None] | None = None


Inject = Callable[[Any, Clock, "Bench"], Fault]
Runner = Callable[["Bench", str], Outcome]


@dataclass(frozen=True)
class Scenario:
    """A fault injected into an in-process run (`inject`), or a run of processes (`runner`)."""

    number: int
    name: str
    inject: Inject | None = None
    loss_target: float = LOSS_TARGET
    runner: Runner | None = None


# -- faults ----------------------------------------------------------------------------------------
def fault_step(step: int) -> Callable[[Inject], Inject]:
    """Tag an injector with the step its fault first hits (when it does not measure it itself)."""

    def tag(inject: Inject) -> Inject:
        def run(trainer: Any, clock: Clock, bench: Bench) -> Fault:
            fault = inject(trainer, clock, bench)
            fault.step = step if fault.step is None else fault.step
            return fault

        return run

    return tag


def wrap_training_step(trainer: Any, before: Callable[[Any, Any], Any], after: Callable[[Any], None]) -> None:
    """`before(model, inputs) -> inputs` ahead of a micro-batch, `after(model)` once its backward ran."""
    original = trainer.training_step

    def training_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        loss = original(model, before(model, inputs), *args, **kwargs)
        after(model)
        return loss

    trainer.training_step = training_step


@fault_step(FAULT_STEP)
def nan_loss(trainer: Any, clock: Clock, bench: Bench) -> Fault:
    nan_loss_at(trainer, clock, FAULT_STEP)
    return Fault()


@fault_step(100)
def nan_weights(trainer: Any, clock: Clock, bench: Bench) -> Fault:
    class Poison(TrainerCallback):
        fired = False

        def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if state.global_step + 1 == 100 and not self.fired:
                self.fired = True
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).fill_(math.nan)

    trainer.add_callback(Poison())
    return Fault()


@fault_step(60)
def lr_x100(trainer: Any, clock: Clock, bench: Bench) -> Fault:
    class Boost(TrainerCallback):
        # fires on every pass through step 60: a rollback to before it meets the fault again;
        # a resume from a checkpoint after it restores the boosted rate with the scheduler
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step + 1 == 60:
                sched = trainer.lr_scheduler
                sched.base_lrs = [lr * 100 for lr in sched.base_lrs]
                for group in trainer.optimizer.param_groups:
                    group["lr"] *= 100

    trainer.add_callback(Boost())
    return Fault()


def poisoned_batches(trainer: Any, clock: Clock, bench: Bench) -> Fault:
    """The five micro-batches the clean run trained on at steps 100-104 get random labels."""
    poison = bench.batches_at(range(100, 105))
    generator = torch.Generator().manual_seed(0)
    fault = Fault()

    def before(model: Any, inputs: Any) -> Any:
        if fingerprint(inputs) not in poison:
            return inputs
        fault.step = clock.step if fault.step is None else fault.step
        labels = torch.randint(0, int(model.config.vocab_size), inputs["labels"].shape, generator=generator)
        return {**inputs, "labels": labels}

    wrap_training_step(trainer, before, lambda model: None)
    return fault


@fault_step(100)
def grad_spike(trainer: Any, clock: Clock, bench: Bench) -> Fault:
    fired: list[bool] = []

    def after(model: Any) -> None:
        if clock.step == 100 and not fired:
            fired.append(True)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(1e4)

    wrap_training_step(trainer, lambda model, inputs: inputs, after)
    return Fault()


@fault_step(100)
def oom(trainer: Any, clock: Clock, bench: Bench) -> Fault:
    """From step 100 on a decoder layer "runs out of memory" on more than 4 rows (of the 8 a
    micro-batch holds), as `tests/watcher/test_oom.py`'s FakeOom simulates it on CPU."""
    layer = next(m for name, m in trainer.model.named_modules() if name.endswith("layers.1"))

    def forward(module: Any, args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if clock.step >= 100 and module.training and int(hidden.shape[0]) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    handle = layer.register_forward_hook(forward)
    return Fault(cleanup=handle.remove)


def killed_in_save(bench: Bench, mode: str) -> Outcome:
    return fault_procs.kill_in_save(mode, bench.shared)


def nan_on_rank_1(bench: Bench, mode: str) -> Outcome:
    return fault_procs.nan_on_rank_1(mode, bench.shared)


SCENARIOS = (
    Scenario(1, "clean run"),
    Scenario(2, "one NaN loss (step 100)", nan_loss),
    Scenario(3, "weights poisoned to NaN (step 100)", nan_weights),
    Scenario(4, "learning rate x100 from step 60 to the end", lr_x100, loss_target=0.10),
    Scenario(5, "five poisoned batches in a row (random labels, steps 100-104)", poisoned_batches),
    Scenario(6, "gradient x10^4 (step 100)", grad_spike),
    Scenario(7, "OOM above 4 rows per micro-batch from step 100 (micro-batch 8)", oom),
    Scenario(8, "SIGKILL mid checkpoint save (step 100), then resume", runner=killed_in_save),
    Scenario(9, "two processes (torchrun, gloo), NaN loss on rank 1 only (step 100)", runner=nan_on_rank_1),
)


def fingerprint(inputs: Any) -> tuple[int, ...]:
    return tuple(int(t) for t in inputs["input_ids"][0].tolist())


# -- running ---------------------------------------------------------------------------------------
class Bench:
    """The shared pieces: base, data, and the clean runs' batch order (to find poisoned batches)."""

    def __init__(self, steps: int, threads: int = 1) -> None:
        from trainmedic.toy.base import load_base, toy_base

        self.steps, self.threads = steps, threads
        self.base = toy_base()  # built (or found cached) here, so worker processes only load it
        _, tokenizer = load_base(self.base)
        self.train, self.eval = load_data(tokenizer)
        self._tmp = Path(tempfile.mkdtemp(prefix="faults-data-"))
        data = save_data(self.train, self.eval, self._tmp / "data")  # for the worker processes
        self.shared = fault_procs.Shared(self.base, data, steps, threads)
        self.order: dict[str, dict[int, tuple[int, ...]]] = {}  # mode -> step -> first row
        self.mode = ""

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def batches_at(self, steps: range) -> set[tuple[int, ...]]:
        order = self.order.get(self.mode)
        if order is None:
            raise RuntimeError("the clean run must come first: it records which batches to poison")
        return {order[s] for s in steps if s in order}

    def run(self, scenario: Scenario, mode: str) -> Outcome:
        if scenario.runner is not None:
            return scenario.runner(self, mode)
        self.mode = mode
        out = Path(tempfile.mkdtemp(prefix=f"faults-{scenario.number}-{mode}-"))
        try:
            trainer = make_trainer(out, self.base, self.steps, self.train, self.eval)
            clock = Clock()
            trainer.add_callback(clock)
            if scenario.inject is None:
                self._record_order(trainer, clock, mode)
                fault = Fault()
            else:
                fault = scenario.inject(trainer, clock, self)
            start = time.perf_counter()
            outcome, result = train_one_way(trainer, mode)
            outcome.seconds = time.perf_counter() - start
            outcome.fault_step = fault.step
            if fault.cleanup is not None:
                fault.cleanup()
            if outcome.ended != "crashed":
                outcome.eval_loss = float(trainer.evaluate()["eval_loss"])
            if outcome.fault_step is not None and result is not None:
                outcome.latency = detection_latency(result.events, result.actions, outcome.fault_step)
            return outcome
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def _record_order(self, trainer: Any, clock: Clock, mode: str) -> None:
        order = self.order.setdefault(mode, {})

        def before(model: Any, inputs: Any) -> Any:
            order.setdefault(clock.step, fingerprint(inputs))
            return inputs

        wrap_training_step(trainer, before, lambda model: None)


# -- the table -------------------------------------------------------------------------------------
def judge(o: Outcome, clean: float, steps: int, loss_target: float) -> tuple[bool, list[str]]:
    """Did the watched run meet the issue's targets? The failed criteria, in words."""
    why = []
    if o.ended != "completed":
        why.append(f"{o.ended} at step {o.steps}: {o.reason}")
    rel = _rel(o.eval_loss, clean)
    if rel is None:
        why.append("no finite eval loss")
    elif abs(rel - 1) > loss_target:
        why.append(f"eval loss {rel - 1:+.1%} of clean (target within {loss_target:.0%})")
    if o.recomputed > RECOMPUTE_TARGET * steps:
        spans = [f"rollbacks {', '.join(o.rollbacks)}"] if o.rollbacks else []
        if o.started_at is not None and o.fault_step is not None:
            spans.insert(0, f"killed at step {o.fault_step}, resumed from step {o.started_at}")
        why.append(
            f"recomputed {o.recomputed} steps = {o.recomputed / steps:.1%} (target <= 10 %); "
            + "; ".join(spans)
        )
    return not why, why


def _rel(loss: float | None, clean: float) -> float | None:
    return None if loss is None or not math.isfinite(loss) else loss / clean


def cell_finished(o: Outcome) -> str:
    return o.ending()


def cell_recomputed(o: Outcome, steps: int) -> str:
    """A watched run's recomputed steps; a plain run's only where it resumed (scenario 8)."""
    if o.mode == "plain" and o.started_at is None:
        return "—"
    return f"{o.recomputed} ({o.recomputed / steps:.1%})"


def cell_latency(s: Scenario, o: Outcome) -> str:
    if s.inject is None and s.runner is None:
        return "no fault"
    if o.latency_note:
        return o.latency_note
    return "not detected" if o.latency is None else f"{o.latency} step{'s' * (o.latency != 1)}"


def cell_loss(o: Outcome, clean: float) -> str:
    if o.eval_loss is None:
        return "—"
    rel = _rel(o.eval_loss, clean)
    return f"{o.eval_loss:.3f} (x{rel:.3f})" if rel is not None else f"{o.eval_loss} (not finite)"


def cell_interventions(o: Outcome) -> str:
    return ", ".join(f"{o.interventions[k]} {k}" for k in INTERVENTIONS if o.interventions[k]) or "none"


def render(results: list[tuple[Scenario, Outcome, Outcome]], steps: int, threads: int, seconds: float) -> str:
    clean = next(p.eval_loss for s, p, _ in results if s.number == 1)
    assert clean is not None
    lines = [
        f"Measured {date.today().isoformat()} on {platform.machine()}, torch threads {threads}, "
        f"{steps} steps per run, total {seconds:.0f} s. Eval loss relative to the clean plain run "
        f"({clean:.4f}). `WatchConfig({_config_args()}).",
        "",
        "| # | fault | run | finished | final eval loss (x clean) | steps recomputed | interventions "
        "| detection latency | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    misses: list[str] = []
    notes: list[str] = []
    for s, plain, watched in results:
        met, why = judge(watched, clean, steps, s.loss_target)
        target = f"completed, within {s.loss_target:.0%}, <= 10 % recomputed"
        lines.append(
            f"| {s.number} | {s.name} | plain | {cell_finished(plain)} | {cell_loss(plain, clean)} "
            f"| {cell_recomputed(plain, steps)} | — | — | | |"
        )
        lines.append(
            f"| | | watch | {cell_finished(watched)} | {cell_loss(watched, clean)} "
            f"| {cell_recomputed(watched, steps)} | {cell_interventions(watched)} "
            f"| {cell_latency(s, watched)} | {target} | {'met' if met else 'not met'} |"
        )
        if not met:
            misses.append(f"- {s.number}: " + "; ".join(why))
        notes += [f"- {s.number}, {note}" for note in dict.fromkeys(plain.notes + watched.notes)]
    if misses:
        lines += ["", "Targets missed:", *misses]
    if notes:
        lines += ["", "What the processes of scenarios 8 and 9 left behind:", *notes]
    return "\n".join(lines) + "\n"


def _config_args() -> str:
    changed = {"certify_after": CONFIG.certify_after, **CONFIG.model_dump(exclude_defaults=True)}
    knobs = ("max_rollbacks", "rollback_lr_factor", "max_consecutive_skips", "max_skips", "keep_certified")
    rest = ", ".join(f"{k}={getattr(CONFIG, k)!r}" for k in knobs if k not in changed)
    return ", ".join(f"{k}={v!r}" for k, v in changed.items()) + f")`, the rest default ({rest}"


def write_readme(table: str, readme: Path = README) -> None:
    text = readme.read_text(encoding="utf-8")
    block = f"{START}\n{table}{END}"
    if START in text and END in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda m: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{block}\n"
    readme.write_text(text, encoding="utf-8")


def run_both(bench: Bench, s: Scenario) -> tuple[Scenario, Outcome, Outcome]:
    """One scenario, plain then watched; says how each ended as soon as it is known."""
    plain = bench.run(s, "plain")
    watched = bench.run(s, "watch")
    print(
        f"{s.number} {s.name}: plain {cell_finished(plain)} eval {plain.eval_loss} "
        f"({plain.seconds:.0f} s) | watch {cell_finished(watched)} eval {watched.eval_loss} "
        f"recomputed {watched.recomputed} [{cell_interventions(watched)}] "
        f"latency {watched.latency} ({watched.seconds:.0f} s) {watched.reason}",
        *dict.fromkeys(plain.notes + watched.notes),
        sep="\n  ",
        flush=True,
    )
    return s, plain, watched


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on 2 cores)")
    parser.add_argument("--only", default="", help="comma-separated scenario numbers (1 always runs)")
    parser.add_argument("--no-readme", action="store_true", help="print the table, leave README alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wanted = {1, *(int(n) for n in args.only.split(",") if n.strip())} if args.only else None
    start = time.perf_counter()
    with quiet():
        bench = Bench(args.steps, args.threads)
        try:
            results = [run_both(bench, s) for s in SCENARIOS if wanted is None or s.number in wanted]
        finally:
            bench.close()
    table = render(results, args.steps, args.threads, time.perf_counter() - start)
    print(table)
    if not args.no_readme and wanted is None:
        write_readme(table)
        print(f"written to {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
