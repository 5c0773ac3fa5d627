"""gradient_ghost: verdicts from Adam's second moments, per layer against the depth trend."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainmedic.findings import Finding, Problem, Verdict
from trainmedic.probes.base import REGISTRY, run_probe
from trainmedic.probes.gradient_ghost import GradientGhostSpec, gradient_ghost, trend_ratios
from trainmedic.record.optimizer import optimizer_state_from
from trainmedic.run import AdapterWeights, Run, TensorInfo

HIDDEN, KV, RANK = 128, 64, 8
MODULES = (("q_proj", HIDDEN), ("k_proj", KV), ("v_proj", KV), ("o_proj", HIDDEN))
# Typical relative levels of the modules' second moments (B factors see larger gradients).
LEVEL = {"lora_A": 1e-8, "lora_B": 2e-7}
PREFIX = "base_model.model.model.layers"


def lora_tensors(layers: int) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, layer) in module order for a Llama-like GQA LoRA on q/k/v/o."""
    out = []
    for layer in range(layers):
        for mod, width in MODULES:
            out.append((f"{PREFIX}.{layer}.self_attn.{mod}.lora_A.weight", (RANK, HIDDEN), layer))
            out.append((f"{PREFIX}.{layer}.self_attn.{mod}.lora_B.weight", (width, RANK), layer))
    return out


def adapter_of(tensors: list[tuple[str, tuple[int, ...], Any]]) -> AdapterWeights:
    """An adapter header with keys in safetensors' alphabetical order; no data is needed."""
    header = {n: TensorInfo(n, "F32", s, 0, 0) for n, s, _ in sorted(tensors)}
    return AdapterWeights(source=Path("adapter_model.safetensors"), header=header, arrays={})


def adam_entry(shape: tuple[int, ...], level: float, rng: np.random.Generator, step: int) -> dict[str, Any]:
    sq = (level * rng.uniform(0.5, 1.5, size=shape)).astype(np.float32)
    return {
        "step": np.array(float(step), dtype=np.float32),
        "exp_avg": rng.normal(scale=math.sqrt(level), size=shape).astype(np.float32),
        "exp_avg_sq": sq,
    }


def dlm_obj(scales: list[float], *, step: int = 200, seed: int = 0, extra: int = 0) -> dict[str, Any]:
    """A dlm training_state dict (as the torch reader returns it) whose layer l is scaled by scales[l]."""
    rng = np.random.default_rng(seed)
    tensors = lora_tensors(len(scales))
    state = {
        i: adam_entry(shape, LEVEL[name.split(".")[-2]] * scales[layer], rng, step)
        for i, (name, shape, layer) in enumerate(tensors)
    }
    ids = list(range(len(tensors) + extra))
    return {
        "global_step": step,
        "epoch": 3.0,
        "best_val_loss": 0.42,
        "use_qlora": False,
        "optimizer_state_dict": {
            "state": state,
            "param_groups": [{"lr": 1e-4, "weight_decay": 0.0, "betas": (0.9, 0.999), "params": ids}],
        },
    }


def check(obj: dict[str, Any], *, adapter: AdapterWeights | None, **spec: Any) -> Finding:
    opt = optimizer_state_from(obj, Path("training_state.pt"), adapter=adapter)
    run = Run(path=Path("store"), layout="dlm store", optimizer=opt, adapter=adapter)
    return gradient_ghost(run, GradientGhostSpec(**spec))


def check_layers(scales: list[float], *, with_adapter: bool = True, **spec: Any) -> Finding:
    adapter = adapter_of(lora_tensors(len(scales))) if with_adapter else None
    return check(dlm_obj(scales), adapter=adapter, **spec)


def assert_json_safe(evidence: dict[str, Any]) -> None:
    json.dumps(evidence, allow_nan=False)


