"""dlm stores: the real ones written by dlm, and synthetic ones for its surprises."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainmedic.record.load import load_run

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
STORES = SHARED / "dlm_stores"
needs_shared = pytest.mark.skipif(not STORES.is_dir(), reason="shared dlm stores not present")


@needs_shared
def test_healthy_store() -> None:
    run = load_run(STORES / "healthy")
    assert run.layout == "dlm store"
    assert run.label == "run 1 (adapter v0001)"
    assert len(run.train_loss) == 15
    assert run.train_loss.values[0] == pytest.approx(1.23, abs=0.01)
    assert run.train_loss.values[-1] == pytest.approx(0.49, abs=0.01)
    assert run.train_loss.steps[-1] == 150
    assert run.eval_loss.steps.tolist() == [50, 100, 150]
    assert run.eval_loss.values[0] == pytest.approx(0.377, abs=1e-3)
    assert run.completed is True
    assert run.other_runs == []
    assert STORES / "healthy" / "metrics.sqlite" in run.sources
    assert run.adapter is not None
    assert run.adapter.source.parent.name == "v0001"
    assert run.optimizer is not None, [str(p) for p in run.problems]
    assert run.optimizer.global_step == 150
    assert run.problems == []


@needs_shared
def test_retrain_judges_the_second_run_and_lists_the_first() -> None:
    store = STORES / "retrain_two_versions"
    run = load_run(store)
    assert run.layout == "dlm store"
    assert run.label == "run 2 (adapter v0002)"
    assert len(run.train_loss) == 21
    assert run.train_loss.steps.tolist()[:2] == [10, 20]  # step numbering restarted
    assert run.eval_loss.steps.tolist() == [50, 100, 150, 200, 210]  # run 2's evals only
    (first,) = run.other_runs
    assert first.label == "run 1 (adapter v0001)"
    assert (first.steps, first.first_step, first.last_step) == (9, 10, 90)
    assert first.files == [str(store / "logs" / "train-000001-20261121T234210.jsonl")]
    assert run.adapter is not None and run.adapter.source.parent.name == "v0002"
    assert run.optimizer is not None, [str(p) for p in run.problems]
    assert run.optimizer.source.parent.name == "v0002"
    assert run.optimizer.global_step == 210


# --- synthetic stores -------------------------------------------------------------------------


def write_log(path: Path, records: list[dict[str, object] | str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def steps(n: int, loss0: float = 2.0) -> list[dict[str, object] | str]:
    return [
        {"type": "step", "step": 10 * i, "loss": loss0 / i, "lr": 1e-3, "grad_norm": 0.5, "val_loss": None}
        for i in range(1, n + 1)
    ]


def write_version(store: Path, version: int, *, state_bytes: bytes = b"not a torch file") -> Path:
    from safetensors.numpy import save_file

    vdir = store / "adapter" / "versions" / f"v{version:04d}"
    vdir.mkdir(parents=True)
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((4, 8), np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((8, 4), np.float32),
    }
    save_file(tensors, str(vdir / "adapter_model.safetensors"))
    (vdir / "adapter_config.json").write_text('{"r": 4}')
    (vdir / "training_state.pt").write_bytes(state_bytes)
    (store / "adapter" / "current.txt").write_text(f"adapter/versions/v{version:04d}\n")
    return vdir


def write_metrics(store: Path, rows: list[tuple[int, int, float]]) -> None:
    con = sqlite3.connect(store / "metrics.sqlite")
    con.execute("CREATE TABLE evals (run_id INTEGER, step INTEGER, val_loss REAL, perplexity REAL, at TEXT)")
    con.executemany("INSERT INTO evals VALUES (?, ?, ?, NULL, 'now')", rows)
    con.commit()
    con.close()


def two_run_store(tmp_path: Path, *, second_completes: bool, nan_second: bool = False) -> Path:
    store = tmp_path / "store"
    write_log(
        store / "logs" / "train-000001-20260101T000000.jsonl",
        [
            {"type": "banner", "run_id": 1},
            *steps(5),
            {"type": "run_complete", "run_id": 1, "adapter_version": 1},
        ],
    )
    second: list[dict[str, object] | str] = [{"type": "banner", "run_id": 2}, *steps(3)]
    if nan_second:
        second += [
            '{"type": "step", "step": 40, "loss": 0.0, "lr": 0.001, "grad_norm": NaN, "val_loss": null}'
        ]
    if second_completes:
        second.append({"type": "run_complete", "run_id": 2, "adapter_version": 2})
    write_log(store / "logs" / "train-000002-20260102T000000.jsonl", second)
    write_version(store, 1)
    if second_completes:
        write_version(store, 2)
    return store


def test_unfinished_latest_run_does_not_borrow_an_older_adapter(tmp_path: Path) -> None:
    store = two_run_store(tmp_path, second_completes=False, nan_second=True)
    run = load_run(store)
    assert run.label == "run 2"
    assert run.completed is False
    assert run.adapter is None
    assert run.optimizer is None
    assert not any("v0001" in str(s) for s in run.sources)
    assert not run.fatal_problems("optimizer")  # v0001's bogus training_state.pt was never opened
    assert any("never completed" in n and "no adapter" in n for n in run.notes)
    assert math.isnan(run.train_loss.values[-1])
    assert any("NaN step" in n for n in run.notes)
    assert [o.label for o in run.other_runs] == ["run 1 (adapter v0001)"]


def test_completed_latest_run_reads_its_own_version(tmp_path: Path) -> None:
    store = two_run_store(tmp_path, second_completes=True)
    run = load_run(store)
    assert run.label == "run 2 (adapter v0002)"
    assert run.adapter is not None and run.adapter.source.parent.name == "v0002"
    (p,) = run.fatal_problems("optimizer")  # the stand-in training_state.pt is not a torch file
    assert "v0002/training_state.pt" in p.path


def test_completed_run_without_version_falls_back_to_current_txt(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_log(store / "logs" / "train-000001-x.jsonl", [*steps(3), {"type": "run_complete"}])
    write_version(store, 7)
    run = load_run(store)
    assert run.label == "run 1 (adapter v0007)"
    assert run.adapter is not None


def test_missing_version_dir_is_noted(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_log(
        store / "logs" / "train-000001-x.jsonl", [*steps(3), {"type": "run_complete", "adapter_version": 3}]
    )
    (store / "adapter" / "versions").mkdir(parents=True)
    run = load_run(store)
    assert run.adapter is None
    assert any("v0003 not found" in n for n in run.notes)


def test_store_without_logs_judges_the_current_adapter(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_version(store, 2)
    run = load_run(store)
    assert run.layout == "dlm store"
    assert run.label == "adapter v0002"
    assert run.adapter is not None
    assert any("no training logs" in n for n in run.notes)


def test_eval_curve_merges_sqlite_and_log_val_loss(tmp_path: Path) -> None:
    store = tmp_path / "store"
    recs = [{"type": "banner", "run_id": 1}, *steps(4)]
    recs[2] = {**recs[2], "val_loss": 9.0}  # step 20 logged a val_loss in the JSONL too
    write_log(store / "logs" / "train-000001-x.jsonl", recs)
    write_metrics(store, [(1, 20, 0.5), (1, 40, 0.4), (2, 40, 99.0)])
    run = load_run(store)
    assert run.eval_loss.steps.tolist() == [20, 40]
    assert run.eval_loss.values.tolist() == [0.5, 0.4]  # sqlite wins; run 2's row is not ours


def test_corrupt_metrics_sqlite_is_a_non_fatal_eval_problem(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_log(store / "logs" / "train-000001-x.jsonl", [{"type": "banner", "run_id": 1}, *steps(4)])
    (store / "metrics.sqlite").write_bytes(b"SQLite format 3\x00" + b"\xff" * 200)
    run = load_run(store)
    (p,) = [p for p in run.problems if p.artifact == "eval"]
    assert p.path == str(store / "metrics.sqlite")
    assert p.fatal is False
    assert len(run.train_loss) == 4


def test_summary_val_loss_is_the_fallback_eval(tmp_path: Path) -> None:
    store = tmp_path / "store"
    done = {
        "type": "run_complete",
        "run_id": 1,
        "steps": 40,
        "summary_path": "/elsewhere/logs/train-1.summary.json",
    }
    write_log(store / "logs" / "train-000001-x.jsonl", [*steps(4), done])
    (store / "logs" / "train-1.summary.json").write_text('{"final_val_loss": 0.25}')
    run = load_run(store)
    assert run.eval_loss.steps.tolist() == [40]
    assert run.eval_loss.values.tolist() == [0.25]


@needs_shared
def test_loading_a_store_never_imports_torch() -> None:
    code = (
        "import sys; from pathlib import Path; from trainmedic.record.load import load_run; "
        f"run = load_run(Path({str(STORES / 'healthy')!r})); "
        "assert run.adapter is not None; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
