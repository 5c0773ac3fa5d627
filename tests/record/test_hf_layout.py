"""Hugging Face Trainer outputs: output dirs, single checkpoints, bare trainer_state.json."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest

from trainmedic.record.load import load_run

SHARED = Path(__file__).resolve().parents[2].parent / "shared"

HIDDEN, RANK = 16, 4
OUT = {"q_proj": 16, "v_proj": 8}  # GQA: v is narrower than q


def adapter_tensors(layers: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for i in range(layers):
        for mod, width in OUT.items():
            base = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            out[f"{base}.lora_A.weight"] = rng.normal(size=(RANK, HIDDEN)).astype(np.float32)
            out[f"{base}.lora_B.weight"] = rng.normal(size=(width, RANK)).astype(np.float32) * 0.01
    return out


def write_adapter(folder: Path, layers: int = 2) -> None:
    from safetensors.numpy import save_file

    save_file(adapter_tensors(layers), str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 8, "peft_type": "LORA"}))


def write_optimizer(path: Path, step: int, layers: int = 2) -> None:
    torch = pytest.importorskip("torch")
    state = {}
    pid = 0
    for _ in range(layers):  # module order: layer by layer, q then v, A then B
        for width in OUT.values():
            for shape in ((RANK, HIDDEN), (width, RANK)):
                state[pid] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": torch.full(shape, 0.01),
                    "exp_avg_sq": torch.full(shape, 1e-4),
                }
                pid += 1
    groups = [{"lr": 1e-3, "weight_decay": 0.0, "params": list(range(pid))}]
    torch.save({"state": state, "param_groups": groups}, str(path))


def log_history(last_step: int, every: int = 5) -> list[dict[str, object]]:
    hist: list[dict[str, object]] = []
    for s in range(every, last_step + 1, every):
        hist.append({"step": s, "loss": 2.0 / s, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": s / 100})
        if s % 10 == 0:
            hist.append({"step": s, "eval_loss": 3.0 / s, "epoch": s / 100})
    return hist


def write_state(folder: Path, step: int, max_steps: int = 100) -> None:
    state = {"global_step": step, "max_steps": max_steps, "log_history": log_history(step)}
    (folder / "trainer_state.json").write_text(json.dumps(state))


def make_checkpoint(root: Path, step: int, *, optimizer: bool = True) -> Path:
    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    write_state(ckpt, step)
    write_adapter(ckpt)
    if optimizer:
        write_optimizer(ckpt / "optimizer.pt", step)
    return ckpt


def test_newest_complete_checkpoint_is_chosen_and_named(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    for step in (10, 20, 30):
        make_checkpoint(tmp_path, step)
    run = load_run(tmp_path)
    assert run.layout == "HF output dir"
    assert run.label == "checkpoint-30 (newest complete of 3)"
    assert run.train_loss.steps[-1] == 30
    assert run.eval_loss.steps.tolist() == [10, 20, 30]
    assert run.max_steps == 100
    assert run.completed is False
    assert tmp_path / "checkpoint-30" / "optimizer.pt" in run.sources
    assert (
        run.adapter is not None
        and run.adapter.source == tmp_path / "checkpoint-30" / "adapter_model.safetensors"
    )
    assert run.optimizer is not None, [str(p) for p in run.problems]
    assert len(run.optimizer.params) == 8
    assert not run.fatal_problems("optimizer")


@pytest.mark.parametrize(
    "breakage",
    ["truncated_optimizer", "empty_optimizer", "no_state", "no_weights"],
)
def test_half_written_newest_checkpoint_is_skipped(tmp_path: Path, breakage: str) -> None:
    pytest.importorskip("torch")
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20)
    newest = make_checkpoint(tmp_path, 30)
    opt = newest / "optimizer.pt"
    if breakage == "truncated_optimizer":
        opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    elif breakage == "empty_optimizer":
        opt.write_bytes(b"")
    elif breakage == "no_state":
        (newest / "trainer_state.json").unlink()
    else:
        (newest / "adapter_model.safetensors").unlink()
    run = load_run(tmp_path)
    assert run.label == "checkpoint-20 (newest complete of 3)"
    assert any(n.startswith("checkpoint-30 skipped: incomplete") for n in run.notes), run.notes
    assert newest / "optimizer.pt" not in run.sources
    assert tmp_path / "checkpoint-20" / "optimizer.pt" in run.sources
    assert not run.fatal_problems("optimizer")


def test_root_trainer_state_is_preferred_for_curves(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 20, optimizer=False)
    write_state(tmp_path, 40, max_steps=40)
    run = load_run(tmp_path)
    assert run.train_loss.steps[-1] == 40
    assert run.completed is True
    assert tmp_path / "trainer_state.json" in run.sources
    assert any("no optimizer.pt in checkpoint-20" in n for n in run.notes)


def test_root_final_weights_are_the_judged_adapter(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 20, optimizer=False)
    write_state(tmp_path, 40, max_steps=40)
    write_adapter(tmp_path, layers=3)
    run = load_run(tmp_path)
    assert run.adapter is not None
    assert run.adapter.source == tmp_path / "adapter_model.safetensors"
    assert len(run.adapter.header) == 12


def test_output_dir_without_checkpoints_reads_final_state(tmp_path: Path) -> None:
    write_state(tmp_path, 50, max_steps=50)
    write_adapter(tmp_path)
    run = load_run(tmp_path)
    assert run.layout == "HF output dir"
    assert run.label == "output dir (final weights)"
    assert len(run.train_loss) == 10
    assert run.adapter is not None


def test_single_checkpoint_dir(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    ckpt = make_checkpoint(tmp_path, 20)
    run = load_run(ckpt)
    assert run.layout == "HF checkpoint"
    assert run.label == "checkpoint-20"
    assert len(run.train_loss) == 4
    assert run.optimizer is not None, [str(p) for p in run.problems]
    assert run.adapter is not None


def test_incomplete_single_checkpoint_is_read_and_said_to_be(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path, 20, optimizer=False)
    (ckpt / "optimizer.pt").write_bytes(b"PK\x03\x04 torn")
    run = load_run(ckpt)
    assert any("looks incomplete" in n for n in run.notes)
    assert run.optimizer is None
    (p,) = run.fatal_problems("optimizer")
    assert "optimizer.pt" in p.path
    assert len(run.train_loss) == 4  # the curves are still read


def test_optimizer_zip_with_garbage_is_an_optimizer_problem(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path, 20, optimizer=False)
    with zipfile.ZipFile(ckpt / "optimizer.pt", "w") as zf:
        zf.writestr("archive/data.pkl", b"not a pickle")
    run = load_run(tmp_path)
    assert run.label == "checkpoint-20 (newest complete of 1)"
    assert run.optimizer is None
    assert run.fatal_problems("optimizer")
    assert run.fatal_problems("optimizer")[0].path.endswith("optimizer.pt")


def test_bare_trainer_state_json(tmp_path: Path) -> None:
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps({"global_step": 30, "max_steps": 30, "log_history": log_history(30)}))
    run = load_run(path)
    assert run.layout == "trainer_state.json"
    assert run.train_loss.steps.tolist() == [5, 10, 15, 20, 25, 30]
    assert run.eval_loss.values.tolist() == pytest.approx([0.3, 0.15, 0.1])
    assert run.completed is True
    assert run.sources == [path]


def test_nan_and_infinity_literals_in_trainer_state(tmp_path: Path) -> None:
    path = tmp_path / "trainer_state.json"
    path.write_text(
        '{"global_step": 3, "log_history": ['
        '{"step": 1, "loss": 2.0, "grad_norm": NaN, "learning_rate": 0.0},'
        '{"step": 2, "loss": Infinity, "grad_norm": -Infinity, "learning_rate": 1e-4},'
        '{"step": 3, "loss": 1.5, "grad_norm": 1.0, "learning_rate": 1e-4}]}'
    )
    run = load_run(path)
    assert math.isnan(run.grad_norm.values[0])
    assert run.train_loss.values[1] == math.inf
    assert run.grad_norm.values[1] == -math.inf
    assert run.problems == []


def test_zero_losses_the_nan_filter_logged_beside_nan_gradients_read_as_nan(tmp_path: Path) -> None:
    # the Trainer's logging_nan_inf_filter logs 0.0 for a window whose steps were all NaN
    path = tmp_path / "trainer_state.json"
    path.write_text(
        '{"global_step": 4, "log_history": ['
        '{"step": 1, "loss": 2.0, "grad_norm": 1.0},'
        '{"step": 2, "loss": 0.0, "grad_norm": NaN},'
        '{"step": 3, "loss": 0.0, "grad_norm": 0.5},'
        '{"step": 4, "loss": 0.0}]}'
    )
    run = load_run(path)
    loss = run.train_loss.values.tolist()
    assert loss[0] == 2.0 and math.isnan(loss[1])
    assert loss[2:] == [0.0, 0.0]  # a finite (or absent) gradient norm: a real zero is kept
    assert any("logging_nan_inf_filter" in n and "step 2" in n for n in run.notes)


def test_trainer_state_that_is_not_json_is_a_log_problem(tmp_path: Path) -> None:
    path = tmp_path / "trainer_state.json"
    path.write_text('{"log_history": [ {"step": 1, ')
    run = load_run(path)
    (p,) = run.problems
    assert p.path == str(path) and p.artifact == "log" and p.fatal
    assert "not valid JSON" in p.message


def test_json_without_log_history_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text('{"accuracy": 0.9}')
    run = load_run(path)
    assert run.layout == "trainer_state.json"
    assert "log_history" in run.problems[0].message


def test_bad_log_history_entries_are_named(tmp_path: Path) -> None:
    path = tmp_path / "trainer_state.json"
    hist = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": "abc"}, "oops"]
    path.write_text(json.dumps({"log_history": hist}))
    run = load_run(path)
    assert len(run.train_loss) == 1
    msgs = [p.message for p in run.problems]
    assert any("log_history[1].loss" in m for m in msgs)
    assert any("log_history[2]" in m for m in msgs)


@pytest.mark.skipif(not (SHARED / "real_curves" / "043.json").exists(), reason="shared data not present")
def test_real_curves_wrapper_is_read_as_trainer_state() -> None:
    path = SHARED / "real_curves" / "043.json"
    run = load_run(path)
    assert run.layout == "trainer_state.json"
    assert run.max_steps == 2760
    assert run.completed is True  # meta.global_step == meta.max_steps
    assert len(run.train_loss) > 20
    assert len(run.eval_loss) > 5
    assert run.train_loss.values[0] == pytest.approx(1.2469)
    assert run.problems == []
