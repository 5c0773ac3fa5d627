"""Benchmarks for `trainmedic check`: whole-process wall time and peak memory.

    python bench/run.py [--repeat N] [--only NAME ...]

Builds synthetic stores under bench/.data/ (once; cached), runs `trainmedic check` on each in a
fresh process several times, and writes the medians to the table in bench/README.md. The machine is
shared and noisy, so each run is paired with a baseline run taken right after it, and the median
of the per-pair ratios is steadier than any absolute time. The baseline is the floor of any
torch-based reader: `import torch` plus, for the stores, `torch.load` of the same optimizer state.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / ".data"
README = HERE / "README.md"
BIN = Path(sys.executable).parent
TRAINMEDIC = str(BIN / "trainmedic")
DATA_VERSION = "1"


@dataclass
class Case:
    name: str
    what: str
    target_s: float
    target_mb: float | None
    build: Callable[[Path], Path]
    repeat: int
    state_file: str | None = None  # optimizer state the torch baseline loads, relative to the case dir


def _dlm_135m(path: Path) -> Path:
    from trainmedic.toy.artifacts import write_dlm_store
    from trainmedic.toy.shapes import SMOLLM2_135M

    return write_dlm_store(path, SMOLLM2_135M, rank=8, logged_steps=300)


def _dlm_52mb(path: Path) -> Path:
    from dataclasses import replace

    from trainmedic.toy.artifacts import write_dlm_store
    from trainmedic.toy.shapes import ALL_LINEAR, SMOLLM2_360M

    return write_dlm_store(path, replace(SMOLLM2_360M, modules=ALL_LINEAR), rank=12, logged_steps=300)


def _log_1m(path: Path) -> Path:
    from trainmedic.toy.artifacts import write_step_log

    return write_step_log(path / "run.jsonl", 1_000_000)


def _hf_1000(path: Path) -> Path:
    from trainmedic.toy.artifacts import write_hf_run
    from trainmedic.toy.shapes import TINY

    for i in range(1000):
        write_hf_run(path / f"run-{i:04d}", TINY, rank=4, logged_steps=20, seed=i)
    return path


STATE = "adapter/versions/v0001/training_state.pt"
CASES = [
    Case(
        "dlm-135m",
        "SmolLM2-135M-shaped dlm store (30 layers x q,k,v,o, r=8; 7.4 MB optimizer state; 300 logged steps)",
        0.3,
        None,
        _dlm_135m,
        9,
        STATE,
    ),
    Case(
        "dlm-52mb",
        "SmolLM2-360M-shaped dlm store, all linear modules, r=12 (52 MB optimizer state)",
        0.4,
        None,
        _dlm_52mb,
        9,
        STATE,
    ),
    Case("log-1m", "1,000,000-step JSONL log (~155 MB)", 3.0, 300.0, _log_1m, 5),
    Case("hf-1000", "1,000 small HF run directories in one call", 15.0, None, _hf_1000, 3),
]


def build(case: Case) -> list[str]:
    root = DATA / case.name
    stamp = root / f".built-v{DATA_VERSION}"
    if not stamp.exists():
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        print(f"building {case.name} ...", flush=True)
        case.build(root)
        stamp.touch()
    if case.name == "hf-1000":
        return sorted(str(p) for p in root.iterdir() if p.is_dir())
    if case.name == "log-1m":
        return [str(root / "run.jsonl")]
    return [str(root)]


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MB and exit code of one fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024.0, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=0, help="runs per case (default: per case)")
    parser.add_argument("--only", nargs="*", default=None, help="case names to run")
    args = parser.parse_args()
    rows = []
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        paths = build(case)
        cmd = [TRAINMEDIC, "check", *paths]
        baseline = "import torch"
        if case.state_file:
            baseline += f"; torch.load({str(DATA / case.name / case.state_file)!r}, weights_only=False)"
        timed(cmd)  # warm the page cache once
        walls, rss, ratios = [], [], []
        for _ in range(args.repeat or case.repeat):
            wall, peak, code = timed(cmd)
            if code not in (0, 1):
                print(f"{case.name}: trainmedic exited {code}", file=sys.stderr)
                return 1
            base, _, _ = timed([sys.executable, "-c", baseline])
            walls.append(wall)
            rss.append(peak)
            ratios.append(wall / base)
        med = statistics.median(walls)
        row = {
            "case": case.name,
            "what": case.what,
            "median_s": med,
            "min_s": min(walls),
            "max_s": max(walls),
            "peak_mb": max(rss),
            "ratio": statistics.median(ratios),
            "baseline": "import torch + torch.load" if case.state_file else "import torch",
            "target": f"<= {case.target_s:g} s" + (f", <= {case.target_mb:g} MB" if case.target_mb else ""),
            "ok": med <= case.target_s and (case.target_mb is None or max(rss) <= case.target_mb),
            "n": len(walls),
        }
        rows.append(row)
        print(
            f"{case.name:10s} median {med:.3f} s "
            f"(min {row['min_s']:.3f}, max {row['max_s']:.3f}, n={row['n']}), "
            f"peak {row['peak_mb']:.0f} MB, {row['ratio']:.2f}x the torch floor, target {row['target']}: "
            f"{'met' if row['ok'] else 'MISSED'}",
            flush=True,
        )
    if rows and not args.only:
        write_table(rows)
    return 0


def write_table(rows: list[dict[str, object]]) -> None:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()} (whole process: `trainmedic check PATH`).",
        "",
        "| case | what | median wall | min-max | peak RSS | ratio to torch floor (baseline) | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['case']}` | {r['what']} | {r['median_s']:.3f} s | {r['min_s']:.3f}-{r['max_s']:.3f} s "
            f"(n={r['n']}) | {r['peak_mb']:.0f} MB | {r['ratio']:.2f}x ({r['baseline']}) | {r['target']} | "
            f"{'yes' if r['ok'] else 'NO'} |"
        )
    text = README.read_text()
    block = "<!-- results:start -->\n" + "\n".join(lines) + "\n<!-- results:end -->"
    text = re.sub(r"<!-- results:start -->.*<!-- results:end -->", block, text, flags=re.S)
    README.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
