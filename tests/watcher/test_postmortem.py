"""The postmortem: atomic, strict JSON, says how the run ended and why, and reads back safely."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from trainmedic.record.errors import ReadError
from trainmedic.watcher import postmortem
from trainmedic.watcher.postmortem import POSTMORTEM_NAME, SCHEMA_VERSION, read_postmortem, write_postmortem


@dataclass
class FakeEvent:
    step: int
    rule: str
    severity: str
    message: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)


def _refuse(literal: str) -> None:
    raise AssertionError(f"non-strict JSON literal {literal}")


def _write(out: Path, **over: Any) -> Path:
    args: dict[str, Any] = {
        "status": "completed",
        "reason": "reached max_steps",
        "last_vitals": {"step": 60, "loss": 0.61, "grad_norm": 0.4},
        "events": [],
        "actions": [],
        "config": {"zclip_z": 2.5},
        "versions": {"python": "3.11"},
        "elapsed_s": 12.5,
    }
    args.update(over)
    return write_postmortem(out, **args)


def _boom() -> None:
    raise RuntimeError("CUDA out of memory at step 37")


def test_crash_postmortem_has_reason_exception_and_counts(tmp_path: Path) -> None:
    try:
        _boom()
    except RuntimeError as exc:
        error = exc
    events = [
        {"type": "event", "step": 37, "rule": "nonfinite_loss", "severity": "fail", "message": "NaN"},
        FakeEvent(40, "loss_spike", "warn"),
        FakeEvent(41, "loss_spike", "warn"),
    ]
    actions = [{"step": 37, "action": "skip", "reason": "NaN"}, {"step": 50, "action": "clip", "reason": "z"}]
    path = _write(
        tmp_path,
        status="crashed",
        reason="",
        last_vitals={"step": 37, "loss": math.nan, "grad_norm": math.inf},
        events=events,
        actions=actions,
        exception=error,
    )
    assert path == tmp_path / POSTMORTEM_NAME
    data = json.loads(path.read_text(), parse_constant=_refuse)
    assert data["schema_version"] == SCHEMA_VERSION and data["status"] == "crashed"
    assert data["exit_reason"] == "The run crashed at step 37: RuntimeError: CUDA out of memory at step 37"
    assert data["exception"]["type"] == "RuntimeError"
    assert data["exception"]["message"] == "CUDA out of memory at step 37"
    assert "in _boom" in data["exception"]["traceback"]
    assert data["counts"]["events"] == {
        "total": 3,
        "by_severity": {"fail": 1, "warn": 2},
        "by_rule": {"nonfinite_loss": 1, "loss_spike": 2},
    }
    assert data["counts"]["actions"] == {"total": 2, "by_action": {"skip": 1, "clip": 1}}
    assert data["events"][1] == {
        "step": 40,
        "rule": "loss_spike",
        "severity": "warn",
        "message": "",
        "evidence": {},
    }
    assert data["elapsed_s"] == 12.5 and data["config"] == {"zclip_z": 2.5}


def test_non_finite_values_are_null_with_a_note(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        last_vitals={"step": 5, "loss": math.nan, "grad_norm": -math.inf},
        events=[FakeEvent(5, "nonfinite_loss", "fail", evidence={"values": [1.0, math.inf]})],
    )
    data = json.loads(path.read_text(), parse_constant=_refuse)
    assert data["last_vitals"] == {"step": 5, "loss": None, "grad_norm": None}
    assert data["events"][0]["evidence"]["values"] == [1.0, None]
    assert data["notes"] == [
        "last_vitals.loss: NaN written as null",
        "last_vitals.grad_norm: -Infinity written as null",
        "events[0].evidence.values[1]: Infinity written as null",
    ]


def test_write_is_atomic_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _write(tmp_path, reason="first")
    before = first.read_bytes()

    def fail_rename(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail_rename)
    with pytest.raises(OSError):
        _write(tmp_path, status="crashed", reason="second")
    assert first.read_bytes() == before  # the reader still sees the complete previous file
    assert sorted(p.name for p in tmp_path.iterdir()) == [POSTMORTEM_NAME]
    monkeypatch.undo()
    _write(tmp_path, status="stopped", reason="third")
    assert sorted(p.name for p in tmp_path.iterdir()) == [POSTMORTEM_NAME]
    assert read_postmortem(tmp_path)["reason"] == "third"


def test_exit_reason_is_one_plain_sentence(tmp_path: Path) -> None:
    data = read_postmortem(_write(tmp_path, status="stopped", reason="3 skipped updates in a row"))
    assert data["exit_reason"] == "The run was stopped at step 60: 3 skipped updates in a row"
    data = read_postmortem(_write(tmp_path, last_vitals=None, reason=""))
    assert data["exit_reason"] == "The run completed."
    assert data["last_vitals"] is None and data["exception"] is None


def test_objects_with_to_record_and_pydantic_configs_are_accepted(tmp_path: Path) -> None:
    from pydantic import BaseModel

    class Cfg(BaseModel):
        spike_k: float = 6.0

    class Rec:
        def to_record(self) -> dict[str, Any]:
            return {"type": "action", "step": 3, "action": "skip", "reason": "r", "detail": {}}

    data = read_postmortem(_write(tmp_path, actions=[Rec()], config=Cfg()))
    assert data["config"] == {"spike_k": 6.0}
    assert data["actions"][0]["action"] == "skip"


def test_long_lists_are_capped_but_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postmortem, "MAX_LISTED", 3)
    events = [FakeEvent(i, "loss_spike", "warn") for i in range(10)]
    data = read_postmortem(_write(tmp_path, events=events))
    assert len(data["events"]) == 3 and data["events_not_listed"] == 7
    assert data["counts"]["events"]["total"] == 10


def test_bad_status_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="status"):
        _write(tmp_path, status="ok")
    assert not (tmp_path / POSTMORTEM_NAME).exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"status": "completed"}', "schema_version"),
        (b'{"schema_version": 99, "status": "completed"}', "newer"),
        (b'{"schema_version": 1, "status": "fine"}', "'status'"),
    ],
)
def test_bad_files_raise_a_read_error_naming_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / POSTMORTEM_NAME
    path.write_bytes(content)
    with pytest.raises(ReadError, match=message) as info:
        read_postmortem(path)
    assert info.value.path == str(path)


def test_missing_file_is_a_read_error(tmp_path: Path) -> None:
    with pytest.raises(ReadError, match="cannot read"):
        read_postmortem(tmp_path)
