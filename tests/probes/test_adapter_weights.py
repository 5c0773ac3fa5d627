"""The adapter_weights probe and the exact low-rank spectra behind it."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import trainmedic.probes.adapter_weights as aw_module
from trainmedic.findings import Verdict
from trainmedic.probes.adapter_weights import PER_LAYER_METRIC, AdapterWeightsSpec, adapter_weights
from trainmedic.probes.base import REGISTRY, run_probe
from trainmedic.record.safetensors import read_safetensors
from trainmedic.run import Run
from trainmedic.signals.lora_layout import lora_pairs, lora_scaling
from trainmedic.signals.lowrank import effective_rank, log_outliers, lowrank_singular_values

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
REAL_ADAPTER = SHARED / "dlm_stores/healthy/adapter/versions/v0001/adapter_model.safetensors"
PREFIX = "base_model.model.model.layers"
SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64)}  # out, in


def lora_tensors(
    layers: int = 6,
    rank: int = 4,
    *,
    seed: int = 0,
    layer_gain: dict[int, float] | None = None,
    modules: dict[str, tuple[int, int]] = SHAPES,
    ranks: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """A trained-looking LoRA adapter: random A, B with similar norms in every layer."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for layer in range(layers):
        gain = (layer_gain or {}).get(layer, 1.0)
        for module, (n_out, n_in) in modules.items():
            r = (ranks or {}).get(module, rank)
            key = f"{PREFIX}.{layer}.self_attn.{module}"
            out[f"{key}.lora_A.weight"] = (rng.normal(size=(r, n_in)) / math.sqrt(n_in)).astype(np.float32)
            out[f"{key}.lora_B.weight"] = (gain * 0.01 * rng.normal(size=(n_out, r))).astype(np.float32)
    return out


def check(
    tmp_path: Path,
    tensors: dict[str, np.ndarray],
    config: dict[str, Any] | None = None,
    spec: AdapterWeightsSpec | None = None,
    name: str = "adapter_model.safetensors",
) -> Any:
    path = tmp_path / name
    save_file(tensors, str(path))
    if config is not None:
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    run = Run(path=tmp_path, layout="test", adapter=read_safetensors(path))
    finding = adapter_weights(run, spec or AdapterWeightsSpec())
    json.dumps(finding.evidence, allow_nan=False)  # evidence must be strict-JSON safe
    return finding


def test_healthy_adapter_passes_with_per_layer_evidence(tmp_path: Path) -> None:
    finding = check(tmp_path, lora_tensors(), {"r": 4, "lora_alpha": 8})

    assert finding.verdict is Verdict.PASS, finding.message
    assert finding.message.startswith("48 LoRA factors in 6 layers: all finite, update norms")
    assert "no odd layer" in finding.message
    per_layer = finding.evidence["per_layer"]
    assert set(per_layer) == {"metric", "layers", "values", "flagged"}
    assert per_layer["metric"] == PER_LAYER_METRIC
    assert per_layer["layers"] == [0, 1, 2, 3, 4, 5]
    assert len(per_layer["values"]) == 6 and all(v > 0 for v in per_layer["values"])
    assert per_layer["flagged"] == []
    assert finding.evidence["modules_total"] == 24 and len(finding.evidence["modules"]) == 24
    assert finding.evidence["thresholds"]["outlier_z"] == 3.5
    assert finding.evidence["lora"]["scale"].startswith("scale = lora_alpha / r")


def test_no_adapter_is_skipped() -> None:
    finding = adapter_weights(Run(path=Path("."), layout="test"), AdapterWeightsSpec())

    assert finding.verdict is Verdict.SKIP
    assert finding.message == "no adapter/model weights file found"


def test_every_b_factor_zero_fails_as_never_trained(tmp_path: Path) -> None:
    tensors = lora_tensors()
    for name in tensors:
        if ".lora_B." in name:
            tensors[name] = np.zeros_like(tensors[name])

    finding = check(tmp_path, tensors)

    assert finding.verdict is Verdict.FAIL
    assert "all 24 LoRA B factors are exactly zero" in finding.message
    assert "PEFT initialises B to zero, so the adapter never moved" in finding.message
    assert finding.score == 0.0


