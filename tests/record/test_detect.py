"""Layout detection from names and file types."""

from __future__ import annotations

import json
import os
from pathlib import Path

from trainmedic.record.detect import Layout, detect
from trainmedic.record.load import load_run


def touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_dlm_store_by_its_logs(tmp_path: Path) -> None:
    touch(tmp_path / "logs" / "train-000001-20260101T000000.jsonl")
    assert detect(tmp_path).layout is Layout.DLM_STORE


def test_dlm_store_by_its_adapter_versions(tmp_path: Path) -> None:
    (tmp_path / "adapter" / "versions").mkdir(parents=True)
    assert detect(tmp_path).layout is Layout.DLM_STORE


def test_hf_output_dir_by_its_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-500").mkdir()
    assert detect(tmp_path).layout is Layout.HF_OUTPUT_DIR


def test_hf_output_dir_by_its_trainer_state(tmp_path: Path) -> None:
    touch(tmp_path / "trainer_state.json")
    assert detect(tmp_path).layout is Layout.HF_OUTPUT_DIR


def test_hf_checkpoint_by_name_or_optimizer(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-20"
    touch(ckpt / "trainer_state.json")
    assert detect(ckpt).layout is Layout.HF_CHECKPOINT
    other = tmp_path / "final"
    touch(other / "trainer_state.json")
    touch(other / "optimizer.pt")
    assert detect(other).layout is Layout.HF_CHECKPOINT


def test_bare_files(tmp_path: Path) -> None:
    assert detect(touch(tmp_path / "trainer_state.json")).layout is Layout.TRAINER_STATE
    assert detect(touch(tmp_path / "043.json")).layout is Layout.TRAINER_STATE
    found = detect(touch(tmp_path / "run.jsonl"))
    assert found.layout is Layout.JSONL and found.files == [tmp_path / "run.jsonl"]
    found = detect(touch(tmp_path / "notes.txt"))
    assert found.layout is Layout.UNKNOWN and "notes.txt" in found.note


def test_directory_of_jsonl_logs_in_name_order(tmp_path: Path) -> None:
    touch(tmp_path / "b.jsonl")
    touch(tmp_path / "a.jsonl")
    touch(tmp_path / "readme.md")
    found = detect(tmp_path)
    assert found.layout is Layout.JSONL
    assert found.files == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]


def test_empty_directory(tmp_path: Path) -> None:
    touch(tmp_path / ".hidden")
    found = detect(tmp_path)
    assert found.layout is Layout.EMPTY
    assert found.note == "no training artifacts found"


def test_unknown_directory_lists_a_few_names(tmp_path: Path) -> None:
    for i in range(8):
        touch(tmp_path / f"file{i}.txt")
    found = detect(tmp_path)
    assert found.layout is Layout.UNKNOWN
    assert "file0.txt" in found.note and "(8 entries)" in found.note
    assert "file7.txt" not in found.note


def test_fifo_path_is_not_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    found = detect(fifo)
    assert found.layout is Layout.UNKNOWN
    assert "not a regular file" in found.note


def test_trainmedic_run_log_is_named_by_its_banner(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    log.write_text(
        json.dumps({"type": "banner", "writer": "trainmedic", "run_id": "abc"})
        + "\n"
        + json.dumps({"type": "step", "step": 1, "loss": 1.0})
        + "\n"
    )
    assert load_run(log).layout == "trainmedic run log"
    assert load_run(tmp_path).layout == "trainmedic run log"
    assert load_run(log).label == "run abc"


def test_other_jsonl_is_a_jsonl_log(tmp_path: Path) -> None:
    log = touch(tmp_path / "x.jsonl", json.dumps({"type": "step", "step": 1, "loss": 1.0}) + "\n")
    run = load_run(log)
    assert run.layout == "JSONL log"
    assert run.label == "run 1"


def test_layout_names_are_the_user_facing_words() -> None:
    assert {layout.value for layout in Layout} == {
        "dlm store",
        "HF output dir",
        "watched HF output dir",
        "watched HF checkpoint",
        "HF checkpoint",
        "trainer_state.json",
        "trainmedic run log",
        "trainmedic report",
        "trainmedic postmortem",
        "LLaMA-Factory output dir",
        "LLaMA-Factory log",
        "TensorBoard events",
        "Lightning metrics.csv",
        "torchtune log",
        "MLflow run",
        "JSONL log",
        "empty",
        "unknown",
    }
