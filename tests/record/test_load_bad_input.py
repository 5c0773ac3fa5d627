"""Bad input never raises: every problem names the file (and line) and the rest is still read."""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

import pytest

from trainmedic.record.load import load_run
from trainmedic.run import Run


def step(n: int, loss: float = 1.0) -> str:
    return json.dumps({"type": "step", "step": n, "loss": loss, "lr": 1e-3, "grad_norm": 0.5})


def dlm_store(tmp_path: Path, first: list[str], second: list[str]) -> tuple[Path, Path, Path]:
    logs = tmp_path / "store" / "logs"
    logs.mkdir(parents=True)
    a = logs / "train-000001-20260101T000000.jsonl"
    b = logs / "train-000002-20260102T000000.jsonl"
    a.write_text("".join(line + "\n" for line in first))
    b.write_text("".join(line + "\n" for line in second))
    return tmp_path / "store", a, b


def load_with_timeout(path: Path, seconds: float = 10.0) -> Run:
    """A reader that opened a FIFO would block forever; fail the test instead of hanging."""
    result: list[Run] = []
    worker = threading.Thread(target=lambda: result.append(load_run(path)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert result, "load_run blocked"
    return result[0]


def test_empty_directory(tmp_path: Path) -> None:
    run = load_run(tmp_path)
    assert run.layout == "empty"
    assert "no training artifacts found" in run.notes
    assert not run.has_log


def test_unknown_layout_says_what_it_found(tmp_path: Path) -> None:
    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    (tmp_path / "subdir").mkdir()
    run = load_run(tmp_path)
    assert run.layout == "unknown"
    assert any("photo.png" in n and "subdir" in n for n in run.notes)


def test_truncated_last_line_is_tolerated_and_noted(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    log.write_text(step(1) + "\n" + step(2) + "\n" + '{"type": "step", "step": 3, "lo')
    run = load_run(log)
    assert run.train_loss.steps.tolist() == [1, 2]
    (p,) = run.problems
    assert (p.line, p.fatal) == (3, False)
    assert str(p) == f"{log}:3: last line truncated (crash mid-write?); ignored"


def test_garbage_first_line_of_one_log_file(tmp_path: Path) -> None:
    store, a, _ = dlm_store(
        tmp_path,
        ["\x00\x01 garbage \xff", step(10), step(20)],
        [json.dumps({"type": "banner", "run_id": 2}), step(10, 0.5), step(20, 0.4)],
    )
    run = load_run(store)
    assert run.layout == "dlm store"
    (p,) = run.problems
    assert (p.path, p.line, p.fatal) == (str(a), 1, True)
    assert str(p).startswith(f"{a}:1: not valid JSON")
    assert run.train_loss.values.tolist() == [0.5, 0.4]  # the other file's steps were read
    assert run.other_runs[0].steps == 2  # and so was the rest of the bad file


def test_binary_garbage_is_reported_not_raised(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    log.write_bytes(b"\xff\xfe\x00garbage\n" + step(1).encode() + b"\n" + b"\xc3\x28\n")
    run = load_run(log)
    assert run.train_loss.steps.tolist() == [1]
    assert [p.line for p in run.problems] == [1, 3]


def test_non_object_json_lines(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    log.write_text("[1, 2, 3]\n" + step(1) + '\n"just a string"\n')
    run = load_run(log)
    assert [(p.line, "expected a JSON object" in p.message) for p in run.problems] == [(1, True), (3, True)]
    assert len(run.train_loss) == 1


def test_strings_where_numbers_belong(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    log.write_text(
        step(1) + '\n{"type": "step", "step": 2, "loss": "abc", "grad_norm": "1e-3"}\n' + step(3) + "\n"
    )
    run = load_run(log)
    assert run.train_loss.steps.tolist() == [1, 3]
    assert [str(p) for p in run.problems] == [
        f"{log}:2: 'loss' is not a number ('abc'); value ignored",
        f"{log}:2: 'grad_norm' is not a number ('1e-3'); value ignored",
    ]


def test_nan_and_infinity_literals_are_read_as_non_finite(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    log.write_text(
        step(1) + "\n"
        '{"type": "step", "step": 2, "loss": NaN, "grad_norm": Infinity}\n'
        '{"type": "step", "step": 3, "loss": -Infinity, "grad_norm": 1.0}\n'
    )
    run = load_run(log)
    assert math.isnan(run.train_loss.values[1])
    assert run.train_loss.values[2] == -math.inf
    assert run.grad_norm.values[1] == math.inf
    assert run.problems == []


def test_unreadable_log_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, a, _ = dlm_store(tmp_path, [step(10), step(20)], [step(10, 0.5), step(20, 0.4)])
    real_open = Path.open

    def guarded(self: Path, *args: object, **kwargs: object) -> object:
        if self == a:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", guarded)
    run = load_run(store)
    (p,) = run.problems
    assert p.path == str(a) and "Permission denied" in p.message and p.fatal
    assert a not in run.sources
    assert run.train_loss.values.tolist() == [0.5, 0.4]


def test_symlink_loop_as_log_file(tmp_path: Path) -> None:
    store, a, _ = dlm_store(tmp_path, [step(10)], [step(10, 0.5), step(20, 0.4)])
    a.unlink()
    a.symlink_to(a)
    run = load_run(store)
    (p,) = run.problems
    assert p.path == str(a)
    assert "symbolic links" in p.message
    assert run.train_loss.values.tolist() == [0.5, 0.4]


def test_symlink_loop_as_the_path_itself(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    run = load_run(loop)
    assert run.layout == "unknown"
    assert any("loop" in n and "symbolic links" in n for n in run.notes)


def test_fifo_log_file_is_not_opened(tmp_path: Path) -> None:
    store, a, _ = dlm_store(tmp_path, [step(10)], [step(10, 0.5)])
    a.unlink()
    os.mkfifo(a)
    run = load_with_timeout(store)
    (p,) = run.problems
    assert p.path == str(a) and "FIFO" in p.message
    assert run.train_loss.values.tolist() == [0.5]


def test_directory_named_like_a_log_file(tmp_path: Path) -> None:
    store, a, _ = dlm_store(tmp_path, [step(10)], [step(10, 0.5)])
    a.unlink()
    a.mkdir()
    run = load_run(store)
    (p,) = run.problems
    assert p.path == str(a) and "is a directory" in p.message
    assert run.train_loss.values.tolist() == [0.5]


def test_trainer_state_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "trainer_state.json").mkdir()
    run = load_run(tmp_path)
    assert run.layout == "HF output dir"
    (p,) = run.problems
    assert p.path == str(tmp_path / "trainer_state.json") and "not a regular file" in p.message


def test_log_of_only_garbage_has_fatal_log_problems_and_no_curves(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    log.write_text("garbage\nmore garbage\n")
    run = load_run(log)
    assert not run.has_log
    assert len(run.fatal_problems("log")) == 2