def test_healthy_run_passes_with_the_chart_evidence() -> None:
    f = check_layers([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.1, 0.9])
    assert f.verdict is Verdict.PASS and f.score == 0.9
    pl = f.evidence["per_layer"]
    assert list(pl) == ["metric", "layers", "values", "flagged"]
    assert pl["metric"] == "mean exp_avg_sq (Adam second moment)"
    assert pl["layers"] == list(range(8)) and len(pl["values"]) == 8 and pl["flagged"] == []
    assert f.evidence["global_step"] == 200 and f.evidence["epoch"] == 3.0
    assert f.evidence["best_val_loss"] == 0.42 and f.evidence["use_qlora"] is False
    assert f.evidence["n_params"] == 64 and f.evidence["n_layers"] == 8
    assert f.evidence["nonfinite_entries"] == 0 and len(f.evidence["worst_layers"]) == 3
    assert "depth trend through its neighbours" in f.message and "global mean" not in f.message
    assert_json_safe(f.evidence)


def test_missing_optimizer_state_is_skipped() -> None:
    f = gradient_ghost(Run(path=Path("x"), layout="dlm store"), GradientGhostSpec())
    assert f.verdict is Verdict.SKIP and "no optimizer state" in f.message


def test_unreadable_optimizer_state_is_an_error_through_the_registry() -> None:
    run = Run(path=Path("x"), layout="dlm store")
    run.problems.append(Problem("x/training_state.pt", "truncated zip", artifact="optimizer"))
    f = run_probe(REGISTRY["gradient_ghost"], run, GradientGhostSpec())
    assert f.verdict is Verdict.ERROR and "training_state.pt" in f.message


def test_too_few_steps_is_severely_undertrained() -> None:
    obj = dlm_obj([1.0] * 6, step=12)
    f = check(obj, adapter=adapter_of(lora_tensors(6)))
    assert f.verdict is Verdict.FAIL and f.score == 0.0
    assert "severely undertrained" in f.message and "12" in f.message


def test_step_count_falls_back_to_adams_counter_without_global_step() -> None:
    obj = dlm_obj([1.0] * 6, step=20)
    del obj["global_step"]
    f = check(obj, adapter=adapter_of(lora_tensors(6)))
    assert f.verdict is Verdict.FAIL and f.evidence["global_step_source"] == "Adam step counter"


def test_all_zero_second_moments_fail_as_no_gradient() -> None:
    obj = dlm_obj([1.0] * 6)
    for entry in obj["optimizer_state_dict"]["state"].values():
        entry["exp_avg_sq"][:] = 0
    f = check(obj, adapter=adapter_of(lora_tensors(6)))
    assert f.verdict is Verdict.FAIL and f.score == 0.0
    assert "no gradient ever reached" in f.message


def test_every_parameter_non_finite_fails() -> None:
    obj = dlm_obj([1.0] * 6)
    for entry in obj["optimizer_state_dict"]["state"].values():
        entry["exp_avg_sq"][0, 0] = np.nan
    f = check(obj, adapter=adapter_of(lora_tensors(6)))
    assert f.verdict is Verdict.FAIL and f.evidence["nonfinite_entries"] == 48


def test_mostly_non_finite_fails() -> None:
    obj = dlm_obj([1.0] * 6)
    for i, entry in obj["optimizer_state_dict"]["state"].items():
        if i % 3:
            entry["exp_avg_sq"][:] = np.inf
    f = check(obj, adapter=adapter_of(lora_tensors(6)))
    assert f.verdict is Verdict.FAIL and "mostly non-finite" in f.message
    assert f.evidence["nonfinite_params"] == 32


def test_a_few_non_finite_parameters_warn_and_stay_json_safe() -> None:
    obj = dlm_obj([1.0] * 6)
    obj["optimizer_state_dict"]["state"][5]["exp_avg_sq"][1, :] = np.nan
    obj["best_val_loss"] = float("inf")
    f = check(obj, adapter=adapter_of(lora_tensors(6)))
    assert f.verdict is Verdict.WARN and "NaN/Inf" in f.message
    assert f.evidence["nonfinite_entries"] == 8 and f.evidence["best_val_loss"] is None
    assert_json_safe(f.evidence)


def test_sgd_without_second_moment_is_skipped_not_passed() -> None:
    obj = dlm_obj([1.0] * 6)
    sd = obj["optimizer_state_dict"]
    sd["state"] = {i: {"momentum_buffer": e["exp_avg"]} for i, e in sd["state"].items()}
    f = check(obj, adapter=adapter_of(lora_tensors(6)))
    assert f.verdict is Verdict.SKIP and "no second moment" in f.message and "momentum_buffer" in f.message