def test_some_b_factors_zero_warns_naming_them(tmp_path: Path) -> None:
    tensors = lora_tensors()
    tensors[f"{PREFIX}.2.self_attn.v_proj.lora_B.weight"][:] = 0.0

    finding = check(tmp_path, tensors)

    assert finding.verdict is Verdict.WARN
    assert "1 of 24 LoRA B factors are exactly zero (layer 2 self_attn.v_proj)" in finding.message
    assert finding.evidence["lora"]["zero_B"] == ["layer 2 self_attn.v_proj"]


def test_nan_in_one_tensor_fails_naming_it(tmp_path: Path) -> None:
    tensors = lora_tensors()
    tensors[f"{PREFIX}.3.self_attn.o_proj.lora_A.weight"][1, 5] = np.nan
    tensors[f"{PREFIX}.3.self_attn.o_proj.lora_A.weight"][0, 0] = np.inf

    finding = check(tmp_path, tensors)

    assert finding.verdict is Verdict.FAIL
    assert "1 of 48 tensors hold non-finite values (2 elements)" in finding.message
    assert "model.layers.3.self_attn.o_proj.lora_A.weight" in finding.message
    assert finding.evidence["nonfinite"]["first"][0]["count"] == 2


def test_inf_in_a_bf16_tensor_is_found_from_its_bits(tmp_path: Path) -> None:
    values = np.array([1.0, 2.0, np.inf, -np.inf, np.nan, 0.5], dtype=np.float32)
    body = json.dumps({"w": {"dtype": "BF16", "shape": [6], "data_offsets": [0, 12]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + (values.view("<u4") >> 16).astype("<u2").tobytes())

    run = Run(path=tmp_path, layout="test", adapter=read_safetensors(path))
    finding = adapter_weights(run, AdapterWeightsSpec())

    assert finding.verdict is Verdict.FAIL
    assert "(3 elements): w" in finding.message


def test_one_layer_with_20x_update_warns_naming_the_layer(tmp_path: Path) -> None:
    finding = check(tmp_path, lora_tensors(layers=8, layer_gain={5: 20.0}), {"r": 4, "lora_alpha": 8})

    assert finding.verdict is Verdict.WARN, finding.message
    assert "layer 5 self_attn.q_proj" in finding.message
    assert finding.evidence["per_layer"]["flagged"] == [5]
    ratios = [o["ratio_to_median"] for o in finding.evidence["outliers"]]
    assert len(ratios) == 4 and all(15 < r < 27 for r in ratios)
    assert all(row["flagged"] for row in finding.evidence["modules"][:4])  # odd rows come first


def test_one_layer_with_a_vanishing_update_warns_too(tmp_path: Path) -> None:
    finding = check(tmp_path, lora_tensors(layers=8, layer_gain={2: 0.02}))

    assert finding.verdict is Verdict.WARN
    assert finding.evidence["per_layer"]["flagged"] == [2]


def test_smooth_3x_trend_across_depth_passes(tmp_path: Path) -> None:
    gains = {layer: 3.0 ** (layer / 11) for layer in range(12)}

    finding = check(tmp_path, lora_tensors(layers=12, layer_gain=gains), {"r": 4, "lora_alpha": 8})

    assert finding.verdict is Verdict.PASS, finding.message
    values = finding.evidence["per_layer"]["values"]
    assert 2.2 < values[-1] / values[0] < 4.0


def test_too_few_layers_are_not_called_odd(tmp_path: Path) -> None:
    finding = check(tmp_path, lora_tensors(layers=3, layer_gain={1: 20.0}), {"r": 4, "lora_alpha": 8})

    assert finding.verdict is Verdict.PASS
    assert "too few layers for the odd-layer test" in finding.message


def test_threshold_comes_from_the_spec(tmp_path: Path) -> None:
    tensors = lora_tensors(layers=8, layer_gain={5: 20.0})

    finding = check(tmp_path, tensors, spec=AdapterWeightsSpec(outlier_min_ratio=50.0))

    assert finding.verdict is Verdict.PASS


def test_without_config_scale_is_one_and_the_message_says_so(tmp_path: Path) -> None:
    tensors = lora_tensors(layers=2)

    finding = check(tmp_path, tensors)

    assert finding.verdict is Verdict.PASS
    assert "scale 1: no usable adapter_config.json" in finding.message
    row = finding.evidence["modules"][0]
    a = tensors[f"{PREFIX}.0.self_attn.k_proj.lora_A.weight"].astype(np.float64)
    b = tensors[f"{PREFIX}.0.self_attn.k_proj.lora_B.weight"].astype(np.float64)
    assert row["module"] == "model.layers.0.self_attn.k_proj"
    assert row["frobenius"] == pytest.approx(np.linalg.norm(b @ a), rel=1e-5)
    assert row["top_singular_value"] == pytest.approx(np.linalg.norm(b @ a, 2), rel=1e-5)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"r": 4, "lora_alpha": 8}, {"q_proj": 2.0, "k_proj": 2.0, "v_proj": 2.0}),
        (
            {"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 32}},
            {"q_proj": 4.0, "k_proj": 2.0, "v_proj": 8.0},
        ),
        ({"r": 4, "lora_alpha": 8, "use_rslora": True}, {"q_proj": 4.0, "k_proj": 4.0, "v_proj": 4.0}),
        (
            {"r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"layers.0.self_attn.q_proj": 16}},
            {"q_proj": 2.0, "k_proj": 4.0, "v_proj": 4.0},
        ),
    ],
    ids=["alpha-over-r", "patterns", "rslora", "rslora-with-rank-pattern"],
)
def test_scale_follows_peft_config(
    tmp_path: Path, config: dict[str, Any], expected: dict[str, float]
) -> None:
    ranks = {"q_proj": next(iter(config.get("rank_pattern", {}).values()), 4)}
    modules = {m: SHAPES[m] for m in expected}
    tensors = lora_tensors(layers=1, modules=modules, ranks=ranks)

    finding = check(tmp_path, tensors, config)

    rows = {row["type"].split(".")[-1]: row for row in finding.evidence["modules"]}
    for module, scale in expected.items():
        assert rows[module]["scale"] == pytest.approx(scale), module
        key = f"{PREFIX}.0.self_attn.{module}"
        update = tensors[f"{key}.lora_B.weight"].astype(np.float64) @ tensors[f"{key}.lora_A.weight"]
        assert rows[module]["frobenius"] == pytest.approx(scale * np.linalg.norm(update), rel=1e-5)


