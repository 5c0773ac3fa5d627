"""Optimizer state from dlm training_state.pt / HF optimizer.pt objects, and clear errors for bad ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainmedic.record.errors import ReadError
from trainmedic.record.optimizer import bnb_second_moment, optimizer_state_from

SHAPES = [(8, 128), (128, 8), (8, 128), (64, 8)]


def adam(shape: tuple[int, ...], seed: int = 0, step: float = 30.0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "step": np.array(step, dtype=np.float32),
        "exp_avg": rng.normal(size=shape).astype(np.float32),
        "exp_avg_sq": rng.uniform(1e-8, 1e-7, size=shape).astype(np.float32),
    }


def hf_obj(state: dict[Any, Any] | None = None, groups: list[Any] | None = None) -> dict[str, Any]:
    state = state if state is not None else {i: adam(s, i) for i, s in enumerate(SHAPES)}
    groups = (
        groups
        if groups is not None
        else [
            {"lr": 2e-4, "weight_decay": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "params": [0, 1, 2]},
            {"lr": 2e-4, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "params": [3]},
        ]
    )
    return {"state": state, "param_groups": groups}


def dlm_obj(**over: Any) -> dict[str, Any]:
    return {
        "global_step": 30,
        "epoch": 1.5,
        "best_val_loss": 0.75,
        "use_qlora": True,
        "optimizer_state_dict": hf_obj(),
        "scheduler_state_dict": {"last_epoch": 30},
        "scaler_state_dict": None,
        "torch_rng_state": np.zeros(16, dtype=np.uint8),
        **over,
    }


def test_dlm_training_state_gives_counters_groups_and_moments() -> None:
    st = optimizer_state_from(dlm_obj(), Path("v0001/training_state.pt"), adapter=None)
    assert (st.global_step, st.epoch, st.best_val_loss, st.use_qlora) == (30, 1.5, 0.75, True)
    assert [p.id for p in st.params] == [0, 1, 2, 3] and [p.group for p in st.params] == [0, 0, 0, 1]
    p = st.params[3]
    assert p.shape == (64, 8) and p.step == 30.0 and p.state_keys == ("step", "exp_avg", "exp_avg_sq")
    assert p.exp_avg_sq is not None and p.exp_avg_sq.shape == (64, 8) and p.exp_avg is not None
    assert st.param_groups[0] == {
        "n_params": 3,
        "lr": 2e-4,
        "weight_decay": 0.01,
        "eps": 1e-8,
        "betas": [0.9, 0.999],
    }
    json.dumps(st.param_groups, allow_nan=False)
    assert not st.mapping_verified and "no adapter file" in st.mapping_note


def test_hf_optimizer_reads_step_and_epoch_from_trainer_state_beside_it(tmp_path: Path) -> None:
    (tmp_path / "trainer_state.json").write_text(
        json.dumps({"global_step": 500, "epoch": 2.5, "log_history": []})
    )
    st = optimizer_state_from(hf_obj(), tmp_path / "optimizer.pt", adapter=None)
    assert st.global_step == 500 and st.epoch == 2.5 and st.best_val_loss is None


def test_hf_optimizer_alone_leaves_the_step_unknown(tmp_path: Path) -> None:
    (tmp_path / "trainer_state.json").write_text("{not json")
    st = optimizer_state_from(hf_obj(), tmp_path / "optimizer.pt", adapter=None)
    assert st.global_step is None and st.epoch is None and len(st.params) == 4


def test_sgd_and_lion_states_keep_no_second_moment() -> None:
    state = {
        0: {"momentum_buffer": np.ones((8, 128), dtype=np.float32)},
        1: {"momentum_buffer": None},
        2: {"exp_avg": np.ones((8, 128), dtype=np.float32)},
        3: {"exp_avg": np.ones((64, 8), dtype=np.float32)},
    }
    st = optimizer_state_from(hf_obj(state), Path("optimizer.pt"), adapter=None)
    assert all(p.exp_avg_sq is None for p in st.params)
    assert st.params[0].shape == (8, 128) and st.params[1].shape == () and st.params[3].shape == (64, 8)
    assert st.params[2].exp_avg is not None and st.params[0].state_keys == ("momentum_buffer",)


def test_parameters_without_state_are_kept_as_stateless_ids() -> None:
    obj = hf_obj({0: adam((8, 128))})
    st = optimizer_state_from(obj, Path("optimizer.pt"), adapter=None)
    assert [p.id for p in st.params] == [0, 1, 2, 3]
    assert st.params[2].state_keys == () and st.params[2].exp_avg_sq is None and st.params[3].group == 1


def blockwise(values: np.ndarray, block: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantise like bitsandbytes' blockwise 8-bit second moment: codes, ascending map, block absmax."""
    qmap = np.linspace(0.0, 1.0, 256, dtype=np.float32) ** 3
    flat = values.reshape(-1).astype(np.float64)
    n_blocks = -(-flat.size // block)
    padded = np.zeros(n_blocks * block)
    padded[: flat.size] = flat
    absmax = padded.reshape(n_blocks, block).max(axis=1)
    norm = padded / np.repeat(absmax, block)
    codes = np.searchsorted(qmap, norm).clip(0, 255)
    lower = (codes - 1).clip(0, 255)
    codes = np.where(np.abs(qmap[lower] - norm) < np.abs(qmap[codes] - norm), lower, codes)
    return codes[: flat.size].astype(np.uint8).reshape(values.shape), qmap, absmax.astype(np.float32)


@pytest.mark.parametrize("block", [256, 2048])
def test_bitsandbytes_8bit_second_moment_decodes_when_block_maxima_check_out(block: int) -> None:
    values = np.random.default_rng(0).uniform(0, 1e-6, size=(96, 64)).astype(np.float32)
    codes, qmap, absmax = blockwise(values, block)
    decoded = bnb_second_moment({"state2": codes, "qmap2": qmap, "absmax2": absmax})
    assert decoded is not None and decoded.shape == values.shape
    assert np.allclose(decoded.reshape(-1).max(), values.max())
    assert abs(decoded.mean() / values.mean() - 1) < 0.05


def test_bitsandbytes_8bit_with_mismatched_scales_is_not_decoded() -> None:
    values = np.random.default_rng(0).uniform(0, 1e-6, size=(96, 64)).astype(np.float32)
    codes, qmap, absmax = blockwise(values)
    codes[codes == 255] = 254  # no block uses the map's top code any more: the scales can't be trusted
    assert bnb_second_moment({"state2": codes, "qmap2": qmap, "absmax2": absmax}) is None
    assert bnb_second_moment({"state2": codes, "qmap2": qmap[:128], "absmax2": absmax}) is None
    assert bnb_second_moment({"state2": codes, "qmap2": qmap, "absmax2": absmax[:5]}) is None


def test_bitsandbytes_state_keys_are_kept_and_32bit_state2_is_the_second_moment() -> None:
    values = np.random.default_rng(0).uniform(0, 1e-6, size=(96, 64)).astype(np.float32)
    codes, qmap, absmax = blockwise(values)
    state = {
        0: {"step": 30, "state1": np.zeros((96, 64), np.float32), "state2": values},
        1: {"step": 30, "state1": codes, "state2": codes, "qmap1": qmap, "qmap2": qmap, "absmax2": absmax},
    }
    groups = [{"lr": 1e-4, "params": [0, 1]}]
    st = optimizer_state_from(hf_obj(state, groups), Path("optimizer.pt"), adapter=None)
    assert st.params[0].exp_avg_sq is values and st.params[0].shape == (96, 64)
    assert st.params[1].exp_avg_sq is not None and st.params[1].exp_avg_sq.dtype == np.float32
    assert st.params[1].state_keys == ("step", "state1", "state2", "qmap1", "qmap2", "absmax2")


def bad(obj: Any) -> str:
    with pytest.raises(ReadError) as info:
        optimizer_state_from(obj, Path("ckpt/optimizer.pt"), adapter=None)
    msg = str(info.value)
    assert msg.startswith("ckpt/optimizer.pt: ")
    return msg


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda o: [o], "top level"),
        (lambda o: {"param_groups": o["param_groups"]}, "no 'state' or 'optimizer_state_dict'"),
        (lambda o: {**o, "state": [1, 2]}, "state: expected a dict"),
        (lambda o: {**o, "state": {"0": adam((8, 128))}}, "parameter ids must be ints"),
        (lambda o: {**o, "state": {0: [1.0]}}, "state[0]: expected a dict of state tensors"),
        (
            lambda o: {**o, "state": {0: {"exp_avg_sq": "big"}}},
            "state[0].exp_avg_sq: expected an array, got str",
        ),
        (lambda o: {**o, "state": {0: {"step": "ten"}}}, "state[0].step: expected a number"),
        (lambda o: {**o, "state": {9: adam((8, 128))}}, "state[9]: id 9 is not listed"),
        (lambda o: {**o, "param_groups": {"params": []}}, "param_groups: expected a list"),
        (lambda o: {**o, "param_groups": ["x"]}, "param_groups[0]: expected a dict"),
        (lambda o: {**o, "param_groups": [{"lr": 1}]}, "param_groups[0].params: expected a list of ids"),
        (lambda o: {**o, "param_groups": [{"params": [0, "1"]}]}, "param_groups[0].params: ids must be ints"),
        (lambda o: {**o, "param_groups": [{"params": [0]}, {"params": [0]}]}, "id 0 is also in group 0"),
    ],
)
def test_structurally_wrong_hf_objects_name_the_field(mutate: Any, field: str) -> None:
    assert field in bad(mutate(hf_obj()))


