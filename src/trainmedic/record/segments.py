"""Split a log's step records into training runs, and dedupe a run's records by step.

Two trainings in one store must never be merged into one curve: a diverging second training
would hide behind a healthy first one. A run starts at a banner with a new `run_id`, or where the
step counter restarts (a step at or below the run's first step) without a banner. A step that goes
back to a point inside the current run is a resume from a checkpoint: the records overlap and the
latest record for each step wins. A banner that resumes a run (same `run_id`) after its
`run_complete` reopens it: the earlier ending no longer describes how the run ended.

The live watcher's `event`/`action` records of the judged run go to `Run.events`/`Run.actions` in
record order (a resumed run keeps the events of the attempt it replaced: they happened). Its
`run_complete` records (the ones with a `status`) are appended to `Run.events` too, with
`"type": "run_complete"`; any that a later resume superseded carry `"superseded": True`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainmedic.record.jsonlog import EVAL, GRAD_NORM, LOSS, LR, LogRecords, Marker
from trainmedic.run import Run, Series, TrainingRunInfo


@dataclass
class Segment:
    """Step records `[start, end)` of one training run, with the markers that belong to it."""

    start: int
    end: int
    banner: dict[str, Any] | None = None
    complete: dict[str, Any] | None = None  # the run_complete record, when one was written
    markers: list[Marker] = field(default_factory=list)

    @property
    def run_id(self) -> Any:
        for source in (self.banner, self.complete):
            if source is not None and source.get("run_id") is not None:
                return source["run_id"]
        return None

    def __len__(self) -> int:
        return self.end - self.start


def split_runs(steps: np.ndarray, markers: Sequence[Marker]) -> list[Segment]:
    """Training runs in record order; a run with neither steps nor a banner is dropped."""
    n = int(steps.shape[0])
    # Only a non-increasing step can restart the counter: every later step of a run is above its
    # first one, so a step at or below the first is also at or below its predecessor.
    drops = (np.flatnonzero(steps[1:] <= steps[:-1]) + 1).tolist()
    events: list[tuple[int, int, Marker | None]] = [(m.pos, 0, m) for m in markers]
    events += [(i, 1, None) for i in drops]
    events.sort(key=lambda e: (e[0], e[1]))

    segs = [Segment(0, n)]
    for pos, _, marker in events:
        cur = segs[-1]
        if marker is None:
            if pos > cur.start and steps[pos] <= steps[cur.start]:
                segs.append(Segment(pos, n))
                cur.end = pos
            continue
        if marker.type == "banner":
            new_id = marker.fields.get("run_id")
            fresh = pos == cur.start and cur.banner is None and cur.complete is None
            same = new_id is not None and cur.run_id is not None and str(new_id) == str(cur.run_id)
            if not fresh and not same:
                cur.end = pos
                cur = Segment(pos, n)
                segs.append(cur)
            elif same:
                cur.complete = None
            cur.banner = marker.fields
        elif marker.type == "run_complete":
            cur.complete = marker.fields
        cur.markers.append(marker)
    return [s for s in segs if len(s) or s.banner is not None or s.complete is not None]


def dedupe_latest(steps: np.ndarray, values: np.ndarray) -> Series:
    """Sort by step; where a step repeats (a resume replayed it) the latest record wins."""
    if steps.shape[0] == 0:
        return Series.empty()
    if steps.shape[0] == 1 or bool(np.all(steps[1:] > steps[:-1])):
        return Series.of(steps, values)
    order = np.argsort(steps, kind="stable")
    s = steps[order]
    keep = np.empty(s.shape[0], dtype=bool)
    keep[:-1] = s[1:] != s[:-1]
    keep[-1] = True
    return Series.of(s[keep], values[order][keep])


@dataclass
class Curves:
    train_loss: Series
    learning_rate: Series
    grad_norm: Series
    eval_loss: Series


def segment_curves(rec: LogRecords, seg: Segment) -> Curves:
    """Per-field curves of one run: each field keeps only the records that logged it."""
    sl = slice(seg.start, seg.end)
    steps = np.frombuffer(rec.step, dtype=np.int64)[sl] if len(rec) else np.zeros(0, np.int64)
    present = np.frombuffer(rec.present, dtype=np.uint8)[sl] if len(rec) else np.zeros(0, np.uint8)

    def curve(bit: int, column: Any) -> Series:
        if not len(rec):
            return Series.empty()
        vals = np.frombuffer(column, dtype=np.float64)[sl]
        mask = (present & bit) != 0
        if bool(mask.all()):
            return dedupe_latest(steps.copy(), vals.copy())
        return dedupe_latest(steps[mask], vals[mask])

    evals = [m for m in seg.markers if m.type == "eval"]
    return Curves(
        train_loss=curve(LOSS, rec.loss),
        learning_rate=curve(LR, rec.lr),
        grad_norm=curve(GRAD_NORM, rec.grad_norm),
        eval_loss=_merge_evals(rec, seg, evals) if evals else curve(EVAL, rec.eval_loss),
    )


def segment_extras(rec: LogRecords, seg: Segment) -> dict[str, Series]:
    """Extra curves (DPO rewards, entropy, ...) of one run, deduped like the main curves."""
    if not rec.extra:
        return {}
    steps = np.frombuffer(rec.step, dtype=np.int64)
    out = {}
    for key, (index, values) in rec.extra.items():
        idx = np.frombuffer(index, dtype=np.int64)
        mask = (idx >= seg.start) & (idx < seg.end)
        if bool(mask.any()):
            out[key] = dedupe_latest(steps[idx[mask]], np.frombuffer(values, dtype=np.float64)[mask])
    return out


def _merge_evals(rec: LogRecords, seg: Segment, evals: list[Marker]) -> Series:
    """Eval losses of step records and of `eval` records, in record order, latest wins.

    A marker at `pos` was written before step record `pos`, so it sorts at `2*pos`, between step
    records `pos-1` (`2*pos-1`) and `pos` (`2*pos+1`).
    """
    sl = slice(seg.start, seg.end)
    idx = np.arange(seg.start, seg.end, dtype=np.int64)
    if len(rec):
        mask = (np.frombuffer(rec.present, dtype=np.uint8)[sl] & EVAL) != 0
        col_steps = np.frombuffer(rec.step, dtype=np.int64)[sl][mask]
        col_vals = np.frombuffer(rec.eval_loss, dtype=np.float64)[sl][mask]
        col_keys = 2 * idx[mask] + 1
    else:
        col_steps, col_vals, col_keys = (np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))
    keys = np.concatenate([col_keys, np.array([2 * m.pos for m in evals], dtype=np.int64)])
    steps = np.concatenate([col_steps, np.array([m.fields["step"] for m in evals], dtype=np.int64)])
    vals = np.concatenate([col_vals, np.array([m.fields["eval_loss"] for m in evals], dtype=np.float64)])
    order = np.argsort(keys, kind="stable")
    return dedupe_latest(steps[order], vals[order])


def segment_files(rec: LogRecords, seg: Segment) -> list[str]:
    """The log files that hold records (or markers) of this run."""
    idx: set[int] = {m.file for m in seg.markers}
    for i, start in enumerate(rec.file_starts):
        end = rec.file_starts[i + 1] if i + 1 < len(rec.file_starts) else len(rec)
        if start < seg.end and end > seg.start:
            idx.add(i)
    return [str(rec.files[i]) for i in sorted(idx)]


def fill_latest_run(
    run: Run,
    rec: LogRecords,
    label_for: Callable[[Segment, int], str],
    choose: Callable[[LogRecords, list[Segment]], int] | None = None,
) -> Segment | None:
    """Put the latest training run's curves into `run` and list the other runs.

    `choose(rec, segments)` may pick another run than the latest (its index). Returns the judged
    segment (None when the logs hold no run at all). The log's problems, notes and files are
    carried over to `run`.
    """
    run.sources.extend(rec.files)
    run.problems.extend(rec.problems)
    run.notes.extend(rec.notes)
    segs = split_runs(
        np.frombuffer(rec.step, dtype=np.int64) if len(rec) else np.zeros(0, np.int64), rec.markers
    )
    if not segs:
        return None
    judged = choose(rec, segs) if choose is not None else len(segs) - 1
    for i, seg in enumerate(segs):
        if i == judged:
            continue
        c = segment_curves(rec, seg)
        final = float(c.train_loss.values[-1]) if len(c.train_loss) else None
        run.other_runs.append(
            TrainingRunInfo(
                label=label_for(seg, i),
                steps=len(c.train_loss),
                first_step=int(c.train_loss.steps[0]) if len(c.train_loss) else 0,
                last_step=int(c.train_loss.steps[-1]) if len(c.train_loss) else 0,
                final_loss=final if final is not None and math.isfinite(final) else None,
                files=segment_files(rec, seg),
            )
        )
    seg = segs[judged]
    c = segment_curves(rec, seg)
    run.train_loss, run.learning_rate = c.train_loss, c.learning_rate
    run.grad_norm, run.eval_loss = c.grad_norm, c.eval_loss
    run.label = label_for(seg, judged)
    run.extra = segment_extras(rec, seg)
    _live_records(run, seg)
    # A writer of this family ends a run with run_complete; logs without banners make no such promise.
    run.completed = True if seg.complete is not None else (False if seg.banner is not None else None)
    if seg.complete is not None and seg.complete.get("status") in ("stopped", "crashed"):
        run.completed = False  # the watcher's record of a run that ended before its planned end
    max_steps = (seg.banner or {}).get("max_steps")
    if type(max_steps) is int and max_steps > 0:
        run.max_steps = max_steps
    if len(segs) > 1:
        which = "the latest" if judged == len(segs) - 1 else "the one asked for"
        run.notes.append(
            f"the logs hold {len(segs)} training runs; judging {which} ({run.label}), "
            f"the others are listed, not judged"
        )
    return seg


def run_holding(run_id: str | None, step: int) -> Callable[[LogRecords, list[Segment]], int]:
    """A `choose` for `fill_latest_run`: the latest run with `run_id` (a checkpoint's own record of
    the run that saved it), else the latest run whose logged steps reach `step`, else the latest."""

    def choose(rec: LogRecords, segs: list[Segment]) -> int:
        if run_id is not None:
            named = [i for i, s in enumerate(segs) if s.run_id is not None and str(s.run_id) == run_id]
            if named:
                return named[-1]
        steps = np.frombuffer(rec.step, dtype=np.int64) if len(rec) else np.zeros(0, np.int64)
        for i in range(len(segs) - 1, -1, -1):
            seg = segs[i]
            if len(seg) and int(steps[seg.start : seg.end].max()) >= step:
                return i
        return len(segs) - 1

    return choose


def _live_records(run: Run, seg: Segment) -> None:
    """What a live watcher recorded for the judged run (see the module docstring)."""
    for m in seg.markers:
        if m.type == "event":
            run.events.append(dict(m.fields))
        elif m.type == "action":
            run.actions.append(dict(m.fields))
    for m in seg.markers:
        if m.type == "run_complete" and "status" in m.fields:
            end: dict[str, Any] = {"type": "run_complete", **m.fields}
            if m.fields is not seg.complete:
                end["superseded"] = True
            run.events.append(end)


def run_label(seg: Segment, ordinal: int) -> str:
    """`run <run_id>` from the banner, else `run <n>` counting from 1 in log order."""
    rid = seg.run_id
    return f"run {rid}" if rid is not None and str(rid) != "" else f"run {ordinal + 1}"