def test_full_model_file_gets_only_the_finiteness_check(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tensors = {
        "model.embed_tokens.weight": rng.normal(size=(50, 16)).astype(np.float16),
        "model.layers.0.self_attn.q_proj.weight": rng.normal(size=(16, 16)).astype(np.float32),
        "model.layers.0.input_layernorm.weight": np.ones(16, dtype=np.float32),
        "position_ids": np.arange(8, dtype=np.int64),
    }

    finding = check(tmp_path, tensors, name="model.safetensors")

    assert finding.verdict is Verdict.PASS
    assert finding.message == "4 tensors all finite; no LoRA factors, so the LoRA checks did not apply"
    assert finding.evidence["lora"]["applied"] is False
    assert "per_layer" not in finding.evidence


def test_full_model_with_nan_fails(tmp_path: Path) -> None:
    weights = np.ones((4, 4), dtype=np.float16)
    weights[2, 2] = np.nan

    finding = check(tmp_path, {"lm_head.weight": weights}, name="model.safetensors")

    assert finding.verdict is Verdict.FAIL
    assert "lm_head.weight" in finding.message and "LoRA checks did not apply" in finding.message


def test_modules_to_save_tensors_are_checked_for_finiteness(tmp_path: Path) -> None:
    tensors = lora_tensors()
    head = np.ones((10, 64), dtype=np.float32)
    head[0, 0] = np.inf
    tensors["base_model.model.lm_head.modules_to_save.default.weight"] = head

    finding = check(tmp_path, tensors)

    assert finding.verdict is Verdict.FAIL
    assert "lm_head.modules_to_save.default.weight" in finding.message


def test_adapter_with_only_b_factors_is_not_passed(tmp_path: Path) -> None:
    tensors = {k: v for k, v in lora_tensors(layers=2).items() if ".lora_B." in k}

    finding = check(tmp_path, tensors)

    assert finding.verdict is Verdict.WARN
    assert "8 LoRA module(s) could not be measured (lora_A missing)" in finding.message


def test_embedding_and_conv_factors_are_measured(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    emb_a, emb_b = rng.normal(size=(4, 100)), rng.normal(size=(16, 4))
    conv_a, conv_b = rng.normal(size=(4, 3, 2, 2)), rng.normal(size=(8, 4, 1, 1))
    tensors = {
        "base_model.model.embed_tokens.lora_embedding_A": emb_a.astype(np.float32),
        "base_model.model.embed_tokens.lora_embedding_B": emb_b.astype(np.float32),
        "base_model.model.conv.lora_A.weight": conv_a.astype(np.float32),
        "base_model.model.conv.lora_B.weight": conv_b.astype(np.float32),
    }

    finding = check(tmp_path, tensors)

    assert finding.verdict is Verdict.PASS, finding.message
    rows = {row["module"]: row for row in finding.evidence["modules"]}
    conv_update = conv_b.reshape(8, 4) @ conv_a.reshape(4, 12)
    assert rows["embed_tokens"]["frobenius"] == pytest.approx(np.linalg.norm(emb_b @ emb_a), rel=1e-5)
    assert rows["conv"]["frobenius"] == pytest.approx(np.linalg.norm(conv_update), rel=1e-5)


def test_eight_bit_tensors_are_skipped_with_a_reason(tmp_path: Path) -> None:
    body = json.dumps(
        {
            "w8": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]},
            "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
        }
    ).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(4) + np.float32(1).tobytes())

    finding = adapter_weights(
        Run(path=tmp_path, layout="t", adapter=read_safetensors(path)), AdapterWeightsSpec()
    )

    assert finding.verdict is Verdict.PASS
    assert "1 skipped (undecoded dtypes)" in finding.message
    assert finding.evidence["skipped_tensors"] == [
        {"name": "w8", "dtype": "F8_E4M3", "reason": "8-bit float not decoded here"}
    ]