def test_lion_with_first_moment_only_is_skipped() -> None:
    obj = dlm_obj([1.0] * 6)
    for entry in obj["optimizer_state_dict"]["state"].values():
        del entry["exp_avg_sq"]
    f = check(obj, adapter=adapter_of(lora_tensors(6)))
    assert f.verdict is Verdict.SKIP and "exp_avg" in f.message


def bnb_entry(sq: np.ndarray, *, corrupt: bool = False) -> dict[str, Any]:
    """bitsandbytes-style blockwise 8-bit state2: codes into an ascending map, per-256-block absmax."""
    qmap = np.linspace(0.0, 1.0, 256, dtype=np.float32) ** 2
    flat = sq.reshape(-1).astype(np.float64)
    blocks = -(-flat.size // 256)
    padded = np.zeros(blocks * 256)
    padded[: flat.size] = flat
    absmax = padded.reshape(blocks, 256).max(axis=1)
    norm = padded.reshape(blocks, 256) / absmax[:, None]
    codes = np.abs(norm[..., None] - qmap).argmin(axis=-1).astype(np.uint8).reshape(-1)[: flat.size]
    if corrupt:
        absmax = absmax * 0 + 1.0  # scales no longer match the codes
        codes = np.minimum(codes, 200).astype(np.uint8)
    return {
        "step": 200,
        "state1": np.zeros(sq.shape, dtype=np.uint8),
        "state2": codes.reshape(sq.shape),
        "qmap1": qmap,
        "qmap2": qmap,
        "absmax1": np.ones(blocks, dtype=np.float32),
        "absmax2": absmax.astype(np.float32),
    }


@pytest.mark.parametrize("corrupt", [False, True])
def test_bitsandbytes_8bit_state_is_decoded_only_when_verified(corrupt: bool) -> None:
    obj = dlm_obj([1.0] * 6)
    sd = obj["optimizer_state_dict"]
    sd["state"] = {i: bnb_entry(e["exp_avg_sq"], corrupt=corrupt) for i, e in sd["state"].items()}
    f = check(obj, adapter=adapter_of(lora_tensors(6)))
    if corrupt:
        assert f.verdict is Verdict.SKIP and "bitsandbytes 8-bit" in f.message and "verified" in f.message
    else:
        assert f.verdict is Verdict.PASS and "decoded from bitsandbytes" in f.evidence["second_moment_source"]


def test_without_adapter_names_the_verdict_is_never_pass() -> None:
    f = check_layers([1.0] * 6, with_adapter=False)
    assert f.verdict is Verdict.WARN
    assert "checked 48 parameters" in f.message and "not checked: per-layer comparison" in f.message


def test_deleting_the_adapter_cannot_turn_a_fail_into_a_pass() -> None:
    scales = [1, 5, 1, 1, 5, 1, 1, 5, 1, 1.0]
    assert check_layers(scales).verdict is Verdict.FAIL
    assert check_layers(scales, with_adapter=False).verdict is Verdict.WARN


def test_smooth_threefold_depth_trend_passes() -> None:
    scales = [3.0 ** (i / 7) for i in range(8)]
    f = check_layers(scales)
    values = f.evidence["per_layer"]["values"]
    assert max(values) / min(values) > 2.5  # the seed's "vs the calmest layer" rule would flag this
    assert f.verdict is Verdict.PASS and f.evidence["flagged_layers"] == []


def test_smooth_u_shaped_profile_passes() -> None:
    scales = [1 + 0.08 * (i - 5) ** 2 for i in range(11)]
    assert check_layers(scales).verdict is Verdict.PASS


def test_one_layer_five_times_its_neighbours_warns_naming_it() -> None:
    scales = [3.0 ** (i / 7) for i in range(8)]
    scales[3] *= 5
    f = check_layers(scales)
    assert f.verdict is Verdict.WARN and f.score == 0.7
    assert "layer 3 at" in f.message and f.evidence["flagged_layers"] == [3]
    assert f.evidence["per_layer"]["flagged"] == [3] and f.evidence["worst_layers"][0]["layer"] == 3


def test_more_than_thirty_percent_odd_layers_fail() -> None:
    f = check_layers([1, 5, 1, 1, 5, 1, 1, 5, 1, 1.0])
    assert f.verdict is Verdict.FAIL and f.score == 0.3
    assert f.evidence["flagged_layers"] == [1, 4, 7] and "38% > 30%" in f.message


def test_edge_layers_are_shown_but_judged_only_on_request() -> None:
    scales = [30.0] + [1.0] * 7  # healthy runs put the first layer 10-100x above the rest
    f = check_layers(scales)
    assert f.verdict is Verdict.PASS and f.evidence["edge_layers_not_judged"] == [0, 7]
    assert check_layers(scales, judge_edge_layers=True).evidence["flagged_layers"] == [0]


def test_too_few_layers_to_compare_is_not_a_pass() -> None:
    f = check_layers([1.0, 1.0, 1.0, 1.0])
    assert f.verdict is Verdict.WARN and "2 interior layers" in f.message


def test_non_uniform_layer_counts_are_not_grouped_and_say_so() -> None:
    tensors = lora_tensors(6)[:-2]  # last layer lost its o_proj
    obj = dlm_obj([1.0] * 6)
    sd = obj["optimizer_state_dict"]
    del sd["state"][46], sd["state"][47]
    sd["param_groups"][0]["params"] = list(range(46))
    f = check(obj, adapter=adapter_of(tensors))
    assert f.verdict is Verdict.WARN and "non-uniform" in f.message and "per_layer" not in f.evidence


def test_a_parameter_with_zero_second_moment_warns() -> None:
    obj = dlm_obj([1.0] * 6)
    obj["optimizer_state_dict"]["state"][9]["exp_avg_sq"][:] = 0
    f = check(obj, adapter=adapter_of(lora_tensors(6)))
    assert f.verdict is Verdict.WARN and "never got a gradient" in f.message
    assert (
        f.evidence["zero_params"] == 1
        and "layers.1.self_attn.q_proj.lora_B" in f.evidence["zero_param_names"][0]
    )


def test_modules_to_save_parameter_is_included_outside_the_layer_view() -> None:
    obj = dlm_obj([1.0] * 6, extra=1)
    rng = np.random.default_rng(1)
    obj["optimizer_state_dict"]["state"][48] = adam_entry((50, HIDDEN), 1e-6, rng, 200)
    tensors = [*lora_tensors(6), ("base_model.model.lm_head.weight", (50, HIDDEN), None)]
    f = check(obj, adapter=adapter_of(tensors))
    assert f.verdict is Verdict.PASS and f.evidence["mapping_verified"]
    assert f.evidence["n_params"] == 49 and f.evidence["n_params_outside_layers"] == 1


def test_hf_optimizer_with_two_param_groups_maps_names_and_passes(tmp_path: Path) -> None:
    obj = dlm_obj([1.0, 1.2, 0.9, 1.1, 1.0, 0.95], extra=1)
    sd = obj["optimizer_state_dict"]
    sd["state"][48] = adam_entry((HIDDEN,), 1e-9, np.random.default_rng(2), 200)
    sd["param_groups"] = [
        {"lr": 1e-4, "weight_decay": 0.01, "params": list(range(48))},
        {"lr": 1e-4, "weight_decay": 0.0, "params": [48]},
    ]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 200, "epoch": 2.0}))
    tensors = [*lora_tensors(6), ("base_model.model.model.norm.weight", (HIDDEN,), None)]
    adapter = adapter_of(tensors)
    opt = optimizer_state_from(sd, tmp_path / "optimizer.pt", adapter=adapter)
    f = gradient_ghost(Run(path=tmp_path, layout="HF checkpoint", optimizer=opt), GradientGhostSpec())
    assert f.verdict is Verdict.PASS and f.evidence["global_step"] == 200 and f.evidence["epoch"] == 2.0
    assert opt.params[48].name == "base_model.model.model.norm.weight" and opt.params[48].group == 1


