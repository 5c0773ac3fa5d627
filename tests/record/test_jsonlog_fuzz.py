"""Fuzz the JSONL reader: random lines and bytes never raise, and problems carry file:line."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from trainmedic.record.jsonlog import read_logs
from trainmedic.record.load import load_run

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
record = st.fixed_dictionaries(
    {"type": st.sampled_from(["step", "banner", "run_complete", "event", 3, None])},
    optional={
        "step": json_values | st.integers(-(2**70), 2**70),
        "loss": json_values,
        "lr": json_values,
        "grad_norm": json_values,
        "val_loss": json_values,
        "run_id": json_values,
        "adapter_version": json_values,
    },
)
line = (
    record.map(lambda r: json.dumps(r).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=40)
    | st.sampled_from([b"NaN", b'{"step": 1, "loss": NaN}', b'{"step": 2, "loss": -Infinity}', b"[" * 3000])
)


def _write(folder: str, data: bytes) -> Path:
    path = Path(folder) / "log.jsonl"
    path.write_bytes(data)
    return path


@settings(max_examples=150, deadline=None)
@given(st.lists(line, max_size=12), st.booleans())
def test_random_lines_never_raise_and_problems_carry_lines(lines: list[bytes], trailing: bool) -> None:
    data = b"\n".join(lines) + (b"\n" if trailing else b"")
    with tempfile.TemporaryDirectory() as folder:
        path = _write(folder, data)
        rec = read_logs([path])
    n_lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    assert len(rec.step) == len(rec.loss) == len(rec.lr) == len(rec.grad_norm) == len(rec.present)
    for p in rec.problems:
        assert p.path == str(path)
        assert p.line is None or 1 <= p.line <= n_lines
        assert p.line is not None or p.message.startswith("and ")


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_through_load_run_never_raise(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = _write(folder, data)
        run = load_run(path)
    assert run.layout in {"JSONL log", "trainmedic run log"}
    assert all(p.artifact == "log" and p.path == str(path) for p in run.problems)  # no internal error
    assert all(p.line is not None or p.message.startswith("and ") for p in run.problems)
    assert len(run.train_loss.steps) == len(run.train_loss.values)