def test_small_batches_give_the_same_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = lora_tensors(layers=8, layer_gain={5: 20.0})
    tensors[f"{PREFIX}.1.self_attn.q_proj.lora_A.weight"][0, :3] = np.nan
    whole = check(tmp_path, tensors)
    monkeypatch.setattr(aw_module, "_CHUNK", 5)  # forces 1-pair batches and 5-element finiteness passes

    chunked = check(tmp_path, tensors)

    assert chunked.verdict is whole.verdict is Verdict.FAIL
    assert chunked.message == whole.message and "(3 elements)" in chunked.message
    assert chunked.evidence == whole.evidence


def test_empty_factor_is_reported_not_crashed_on(tmp_path: Path) -> None:
    tensors = lora_tensors(layers=1)
    tensors[f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"] = np.zeros((0, 64), dtype=np.float32)
    tensors[f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"] = np.zeros((64, 0), dtype=np.float32)

    finding = check(tmp_path, tensors)

    assert finding.verdict is Verdict.WARN
    assert finding.message.startswith("1 LoRA module(s) could not be measured")
    assert "not a non-empty matrix" in finding.message


def test_probe_is_registered_for_the_adapter(tmp_path: Path) -> None:
    probe = REGISTRY["adapter_weights"]
    save_file(lora_tensors(layers=1), str(tmp_path / "adapter_model.safetensors"))
    run = Run(path=tmp_path, layout="t", adapter=read_safetensors(tmp_path / "adapter_model.safetensors"))

    finding = run_probe(probe, run, probe.spec_cls())

    assert probe.needs == ("adapter",) and probe.spec_cls is AdapterWeightsSpec
    assert finding.name == finding.kind == "adapter_weights"
    assert finding.verdict is Verdict.PASS and finding.duration_s > 0


def test_spec_fields_have_reasons_and_reject_typos() -> None:
    for name, field in AdapterWeightsSpec.model_fields.items():
        if name != "enabled":
            assert field.description, name
    with pytest.raises(ValueError):
        AdapterWeightsSpec(outlier_zz=2.0)  # type: ignore[call-arg]


def test_lora_keys_parse_with_and_without_adapter_names() -> None:
    names = [
        "base_model.model.model.layers.10.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.10.self_attn.q_proj.lora_B.weight",
        "base_model.model.model.layers.2.mlp.up_proj.lora_A.default.weight",
        "base_model.model.model.layers.2.mlp.up_proj.lora_B.default.weight",
        "base_model.model.model.layers.2.mlp.up_proj.lora_A.bias",
        "base_model.model.model.layers.2.mlp.up_proj.lora_magnitude_vector",
        "base_model.model.embed_tokens.lora_embedding_A",
        "base_model.model.lm_head.weight",
    ]

    pairs = lora_pairs(names)

    assert [(p.layer, p.kind, p.adapter) for p in pairs] == [
        (2, "mlp.up_proj", ""),
        (10, "self_attn.q_proj", ""),
        (None, "embed_tokens", ""),
    ]
    assert pairs[2].a is not None and pairs[2].b is None


def test_bad_config_values_fall_back_to_scale_one() -> None:
    scaling = lora_scaling({"r": "eight", "lora_alpha": 16})

    assert scaling.config is None and scaling.scale("x.q_proj") == 1.0
    assert "no usable r / lora_alpha" in scaling.note


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3),
    out=st.integers(1, 40),
    r=st.integers(1, 9),
    inp=st.integers(1, 40),
    deficient=st.booleans(),
    scale=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_qr_singular_values_equal_those_of_the_full_update(
    n: int, out: int, r: int, inp: int, deficient: bool, scale: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(n, out, r))
    a = rng.normal(size=(n, r, inp))
    if deficient and r > 1:
        b[:, :, -1] = b[:, :, 0]  # repeated column: rank below r

    got = lowrank_singular_values(b, a, scale)

    for i in range(n):
        want = np.linalg.svd(scale * b[i] @ a[i], compute_uv=False)[: got.shape[1]]
        np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-6 * max(1.0, want[0]))


