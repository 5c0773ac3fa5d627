"""A `dlm` store: JSONL logs, adapter versions, and eval losses in `metrics.sqlite`.

The latest training run is judged. Its adapter version is the one its `run_complete` record
names; a run that never completed saved no adapter, and judging an older version's optimizer in
its place would pass a broken run on the strength of a healthy earlier one.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import stat
from pathlib import Path
from typing import Any
from urllib.parse import quote

from trainmedic.findings import Problem
from trainmedic.record.hf import is_regular, load_adapter, load_optimizer
from trainmedic.record.jsonlog import open_regular, read_logs
from trainmedic.record.segments import Segment, fill_latest_run, run_label
from trainmedic.run import Run, Series

LOG_RE = re.compile(r"^train-\d+-.*\.jsonl$")
VERSION_RE = re.compile(r"^v(\d+)$")


def is_dlm_store(path: Path) -> bool:
    return bool(log_files(path)) or (path / "adapter" / "versions").is_dir()


def log_files(root: Path) -> list[Path]:
    """`logs/train-*.jsonl` in file-name order (the writer numbers them chronologically)."""
    try:
        names = [e.name for e in os.scandir(root / "logs") if LOG_RE.match(e.name)]
    except OSError:
        return []
    return [root / "logs" / n for n in sorted(names)]


def _version(seg: Segment | None) -> int | None:
    value = (seg.complete or {}).get("adapter_version") if seg is not None else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.lstrip("v").isdigit():
        return int(value.lstrip("v"))
    return None


def _label(seg: Segment, ordinal: int) -> str:
    version = _version(seg)
    base = run_label(seg, ordinal)
    return f"{base} (adapter v{version:04d})" if version is not None else base


def current_version(root: Path, run: Run) -> int | None:
    """The version `adapter/current.txt` points at (e.g. `adapter/versions/v0002`)."""
    path = root / "adapter" / "current.txt"
    if not os.path.lexists(path):
        return None
    fh = open_regular(path, run.problems, artifact="adapter")
    if fh is None:
        return None
    with fh:
        text = fh.read(4096).decode("utf-8", "replace").strip()
    m = VERSION_RE.match(text.rstrip("/").rsplit("/", 1)[-1])
    if m is None:
        run.problems.append(
            Problem(str(path), f"does not name an adapter version: {text[:60]!r}", None, "adapter")
        )
        return None
    return int(m.group(1))


def read_store(root: Path) -> Run:
    run = Run(path=root, layout="dlm store")
    rec = read_logs(log_files(root))
    seg = fill_latest_run(run, rec, _label)

    version = _version(seg)
    if seg is None:
        version = current_version(root, run)
        run.notes.append("no training logs found in logs/")
        if version is not None:
            run.label = f"adapter v{version:04d}"
            run.notes.append(f"judging adapter v{version:04d} named by adapter/current.txt")
    elif seg.complete is None:
        run.notes.append(
            f"the latest training run ({run.label}) never completed (no run_complete record), so it "
            "saved no adapter; older adapter versions are not judged in its place"
        )
    elif version is None:
        version = current_version(root, run)
        if version is not None:
            run.label += f" (adapter v{version:04d})"

    if version is not None:
        vdir = root / "adapter" / "versions" / f"v{version:04d}"
        if vdir.is_dir():
            _read_version(vdir, run)
        else:
            run.notes.append(f"adapter version v{version:04d} not found under adapter/versions/")

    _read_evals(root, run, seg, single_run=not run.other_runs)
    return run


def _read_version(vdir: Path, run: Run) -> None:
    weights = vdir / "adapter_model.safetensors"
    if os.path.lexists(weights):
        run.adapter = load_adapter(weights, run)
    else:
        run.notes.append(f"no adapter_model.safetensors in {vdir.name}: adapter weights not checked")
    state = vdir / "training_state.pt"
    if os.path.lexists(state):
        load_optimizer(state, run, run.adapter)
    else:
        run.notes.append(f"no training_state.pt in {vdir.name}: optimizer state not checked")


def _read_evals(root: Path, run: Run, seg: Segment | None, *, single_run: bool) -> None:
    """Eval losses: the run's rows in metrics.sqlite override val_loss values from its log."""
    db = root / "metrics.sqlite"
    points = dict(zip(run.eval_loss.steps.tolist(), run.eval_loss.values.tolist(), strict=True))
    run_id = seg.run_id if seg is not None else None
    found = False
    if os.path.lexists(db) and (run_id is not None or single_run):
        rows = _sqlite_evals(db, run, run_id)
        if rows is not None:
            run.sources.append(db)
            found = bool(rows)
            points.update(rows)
    if not found and seg is not None and seg.complete is not None:
        found = _summary_eval(root, run, seg, points)
    if points:
        steps = sorted(points)
        run.eval_loss = Series.of(steps, [points[s] for s in steps])


def _sqlite_evals(db: Path, run: Run, run_id: Any) -> dict[int, float] | None:
    try:
        if not stat.S_ISREG(os.stat(db).st_mode):
            run.problems.append(Problem(str(db), "is not a regular file; not read", None, "eval", False))
            return None
        uri = f"file:{quote(str(db.resolve()))}?mode=ro&immutable=1"
        con = sqlite3.connect(uri, uri=True)
        try:
            if run_id is None:
                cur = con.execute("SELECT step, val_loss FROM evals ORDER BY step")
            else:
                cur = con.execute(
                    "SELECT step, val_loss FROM evals WHERE run_id = ? ORDER BY step", (run_id,)
                )
            raw = cur.fetchall()
        finally:
            con.close()
    except (sqlite3.Error, OSError) as exc:
        run.problems.append(Problem(str(db), f"eval losses not read: {exc}", None, "eval", False))
        return None
    rows: dict[int, float] = {}
    bad = 0
    for step, loss in raw:
        if isinstance(step, int) and not isinstance(loss, bool) and isinstance(loss, int | float):
            rows[step] = float(loss)
        elif loss is not None:
            bad += 1
    if bad:
        run.problems.append(
            Problem(str(db), f"{bad} eval row(s) without a numeric step/val_loss", None, "eval", False)
        )
    return rows


def _summary_eval(root: Path, run: Run, seg: Segment, points: dict[int, float]) -> bool:
    """Fallback when metrics.sqlite has nothing: the run summary's final val loss at its last step."""
    name = Path(str(seg.complete.get("summary_path", "")) if seg.complete else "").name
    path = root / "logs" / name
    if not name or not is_regular(path):
        return False
    try:
        with path.open("rb") as fh:
            summary = json.loads(fh.read(1 << 20))
    except (OSError, ValueError, RecursionError):
        run.problems.append(Problem(str(path), "run summary is not readable JSON", None, "eval", False))
        return False
    val = summary.get("final_val_loss") if isinstance(summary, dict) else None
    last = int(run.train_loss.steps[-1]) if len(run.train_loss) else None
    steps = seg.complete.get("steps") if seg.complete else None
    step = steps if isinstance(steps, int) and not isinstance(steps, bool) else last
    if step is None or isinstance(val, bool) or not isinstance(val, int | float) or not math.isfinite(val):
        return False
    points[int(step)] = float(val)
    run.sources.append(path)
    run.notes.append(f"eval loss from the run summary only ({path.name}): one point")
    return True
