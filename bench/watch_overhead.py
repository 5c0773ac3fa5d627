"""Per-step overhead of `watch` on the toy model: a paired ratio measured in one process.

    python bench/watch_overhead.py [--pairs N] [--steps N]

Each pair trains the same LoRA fine-tune of the toy base twice, once plain and once under
`watch` (run log written, logging every step), in alternating order. A step's time is the gap
between two `on_step_begin` calls, so it covers forward, backward, the optimizer, logging and
everything the watcher adds. The toy step (~25 ms) is the worst case: a real model's step is far
longer and the watcher's cost per step is about constant.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

README = Path(__file__).resolve().parent / "README.md"
WARMUP_STEPS = 5


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.marks.append(time.perf_counter())

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.marks.append(time.perf_counter())

    def median_step(self) -> float:
        gaps = [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)][WARMUP_STEPS:]
        return statistics.median(gaps)


def one_run(base: Path, steps: int, seed: int, watched: bool) -> float:
    from trainmedic.toy.training import toy_trainer
    from trainmedic.watcher import watch

    with tempfile.TemporaryDirectory() as out:
        trainer = toy_trainer(out, base=base, steps=steps, seed=seed, logging_steps=1)
        timer = StepTimer()
        trainer.add_callback(timer)
        if watched:
            watch(trainer, echo=lambda line: None)
        else:
            trainer.train()
        return timer.median_step()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    from trainmedic.toy.base import toy_base

    base = toy_base()
    one_run(base, 10, 0, True)  # warm caches and lazy imports
    plain, watched, ratios = [], [], []
    for pair in range(args.pairs):
        order = (False, True) if pair % 2 == 0 else (True, False)
        times = {w: one_run(base, args.steps, pair, w) for w in order}
        plain.append(times[False])
        watched.append(times[True])
        ratios.append(times[True] / times[False])
        print(
            f"pair {pair}: plain {times[False] * 1e3:.2f} ms, watched {times[True] * 1e3:.2f} ms, "
            f"ratio {ratios[-1]:.4f}",
            flush=True,
        )
    ratio = statistics.median(ratios)
    line = (
        f"| toy LoRA step, logging every step | {statistics.median(plain) * 1e3:.2f} ms | "
        f"{statistics.median(watched) * 1e3:.2f} ms | {ratio:.4f} ({(ratio - 1) * 100:+.1f} %) | "
        f"{min(ratios):.4f}-{max(ratios):.4f} | {args.pairs} x {args.steps} steps | <= 3 % | "
        f"{'yes' if ratio <= 1.03 else 'NO'} |"
    )
    print(line)
    table = "\n".join(
        [
            f"Measured {time.strftime('%Y-%m-%d')}: median step time of each run; median of the pair ratios.",
            "",
            "| case | plain step | watched step | watched / plain | pair ratios | runs | target | met |",
            "|---|---|---|---|---|---|---|---|",
            line,
        ]
    )
    text = README.read_text()
    block = "<!-- watch:start -->\n" + table + "\n<!-- watch:end -->"
    text = re.sub(r"<!-- watch:start -->.*<!-- watch:end -->", block, text, flags=re.S)
    README.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