def test_names_are_mapped_from_the_run_adapter_when_the_reader_had_none() -> None:
    scales = [1.0] * 8
    scales[4] = 6.0
    obj = dlm_obj(scales)
    opt = optimizer_state_from(obj, Path("training_state.pt"), adapter=None)
    run = Run(path=Path("s"), layout="dlm store", optimizer=opt, adapter=adapter_of(lora_tensors(8)))
    f = gradient_ghost(run, GradientGhostSpec())
    assert f.verdict is Verdict.WARN and f.evidence["flagged_layers"] == [4]
    assert opt.params[0].name is None  # the probe did not write into the run


def test_trend_ratios_ignore_a_log_linear_trend_and_find_the_odd_point() -> None:
    x = np.arange(10, dtype=float)
    y = 0.3 * x
    ratio, trend = trend_ratios(x, y, 2)
    assert np.allclose(ratio, 1.0) and math.isclose(trend, math.exp(2.7))
    y[6] += math.log(5)
    ratio, _ = trend_ratios(x, y, 2)
    assert ratio.argmax() == 6 and ratio[6] > 4 and np.delete(ratio, 6).max() < 1.5


def test_summarising_a_large_state_reads_each_array_once(monkeypatch: pytest.MonkeyPatch) -> None:
    obj = dlm_obj([1.0] * 6)
    calls: list[int] = []
    real_mean = np.ndarray.mean

    class Counted(np.ndarray):
        def mean(self, *args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return real_mean(np.asarray(self), *args, **kwargs)

    for entry in obj["optimizer_state_dict"]["state"].values():
        entry["exp_avg_sq"] = entry["exp_avg_sq"].view(Counted)
    f = check(obj, adapter=adapter_of(lora_tensors(6)))
    assert f.verdict is Verdict.PASS and len(calls) == 48


@pytest.mark.parametrize("form", ["dlm", "hf"])
def test_real_torch_files_round_trip_through_the_safe_reader(tmp_path: Path, form: str) -> None:
    torch = pytest.importorskip("torch")
    torchfile = pytest.importorskip("trainmedic.record.torchfile")
    from safetensors.numpy import save_file

    from trainmedic.record.safetensors import read_safetensors

    obj = dlm_obj([1.0, 1.1, 0.9, 1.0, 1.05, 0.95])
    sd = obj["optimizer_state_dict"]
    tensors = lora_tensors(6)
    state = {i: {k: torch.from_numpy(np.asarray(v)) for k, v in e.items()} for i, e in sd["state"].items()}
    if form == "hf":
        state[48] = {
            k: torch.from_numpy(v)
            for k, v in adam_entry((HIDDEN,), 1e-9, np.random.default_rng(3), 200).items()
        }
        groups = [
            {"lr": 1e-4, "weight_decay": 0.01, "params": list(range(48))},
            {"lr": 1e-4, "weight_decay": 0.0, "params": [48]},
        ]
        tensors = [*tensors, ("base_model.model.model.norm.weight", (HIDDEN,), None)]
        path = tmp_path / "optimizer.pt"
        torch.save({"state": state, "param_groups": groups}, path)
        (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 200, "epoch": 2.0}))
    else:
        path = tmp_path / "training_state.pt"
        torch.save(
            {**obj, "optimizer_state_dict": {"state": state, "param_groups": sd["param_groups"]}}, path
        )
    save_file(
        {n: np.zeros(s, dtype=np.float32) for n, s, _ in tensors}, tmp_path / "adapter_model.safetensors"
    )
    adapter = read_safetensors(tmp_path / "adapter_model.safetensors")
    opt = optimizer_state_from(torchfile.load_torch_file(path), path, adapter=adapter)
    assert opt.mapping_verified, opt.mapping_note
    f = gradient_ghost(Run(path=tmp_path, layout=form, optimizer=opt, adapter=adapter), GradientGhostSpec())
    assert f.verdict is Verdict.PASS and f.evidence["global_step"] == 200


def test_unknown_step_count_is_not_a_pass() -> None:
    obj = dlm_obj([1.0] * 6)
    del obj["global_step"]
    for entry in obj["optimizer_state_dict"]["state"].values():
        del entry["step"]
    f = check(obj, adapter=adapter_of(lora_tensors(6)))
    assert f.verdict is Verdict.WARN and "not checked: step count" in f.message
    assert f.evidence["global_step"] is None and "at step" not in f.message