def test_structurally_wrong_dlm_objects_name_the_nested_field() -> None:
    assert "optimizer_state_dict: expected a dict, got list" in bad(dlm_obj(optimizer_state_dict=[]))
    nested = dlm_obj()
    nested["optimizer_state_dict"]["state"][1]["exp_avg"] = 3.0
    assert "optimizer_state_dict.state[1].exp_avg: expected an array, got float" in bad(nested)


def test_reading_optimizer_state_does_not_import_torch() -> None:
    code = (
        "import sys, trainmedic.record.optimizer, trainmedic.record.param_map, "
        "trainmedic.probes.gradient_ghost; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_torch_saved_training_state_reads_through_the_safe_loader(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torchfile = pytest.importorskip("trainmedic.record.torchfile")
    obj = dlm_obj()
    sd = obj.pop("optimizer_state_dict")
    state = {i: {k: torch.from_numpy(np.asarray(v)) for k, v in e.items()} for i, e in sd["state"].items()}
    path = tmp_path / "training_state.pt"
    torch.save(
        {**obj, "torch_rng_state": torch.zeros(4), "optimizer_state_dict": {**sd, "state": state}}, path
    )
    st = optimizer_state_from(torchfile.load_torch_file(path), path, adapter=None)
    assert st.global_step == 30 and st.use_qlora is True and st.params[1].shape == (128, 8)
    assert st.params[0].step == 30.0
    assert np.array_equal(st.params[2].exp_avg_sq, sd["state"][2]["exp_avg_sq"])
