"""Logs other tools leave (LLaMA-Factory, TensorBoard, Lightning), built here in each tool's own
layout with the surprises real files hold (../shared/real_logs/INDEX.md), read into the same `Run`
every probe judges."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from trainmedic.cli import app
from trainmedic.record.detect import Layout, detect
from trainmedic.record.load import load_run
from trainmedic.record.tfevents import _masked_crc32c, crc32c

runner = CliRunner()


# ------------------------------------------------------------------------------- LLaMA-Factory
def lf_line(step: int, total: int = 100, **fields: object) -> str:
    return json.dumps({"current_steps": step, "total_steps": total, **fields})


def write_lf(folder: Path, lines: list[str], name: str = "trainer_log.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def test_llamafactory_output_dir_reads_both_lr_spellings_evals_and_ignores_odd_fields(tmp_path: Path) -> None:
    old = ', "eval_loss": null, "predict_loss": null, "reward": null, "accuracy": null'
    lines = [
        lf_line(5, loss=2.0, learning_rate=1e-5, throughput="0.00", elapsed_time="9 days, 21:39:23")[:-1]
        + old
        + "}",
        lf_line(10, loss=1.8, lr=2e-5, epoch=0.1),
        lf_line(10, eval_loss=1.9, epoch=0.1),  # an eval on a line of its own
        lf_line(15, loss=1.6, lr=2e-5),
        json.dumps({"current_steps": 15, "total_steps": 100, "loss": None, "lr": None}),  # all-null end
    ]
    run = load_run(write_lf(tmp_path / "out", lines))
    assert run.layout == Layout.LLAMAFACTORY_DIR.value == "LLaMA-Factory output dir"
    assert run.train_loss.steps.tolist() == [5, 10, 15] and run.train_loss.values.tolist() == [2.0, 1.8, 1.6]
    assert run.learning_rate.values.tolist() == [1e-5, 2e-5, 2e-5]
    assert run.eval_loss.steps.tolist() == [10] and run.eval_loss.values.tolist() == [1.9]
    assert run.max_steps == 100 and run.completed is False  # the log stopped at 15 of 100
    assert run.problems == []
    assert run.extra == {}  # the null accuracy of old logs is no DPO


def test_llamafactory_dpo_accuracy_makes_a_preference_run_and_a_finished_log_is_complete(
    tmp_path: Path,
) -> None:
    from trainmedic.signals.objective import Objective, classify_objective

    lines = [
        lf_line(s, total=20, loss=0.69 - 0.01 * s, accuracy=0.5 + 0.02 * s, lr=1e-6) for s in range(1, 21)
    ]
    run = load_run(write_lf(tmp_path / "dpo", lines))
    assert run.completed is True
    assert classify_objective(run.train_loss.values, run.extra.keys()) is Objective.PREFERENCE


def test_a_bad_line_names_its_line_and_costs_only_itself_a_torn_last_line_is_a_note(tmp_path: Path) -> None:
    lines = [lf_line(1, loss=2.0), "{not json", lf_line(2, loss="high"), lf_line(3, loss=1.5), '{"current_st']
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "trainer_log.jsonl").write_text("\n".join(lines))  # no newline after the torn line
    run = load_run(folder)
    assert [(p.line, p.message) for p in run.problems] == [
        (2, "not valid JSON"),
        (3, "'loss' is str, not a number"),
    ]
    assert run.train_loss.steps.tolist() == [1, 3]
    assert any("line 5 is torn" in n for n in run.notes)


def test_a_prediction_only_log_says_it_has_no_loss(tmp_path: Path) -> None:
    run = load_run(write_lf(tmp_path / "pred", [lf_line(s, total=4) for s in range(1, 5)]))
    assert not run.has_log
    assert any("progress but no loss" in n for n in run.notes)


def test_a_bare_llamafactory_file_is_recognised_by_its_fields(tmp_path: Path) -> None:
    log = write_lf(tmp_path, [lf_line(1, loss=2.0), lf_line(2, loss=1.9)], name="003.jsonl") / "003.jsonl"
    assert detect(log).layout is Layout.LLAMAFACTORY_LOG
    assert len(load_run(log).train_loss) == 2


def test_a_killed_llamafactory_run_with_checkpoints_reads_the_log_and_the_checkpoint(tmp_path: Path) -> None:
    out = write_lf(tmp_path / "out", [lf_line(s, loss=2.0 - 0.01 * s) for s in range(1, 41)])
    ckpt = out / "checkpoint-40"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 40, "log_history": []}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (ckpt / "model.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + np.ones(2, np.float32).tobytes()
    )
    run = load_run(out)
    assert run.layout == "LLaMA-Factory output dir"
    assert len(run.train_loss) == 40 and run.adapter is not None
    assert "checkpoint-40" in run.label


# --------------------------------------------------------------------------------- TensorBoard
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def event(step: int, tag: str, value: float, *, tensor: bool = False) -> bytes:
    """A serialized Event with one scalar, as torch's SummaryWriter (or a TF2 writer) writes it."""
    if tensor:
        proto = _field(1, 0, _varint(1)) + _field(5, 2, struct.pack("<f", value))  # DT_FLOAT, float_val
        val = _field(1, 2, tag.encode()) + _field(8, 2, proto)
    else:
        val = _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value))
    return (
        _field(1, 1, struct.pack("<d", 1.7e9)) + _field(2, 0, _varint(step)) + _field(5, 2, _field(1, 2, val))
    )