def test_effective_rank_counts_directions_carrying_the_update() -> None:
    ranks = effective_rank(np.array([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))

    np.testing.assert_allclose(ranks, [4.0, 1.0, 0.0])


def test_outlier_needs_both_a_large_z_and_a_large_ratio() -> None:
    tight = np.array([1.0, 1.01, 0.99, 1.02, 0.98, 1.0, 1.6])  # huge z, but only 1.6x
    wide = np.exp(np.array([-1.5, -0.75, 0.0, 0.75, 1.5, -1.0, 1.0, 1.4]))  # 4x, within the spread
    spike = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 20.0])

    assert not log_outliers(tight, z_threshold=3.5, min_ratio=3.0).flagged.any()
    assert not log_outliers(wide, z_threshold=3.5, min_ratio=3.0).flagged.any()
    out = log_outliers(spike, z_threshold=3.5, min_ratio=3.0)
    assert out.flagged.tolist() == [False] * 6 + [True]
    assert out.ratio[-1] == pytest.approx(20.0)


def test_outlier_in_a_sample_without_spread_has_infinite_z() -> None:
    out = log_outliers(np.array([2.0, 2.0, 2.0, 2.0, 0.1]), z_threshold=3.5, min_ratio=3.0)

    assert out.z.tolist() == [0.0, 0.0, 0.0, 0.0, -np.inf]
    assert out.flagged.tolist() == [False, False, False, False, True]


@pytest.mark.skipif(not REAL_ADAPTER.exists(), reason="shared dlm stores not present")
def test_real_dlm_adapter_passes() -> None:
    run = Run(path=REAL_ADAPTER.parent, layout="dlm store", adapter=read_safetensors(REAL_ADAPTER))

    finding = adapter_weights(run, AdapterWeightsSpec())

    assert finding.verdict is Verdict.PASS, finding.message
    assert finding.message.startswith("48 LoRA factors in 6 layers")
    assert finding.evidence["lora"]["scale"].startswith("scale = lora_alpha / r")
