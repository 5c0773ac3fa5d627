"""Real rounds on the toy base: every divergence, the reference pass, frozen history, the outputs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from trainmedic.findings import Verdict
from trainmedic.heal import heal_round


@pytest.mark.parametrize("divergence", ["nll", "kl_fwd", "kl_rev", "wd"])
def test_each_divergence_trains_a_checked_round(
    base_dir: Path, tmp_path: Path, divergence: str, records: Any, fast: dict[str, Any]
) -> None:
    out = tmp_path / "round"
    result = heal_round(base_dir, records(16), out, divergence=divergence, **fast)
    assert result.watch.status == "completed" and len(result.rows) == 8
    found = {f.name: f.verdict for f in result.expectations}
    assert found["nll_falls"] is Verdict.PASS and found["grad_norms_finite"] is Verdict.PASS
    assert found["divergence"] is Verdict.PASS
    divs = [r.divergence for r in result.rows]
    if divergence in ("kl_fwd", "kl_rev"):
        assert divs[0] == 0.0  # a fresh LoRA (B = 0) is exactly the original
        assert max(divs) > 0.0 and "barrier_fired" in found
    else:
        assert divs == [0.0] * 8 and "barrier_fired" not in found
    assert result.heal_nll == pytest.approx(sum(r.nll for r in result.rows[-5:]) / 5)
    saved = json.loads((tmp_path / "round" / "trainmedic-heal.json").read_text())
    assert saved["config"]["divergence"] == divergence and len(saved["steps"]) == 8
    assert (tmp_path / "round" / "adapter_model.safetensors").is_file()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
def test_a_round_loads_with_plain_peft_and_check_reads_its_run_log(base_dir: Path, round_one: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainmedic.check import check_paths
    from trainmedic.spec import default_spec

    base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
    ids = torch.tensor([[5, 300, 301, 302, 303]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        after = PeftModel.from_pretrained(base, str(round_one))(ids).logits
    assert not torch.allclose(before, after)
    (report,) = check_paths([round_one], default_spec(), jobs=1)
    verdicts = {f.name: f.verdict for f in report.findings}
    assert report.layout == "watched HF output dir"
    assert verdicts["nonfinite"] is Verdict.PASS and verdicts["live_events"] is Verdict.PASS


def test_the_reference_pass_switches_every_adapter_off_history_included(
    base_dir: Path, round_one: Path
) -> None:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from trainmedic.heal.adapters import attach, base_fingerprint, check_history, original_model

    def fresh() -> Any:
        return AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)

    history = check_history([round_one], fresh(), base_dir, base_fingerprint(base_dir))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model, frozen = attach(fresh(), config, history)
    ids = torch.tensor([[5, 300, 301, 302, 303]])
    with torch.no_grad():
        original = fresh()(ids).logits
        stacked = model(ids).logits
    with original_model(model, frozen):
        reference = model(ids).logits
    assert torch.allclose(reference, original, atol=1e-6)
    assert not torch.allclose(stacked, original, atol=1e-3)  # the history adapter is really applied
    # leaving disable_adapter() re-enables every active adapter's gradients; history must stay frozen
    assert frozen and not any(p.requires_grad for p in frozen)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)


def _optimized(trainer: Any) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}


def test_history_stays_frozen_and_only_the_new_adapter_is_optimized(
    base_dir: Path,
    round_one: Path,
    tmp_path: Path,
    capture_trainer: Callable[[], Any],
    records: Any,
    fast: dict[str, Any],
) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "r2"
    result = heal_round(base_dir, records(16, 16), out, history=[round_one], **fast)
    assert result.rows[0].divergence > 0.0  # at step 1 the model is base + history: not the original
    model = capture_trainer().model
    named = dict(model.named_parameters())
    new = {id(p) for n, p in named.items() if ".default." in n}
    assert set(_optimized(capture_trainer())) == new
    assert set(_optimized(capture_trainer()).values()) == {0.0}
    saved = load_file(str(round_one / "adapter_model.safetensors"))
    for key, value in saved.items():
        name = key.replace(".lora_A.weight", ".lora_A.history_0.weight").replace(
            ".lora_B.weight", ".lora_B.history_0.weight"
        )
        assert not named[name].requires_grad
        assert torch.equal(named[name].detach(), value), f"{name} changed during the round"


def test_wd_decays_the_new_adapter_and_nothing_else(
    base_dir: Path, tmp_path: Path, capture_trainer: Callable[[], Any], records: Any, fast: dict[str, Any]
) -> None:
    heal_round(base_dir, records(16), tmp_path / "wd", divergence="wd", lam=0.5, **fast)
    trainer = capture_trainer()
    decayed = {pid for pid, wd in _optimized(trainer).items() if wd > 0}
    lora = {id(p) for n, p in trainer.model.named_parameters() if ".default." in n and "lora_" in n}
    assert decayed == lora and set(_optimized(trainer).values()) == {0.5}