def record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc32c(header)) + data + struct.pack("<I", _masked_crc32c(data))


def write_events(path: Path, events: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(record(e) for e in events))
    return path


def test_crc32c_is_the_castagnoli_checksum() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value


def test_hf_trainer_event_files_under_runs_are_read_restarts_in_order(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = [event(s, "train/loss", 3.0 - 0.1 * s) for s in range(1, 6)]
    first += [event(s, "train/grad_norm", 1.0) for s in range(1, 6)]
    first += [event(s, "train/learning_rate", 1e-4) for s in range(1, 6)]
    write_events(out / "runs" / "Nov20_20-59-08_host" / "events.out.tfevents.1763643572.host.1.0", first)
    second = [event(s, "train/loss", 2.0 - 0.1 * s, tensor=True) for s in range(4, 9)]  # a restart at 4
    second += [event(8, "eval/loss", 1.5), event(8, "train/train_loss", 2.2)]
    write_events(out / "runs" / "Nov20_21-39-58_host" / "events.out.tfevents.1763646020.host.2.0", second)
    assert detect(out).layout is Layout.TENSORBOARD
    run = load_run(out)
    assert run.train_loss.steps.tolist() == list(range(1, 9))
    assert run.train_loss.values[3] == pytest.approx(1.6)  # step 4 from the later file
    assert len(run.grad_norm) == 5 and len(run.learning_rate) == 5
    assert run.eval_loss.values.tolist() == [1.5]
    assert run.completed is True  # train/train_loss is written when train() returns
    assert run.problems == []


def test_a_git_lfs_pointer_instead_of_events_is_an_error_that_says_so(tmp_path: Path) -> None:
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 32184\n"
    (logs / "events.out.tfevents.1730763490.host.1.0").write_text(pointer)
    result = runner.invoke(app, ["check", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "Git LFS pointer" in " ".join(result.output.split())
    assert "ERROR" in result.output


def test_a_torn_or_corrupt_event_file_keeps_what_came_before_and_names_the_record(tmp_path: Path) -> None:
    good = b"".join(record(event(s, "train/loss", 2.0)) for s in range(1, 4))
    torn = tmp_path / "a" / "events.out.tfevents.1.host"
    torn.parent.mkdir()
    torn.write_bytes(good + record(event(4, "train/loss", 2.0))[:-7])
    run = load_run(torn.parent)
    assert run.train_loss.steps.tolist() == [1, 2, 3]
    (problem,) = run.problems
    assert problem.message.startswith("record 4 is torn or too long") and problem.path == str(torn)
    garbage = tmp_path / "b" / "events.out.tfevents.2.host"
    garbage.parent.mkdir()
    garbage.write_bytes(good + b"\xff" * 40)
    run = load_run(garbage.parent)
    assert run.train_loss.steps.tolist() == [1, 2, 3]
    assert "record 4: bad length checksum" in str(run.problems[0])


# ----------------------------------------------------------------------------------- Lightning
LIGHTNING_CSV = """epoch,lr-AdamW,step,train_loss_epoch,train_loss_step,val_loss
0,0.001,140749,,,
0,,140749,,7.5,
0,,140799,,7.0,
0,,140799,,,7.2
0,,140799,7.25,,
1,,140849,,oops,
1,,140899,,6.5,
"""


def test_lightning_versions_step_rows_epoch_rows_and_the_lr_monitor(tmp_path: Path) -> None:
    root = tmp_path / "exp"
    for n, text in ((0, "epoch,loss,step\n0,9.0,1\n"), (1, LIGHTNING_CSV)):
        version = root / "lightning_logs" / f"version_{n}"
        version.mkdir(parents=True)
        (version / "metrics.csv").write_text(text)
    assert detect(root).layout is Layout.LIGHTNING
    run = load_run(root)  # the newest version
    assert run.train_loss.steps.tolist() == [140749, 140799, 140899]
    assert run.train_loss.values.tolist() == [7.5, 7.0, 6.5]  # step rows, not the epoch mean
    assert run.eval_loss.steps.tolist() == [140799] and run.learning_rate.values.tolist() == [0.001]
    assert [(p.line, p.message) for p in run.problems] == [(7, "train_loss_step 'oops' is not a number")]
    assert any("train_loss <- train_loss_step" in n for n in run.notes)


def test_a_csv_without_a_step_column_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "metrics.csv"
    bad.write_text("a,b\n1,2\n")
    run = load_run(bad)
    assert "no header with a 'step' column" in str(run.problems[0])


# ---------------------------------------------------------------- the real logs, as tools leave them
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "real_logs"


def _lay_out(entry: dict[str, object], root: Path) -> Path:
    """A shared file placed where its tool writes it."""
    name, fmt = str(entry["file"]), str(entry["format"])
    src, run = SHARED / name, root / name.split(".")[0]
    target = {
        "llamafactory_jsonl": run / "trainer_log.jsonl",
        "tfevents": run / "runs" / "Nov20_20-59-08_host" / "events.out.tfevents.1763643572.host.1.0",
        "lightning_csv": run / "lightning_logs" / "version_0" / "metrics.csv",
        "hf_trainer_state": run / "checkpoint-1" / "trainer_state.json",
    }[fmt]
    target.parent.mkdir(parents=True)
    target.write_bytes(src.read_bytes())
    return run


@pytest.mark.skipif(not (SHARED / "MANIFEST.json").exists(), reason="shared real logs not present")
def test_every_real_log_is_read_and_no_healthy_run_fails(tmp_path: Path) -> None:
    from trainmedic.check import check_paths
    from trainmedic.gate import gate_fails
    from trainmedic.spec import default_spec

    manifest = json.loads((SHARED / "MANIFEST.json").read_text())
    entries = manifest["files"] if isinstance(manifest, dict) else manifest
    assert len(entries) == 17
    paths = [_lay_out(e, tmp_path) for e in entries]
    reports = check_paths(paths, default_spec(), jobs=1)
    for entry, report in zip(entries, reports, strict=True):
        assert report.checked_anything, (entry["file"], report.notes)
        curve = report.curves.get("train_loss") or {}
        assert len(curve.get("steps", [])) >= min(int(entry["points"]), 20), entry["file"]  # type: ignore[call-overload]
        if entry["label"] == "healthy":
            assert not gate_fails([report]), (entry["file"], report.headline())


# ----------------------------------------------------------------------------- torchtune, MLflow
def test_torchtune_disk_logs_are_read_a_restart_writes_a_later_file(tmp_path: Path) -> None:
    out = tmp_path / "tune"
    out.mkdir()
    (out / "log_1700000000.txt").write_text(
        "".join(
            f"Step {s} | loss:{3.0 - 0.1 * s} lr:2e-05 tokens_per_second_per_gpu:800.0 \n"
            for s in range(1, 6)
        )
    )
    (out / "log_1700000500.txt").write_text("Step 5 | loss:2.4 lr:2e-05 grad_norm:0.9 \nnot a step line\n")
    assert detect(out).layout is Layout.TORCHTUNE
    run = load_run(out)
    assert run.train_loss.steps.tolist() == [1, 2, 3, 4, 5] and run.train_loss.values[-1] == 2.4
    assert run.learning_rate.values.tolist() == [2e-05] * 5 and run.grad_norm.steps.tolist() == [5]
    assert [(p.line, p.message) for p in run.problems] == [(2, "not a 'Step N | name:value ...' line")]


def _mlflow_run(store: Path, run_id: str, start: int, losses: list[float]) -> Path:
    run = store / "0" / run_id
    (run / "metrics").mkdir(parents=True)
    (run / "meta.yaml").write_text(f"run_id: {run_id}\nstart_time: {start}\n")
    (run / "metrics" / "loss").write_text("".join(f"{start + s} {v} {s}\n" for s, v in enumerate(losses, 1)))
    (run / "metrics" / "learning_rate").write_text(f"{start} 0.0001 1\n")
    return run


def test_an_mlflow_file_store_judges_its_newest_run(tmp_path: Path) -> None:
    store = tmp_path / "mlruns"
    _mlflow_run(store, "aaa", 1000, [9.0, 9.0])
    _mlflow_run(store, "bbb", 2000, [3.0, 2.5, 2.0])
    (store / "0" / "bbb" / "metrics" / "eval_loss").write_text("2000 2.2 3\n2001 x 4\n")
    for path in (tmp_path, store, store / "0" / "bbb"):
        assert detect(path).layout is Layout.MLFLOW, path
    run = load_run(tmp_path)
    assert run.train_loss.values.tolist() == [3.0, 2.5, 2.0]
    assert run.eval_loss.values.tolist() == [2.2] and len(run.learning_rate) == 1
    assert any("2 MLflow runs here; judging the newest (bbb)" in n for n in run.notes)
    assert [p.line for p in run.problems] == [2]
