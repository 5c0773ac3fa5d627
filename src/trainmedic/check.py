"""`check`: read a run's files, run the probes, and return a report; never imports torch."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from trainmedic.findings import Finding, RunReport, Verdict
from trainmedic.probes.base import run_probe
from trainmedic.record.load import load_run
from trainmedic.run import Run, Series
from trainmedic.signals.downsample import downsample
from trainmedic.spec import CheckSpec

MAX_CURVE_POINTS = 512
# Below this many paths a process pool costs more to start than it saves.
PARALLEL_MIN_PATHS = 24


def check_path(path: Path, spec: CheckSpec) -> RunReport:
    """Audit one PATH (store, output dir, checkpoint or log file)."""
    t0 = time.perf_counter()
    run = load_run(path)
    findings = [run_probe(probe, run, probe_spec) for probe, probe_spec in spec.selected()]
    read = _read_finding(run, findings)
    if read is not None:
        findings.insert(0, read)
    report = RunReport(
        path=str(path),
        layout=run.layout,
        findings=findings,
        run_label=run.label,
        sources=[str(p) for p in run.sources],
        notes=run.notes + [f"tolerated: {p}" for p in run.problems if not p.fatal],
        other_runs=[asdict(o) for o in run.other_runs],
        curves=_curves(run),
    )
    report.duration_s = time.perf_counter() - t0
    return report


def check_paths(paths: Sequence[Path], spec: CheckSpec, *, jobs: int | None = None) -> list[RunReport]:
    """Audit several PATHs, on several cores when there are enough of them to pay for it."""
    workers = jobs if jobs is not None else min(len(paths) // PARALLEL_MIN_PATHS, os.cpu_count() or 1)
    if workers <= 1 or len(paths) < 2:
        return [check_path(p, spec) for p in paths]
    from concurrent.futures import ProcessPoolExecutor

    chunk = max(1, math.ceil(len(paths) / (workers * 4)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(check_path, paths, [spec] * len(paths), chunksize=chunk))


def _read_finding(run: Run, findings: list[Finding]) -> Finding | None:
    """One ERROR for files that could not be read and that no probe already reported.

    A corrupt file must fail a CI gate even when the rest of the run could be judged.
    """
    reported = {p for f in findings if f.verdict is Verdict.ERROR for p in f.evidence.get("problems", [])}
    fatal = [p for p in run.problems if p.fatal and str(p) not in reported]
    if not fatal:
        return None
    head = fatal[0]
    more = f" (and {len(fatal) - 1} more)" if len(fatal) > 1 else ""
    return Finding(
        name="files",
        kind="read",
        verdict=Verdict.ERROR,
        message=f"could not read {head}{more}",
        evidence={"problems": [str(p) for p in fatal[:20]], "count": len(fatal)},
    )


def _curves(run: Run) -> dict[str, dict[str, list[float | None]]]:
    named: dict[str, Series] = {
        "train_loss": run.train_loss,
        "eval_loss": run.eval_loss,
        "grad_norm": run.grad_norm,
        "learning_rate": run.learning_rate,
    }
    out: dict[str, dict[str, list[float | None]]] = {}
    for name, series in named.items():
        if len(series) == 0:
            continue
        steps, values = downsample(series.steps, series.values, max_points=MAX_CURVE_POINTS)
        out[name] = {
            "steps": [int(s) for s in steps],
            "values": [float(v) if math.isfinite(v) else None for v in values.tolist()],
        }
    return out
