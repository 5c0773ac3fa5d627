"""The JSONL `type`-record reader: columns, markers, and problems with file:line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from trainmedic.record import jsonlog
from trainmedic.record.jsonlog import EVAL, GRAD_NORM, LOSS, LR, read_logs


def write_lines(path: Path, lines: list[object], *, trailing_newline: bool = True) -> Path:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    path.write_text(text + ("\n" if trailing_newline else ""))
    return path


def step(n: int, loss: float = 1.0, **extra: object) -> dict[str, object]:
    return {"type": "step", "step": n, "loss": loss, "lr": 1e-3, "grad_norm": 0.5, **extra}


def test_step_fields_become_columns(tmp_path: Path) -> None:
    log = write_lines(tmp_path / "a.jsonl", [step(1, 2.0), step(2, 1.5, val_loss=1.7), step(3, 1.2)])
    rec = read_logs([log])
    assert list(rec.step) == [1, 2, 3]
    assert list(rec.loss) == [2.0, 1.5, 1.2]
    assert rec.eval_loss[1] == 1.7
    assert rec.present[1] == LOSS | LR | GRAD_NORM | EVAL
    assert rec.present[0] == LOSS | LR | GRAD_NORM
    assert rec.problems == []
    assert rec.files == [log]


def test_learning_rate_and_eval_loss_aliases(tmp_path: Path) -> None:
    rec = read_logs(
        [write_lines(tmp_path / "a.jsonl", [{"step": 5, "learning_rate": 0.25, "eval_loss": 3.0}])]
    )
    assert rec.lr[0] == 0.25
    assert rec.eval_loss[0] == 3.0
    assert rec.present[0] == LR | EVAL


def test_null_values_are_absent_not_nan(tmp_path: Path) -> None:
    rec = read_logs(
        [write_lines(tmp_path / "a.jsonl", [{"type": "step", "step": 1, "loss": 1.0, "val_loss": None}])]
    )
    assert rec.present[0] == LOSS
    assert rec.problems == []


def test_nan_and_infinity_literals_are_non_finite_values(tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    log.write_text(
        '{"type": "step", "step": 1, "loss": NaN, "grad_norm": Infinity}\n'
        '{"type": "step", "step": 2, "loss": -Infinity, "grad_norm": 1.0}\n'
    )
    rec = read_logs([log])
    assert math.isnan(rec.loss[0])
    assert rec.grad_norm[0] == math.inf
    assert rec.loss[1] == -math.inf
    assert rec.present[0] & LOSS
    assert rec.problems == []


def test_dlm_nan_step_logged_as_zero_loss_becomes_nan(tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    log.write_text(
        '{"type": "step", "step": 10, "loss": 0.9, "grad_norm": 1.0}\n'
        '{"type": "step", "step": 20, "loss": 0.0, "grad_norm": NaN}\n'
        '{"type": "step", "step": 30, "loss": 0.0, "grad_norm": 0.0}\n'
    )
    rec = read_logs([log])
    assert rec.loss[0] == 0.9
    assert math.isnan(rec.loss[1])
    assert rec.loss[2] == 0.0  # a genuine zero with a finite grad norm is left alone
    assert rec.nan_loss_as_zero == 1
    assert any("NaN step" in n for n in rec.notes)


def test_marker_records_are_placed_between_steps(tmp_path: Path) -> None:
    log = write_lines(
        tmp_path / "a.jsonl",
        [
            {"type": "banner", "run_id": "r1", "writer": "trainmedic", "plan": {"big": [1, 2]}},
            step(1),
            {"type": "delta", "new": ["x"]},
            step(2),
            {"type": "run_complete", "run_id": "r1", "adapter_version": 3},
        ],
    )
    rec = read_logs([log])
    assert [(m.type, m.pos, m.line) for m in rec.markers] == [("banner", 0, 1), ("run_complete", 2, 5)]
    assert rec.markers[0].fields == {"run_id": "r1", "writer": "trainmedic"}  # nested plan not kept
    assert rec.writers() == {"trainmedic"}


def test_other_record_types_are_ignored(tmp_path: Path) -> None:
    log = write_lines(tmp_path / "a.jsonl", [{"type": "event", "step": 3, "loss": "x"}, step(1)])
    rec = read_logs([log])
    assert list(rec.step) == [1]
    assert rec.problems == []


def test_garbage_line_is_a_fatal_problem_with_line(tmp_path: Path) -> None:
    log = write_lines(tmp_path / "a.jsonl", [step(1), "this is not json", step(2)])
    rec = read_logs([log])
    assert list(rec.step) == [1, 2]
    (p,) = rec.problems
    assert (p.path, p.line, p.fatal, p.artifact) == (str(log), 2, True, "log")
    assert "not valid JSON" in p.message


def test_non_object_lines_are_reported(tmp_path: Path) -> None:
    log = write_lines(tmp_path / "a.jsonl", ["[1, 2]", '"text"', "42", "null", step(1)])
    rec = read_logs([log])
    assert [p.line for p in rec.problems] == [1, 2, 3, 4]
    assert all(p.fatal and "expected a JSON object" in p.message for p in rec.problems)
    assert "an array" in rec.problems[0].message
    assert list(rec.step) == [1]


def test_string_or_bool_where_number_belongs(tmp_path: Path) -> None:
    log = write_lines(
        tmp_path / "a.jsonl",
        [{"type": "step", "step": 1, "loss": "abc", "lr": 0.1}, {"type": "step", "step": 2, "loss": True}],
    )
    rec = read_logs([log])
    assert list(rec.step) == [1, 2]  # the record stays, the bad value does not
    assert rec.present[0] == LR
    assert rec.present[1] == 0
    assert [(p.line, "'loss' is not a number" in p.message) for p in rec.problems] == [(1, True), (2, True)]
    assert "'abc'" in rec.problems[0].message


def test_missing_or_unusable_step_skips_the_record(tmp_path: Path) -> None:
    lines = [
        {"type": "step", "loss": 1.0},
        {"type": "step", "step": "7", "loss": 1.0},
        {"type": "step", "step": 1.5, "loss": 1.0},
        {"type": "step", "step": True, "loss": 1.0},
        {"type": "step", "step": 4.0, "loss": 1.0},
    ]
    rec = read_logs([write_lines(tmp_path / "a.jsonl", lines)])
    assert list(rec.step) == [4]
    assert [p.line for p in rec.problems] == [1, 2, 3, 4]
    assert all("'step'" in p.message for p in rec.problems)


def test_out_of_range_numbers_are_problems_not_crashes(tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    log.write_text(
        '{"type": "step", "step": 99999999999999999999999, "loss": 1.0}\n'
        '{"type": "step", "step": 2, "loss": 1' + "0" * 400 + "}\n"
    )
    rec = read_logs([log])
    assert list(rec.step) == [2]
    assert rec.present[0] == 0
    assert [p.line for p in rec.problems] == [1, 2]


def test_truncated_last_line_is_tolerated_and_noted(tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    log.write_text(json.dumps(step(1)) + "\n" + json.dumps(step(2)) + "\n" + '{"type": "step", "st')
    rec = read_logs([log])
    assert list(rec.step) == [1, 2]
    (p,) = rec.problems
    assert (p.line, p.fatal) == (3, False)
    assert "last line truncated (crash mid-write?)" in p.message


def test_unterminated_but_complete_last_line_is_read(tmp_path: Path) -> None:
    log = write_lines(tmp_path / "a.jsonl", [step(1), step(2)], trailing_newline=False)
    rec = read_logs([log])
    assert list(rec.step) == [1, 2]
    assert rec.problems == []


def test_blank_lines_are_skipped_silently(tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    log.write_text("\n" + json.dumps(step(1)) + "\n   \n\n" + json.dumps(step(2)) + "\n")
    rec = read_logs([log])
    assert list(rec.step) == [1, 2]
    assert rec.problems == []


def test_problems_are_capped_per_file(tmp_path: Path) -> None:
    log = write_lines(tmp_path / "a.jsonl", ["garbage"] * 50 + [json.dumps(step(1))])
    rec = read_logs([log])
    assert len(rec.problems) == jsonlog.MAX_PROBLEMS_PER_FILE + 1
    assert rec.problems[-1].message == "and 30 more problem(s) in this file"
    assert rec.problems[-1].fatal
    assert list(rec.step) == [1]


def test_files_concatenate_in_the_given_order(tmp_path: Path) -> None:
    a = write_lines(tmp_path / "a.jsonl", [step(1), step(2)])
    b = write_lines(tmp_path / "b.jsonl", [step(3)])
    rec = read_logs([a, b])
    assert list(rec.step) == [1, 2, 3]
    assert rec.file_starts == [0, 2]
    assert rec.files == [a, b]


def test_overlong_line_is_skipped_without_reading_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jsonlog, "MAX_LINE_BYTES", 200)
    log = write_lines(tmp_path / "a.jsonl", [step(1), {"type": "step", "step": 2, "pad": "x" * 500}, step(3)])
    rec = read_logs([log])
    assert list(rec.step) == [1, 3]
    (p,) = rec.problems
    assert p.line == 2 and "longer than" in p.message


def test_empty_file_is_noted(tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    log.write_bytes(b"")
    rec = read_logs([log])
    assert len(rec) == 0
    assert any("empty" in n for n in rec.notes)


def test_columns_are_numpy_viewable(tmp_path: Path) -> None:
    rec = read_logs([write_lines(tmp_path / "a.jsonl", [step(i, 1.0 / i) for i in range(1, 6)])])
    assert np.frombuffer(rec.step, dtype=np.int64).tolist() == [1, 2, 3, 4, 5]
    assert np.frombuffer(rec.loss, dtype=np.float64)[-1] == pytest.approx(0.2)
