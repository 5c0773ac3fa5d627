"""Synthetic run artifacts in the real formats: dlm stores, HF output dirs, JSONL logs.

They exercise `check` end to end (tests, benchmarks, the bundled examples) without a training run.
Writing `.pt` files needs torch, imported only inside the functions that write them; the
adapters are written with `safetensors`' numpy API, so both come from the `train` extra.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainmedic.toy.shapes import ModelShape


@dataclass(frozen=True)
class LoraParam:
    module_name: str  # as in named_parameters(), PEFT's ".default" included
    key: str  # as in adapter_model.safetensors (".default" dropped)
    shape: tuple[int, int]
    layer: int


def lora_params(shape: ModelShape, rank: int) -> list[LoraParam]:
    """Trainable LoRA parameters in the model's module order (the optimizer's id order)."""
    out = []
    order = [m for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
    for layer in range(shape.layers):
        for module in (m for m in order if m in shape.modules):
            fan_in, fan_out = shape.io(module)
            base = f"base_model.model.model.layers.{layer}.{shape.prefix(module)}.{module}"
            for factor, dims in (("lora_A", (rank, fan_in)), ("lora_B", (fan_out, rank))):
                out.append(
                    LoraParam(f"{base}.{factor}.default.weight", f"{base}.{factor}.weight", dims, layer)
                )
    return out


def loss_curve(kind: str, n: int, *, seed: int = 0, start: float = 2.5, floor: float = 0.6) -> np.ndarray:
    """A per-logged-point loss curve: 'healthy', 'diverged', 'flat', 'nan' or 'spiky'."""
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=np.float64)
    noise = 1.0 + 0.05 * rng.standard_normal(n)
    healthy = (floor + (start - floor) * np.exp(-t / max(1.0, n / 6))) * noise
    if kind == "healthy":
        return healthy
    if kind == "flat":
        return np.full(n, start) * noise
    if kind == "diverged":
        onset = n // 2
        rise = np.where(t > onset, np.exp((t - onset) / max(1.0, n / 10)) - 1.0, 0.0)
        return healthy + rise
    if kind == "spiky":
        out = healthy.copy()
        out[rng.choice(np.arange(n // 4, n), size=max(1, n // 50), replace=False)] *= 4.0
        return out
    if kind == "nan":
        out = healthy.copy()
        out[int(n * 0.7) :] = np.nan
        return out
    raise ValueError(f"unknown curve kind {kind!r}")


def lora_weights(
    shape: ModelShape, rank: int, *, seed: int = 0, zero_b: bool = False
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {}
    for p in lora_params(shape, rank):
        if "lora_B" in p.key and zero_b:
            tensors[p.key] = np.zeros(p.shape, np.float32)
        else:
            scale = 0.02 if "lora_B" in p.key else 1.0 / np.sqrt(p.shape[1])
            tensors[p.key] = (scale * rng.standard_normal(p.shape)).astype(np.float32)
    return tensors


def adapter_config(shape: ModelShape, rank: int) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": shape.name,
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(shape.modules),
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "modules_to_save": None,
    }


def optimizer_state(shape: ModelShape, rank: int, *, seed: int = 0, step: int = 300) -> dict[str, Any]:
    """An AdamW `state_dict()` for the LoRA parameters, as torch tensors."""
    import torch

    rng = np.random.default_rng(seed + 1)
    state = {}
    for i, p in enumerate(lora_params(shape, rank)):
        depth = 1.0 + p.layer / max(1, shape.layers - 1)  # a mild, legitimate trend over depth
        sq = (1e-8 * depth * rng.lognormal(0.0, 0.3, p.shape)).astype(np.float32)
        avg = (1e-5 * rng.standard_normal(p.shape)).astype(np.float32)
        state[i] = {
            "step": torch.tensor(float(step)),
            "exp_avg": torch.from_numpy(avg),
            "exp_avg_sq": torch.from_numpy(sq),
        }
    group = {"lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False}
    return {"state": state, "param_groups": [{**group, "params": list(state)}]}


def _save_adapter(directory: Path, shape: ModelShape, rank: int, *, seed: int, zero_b: bool) -> None:
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        lora_weights(shape, rank, seed=seed, zero_b=zero_b), str(directory / "adapter_model.safetensors")
    )
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config(shape, rank), indent=2))


def _timestamps(n: int) -> Iterator[str]:
    for i in range(n):
        yield f"2026-11-21T10:{(i // 60) % 60:02d}:{i % 60:02d}"


def write_dlm_store(
    root: Path,
    shape: ModelShape,
    *,
    rank: int = 8,
    logged_steps: int = 300,
    every: int = 10,
    curve: str = "healthy",
    seed: int = 0,
    zero_b: bool = False,
) -> Path:
    """A dlm-style store: one training run, one adapter version, logs every `every` steps."""
    import torch

    steps = logged_steps * every
    losses = loss_curve(curve, logged_steps, seed=seed)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"type": "banner", "run_id": 1, "seed": seed, "plan": {"micro_batch_size": 4}})]
    for i, (loss, ts) in enumerate(zip(losses, _timestamps(logged_steps), strict=True)):
        finite = bool(np.isfinite(loss))
        rec = {
            "grad_norm": float(0.5 * loss) if finite else float("nan"),
            "loss": float(loss) if finite else 0.0,
            "lr": 2e-4,
            "step": (i + 1) * every,
            "timestamp": ts,
            "tokens_per_sec": 1000.0,
            "type": "step",
            "val_loss": None,
        }
        lines.append(json.dumps(rec))
    lines.append(json.dumps({"type": "run_complete", "run_id": 1, "adapter_version": 1, "steps": steps}))
    (logs / "train-000001-20261121T100000.jsonl").write_text("\n".join(lines) + "\n")
    version = root / "adapter" / "versions" / "v0001"
    _save_adapter(version, shape, rank, seed=seed, zero_b=zero_b)
    (root / "adapter" / "current.txt").write_text("v0001\n")
    state = {
        "global_step": steps,
        "epoch": 1.0,
        "best_val_loss": float(np.nanmin(losses)),
        "use_qlora": False,
        "optimizer_state_dict": optimizer_state(shape, rank, seed=seed, step=steps),
    }
    torch.save(state, version / "training_state.pt")
    return root


def write_hf_run(
    root: Path,
    shape: ModelShape,
    *,
    rank: int = 8,
    logged_steps: int = 50,
    every: int = 10,
    curve: str = "healthy",
    seed: int = 0,
    evals: int = 0,
    with_optimizer: bool = True,
) -> Path:
    """An HF Trainer output dir: root trainer_state.json and one complete checkpoint."""
    import torch

    losses = loss_curve(curve, logged_steps, seed=seed)
    history: list[dict[str, Any]] = []
    for i, loss in enumerate(losses):
        step = (i + 1) * every
        history.append(
            {
                "epoch": step / (logged_steps * every),
                "grad_norm": float(0.5 * loss),
                "learning_rate": 2e-4,
                "loss": round(float(loss), 4),
                "step": step,
            }
        )
        if evals and (i + 1) % max(1, logged_steps // evals) == 0:
            history.append({"epoch": history[-1]["epoch"], "eval_loss": float(loss) * 1.1, "step": step})
    steps = logged_steps * every
    state = {
        "global_step": steps,
        "max_steps": steps,
        "epoch": 1.0,
        "log_history": history,
        "logging_steps": every,
        "best_model_checkpoint": None,
    }
    ckpt = root / f"checkpoint-{steps}"
    _save_adapter(ckpt, shape, rank, seed=seed, zero_b=False)
    (ckpt / "trainer_state.json").write_text(json.dumps(state, indent=2))
    (root / "trainer_state.json").write_text(json.dumps(state, indent=2))
    if with_optimizer:
        torch.save(optimizer_state(shape, rank, seed=seed, step=steps), ckpt / "optimizer.pt")
    return root


def write_step_log(path: Path, n_steps: int, *, seed: int = 0, chunk: int = 100_000) -> Path:
    """A long per-step JSONL log (trainmedic/dlm `step` records), written in chunks."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fh.write(json.dumps({"type": "banner", "run_id": 1, "writer": "trainmedic"}) + "\n")
        for lo in range(0, n_steps, chunk):
            t = np.arange(lo, min(n_steps, lo + chunk), dtype=np.float64)
            loss = (0.6 + 1.9 * np.exp(-t / (n_steps / 6))) * (1 + 0.05 * rng.standard_normal(t.size))
            grad = 0.5 * loss * (1 + 0.1 * rng.standard_normal(t.size))
            fh.write(
                "".join(
                    f'{{"grad_norm": {g:.6f}, "loss": {lv:.6f}, "lr": 0.0002, "step": {int(s) + 1}, '
                    f'"timestamp": "2026-11-21T10:00:00", "tokens_per_sec": 1234.5, "type": "step", '
                    f'"val_loss": null}}\n'
                    for s, lv, g in zip(t, loss, grad, strict=True)
                )
            )
    return path
