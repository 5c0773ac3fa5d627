"""adapter_weights: is the saved adapter finite, did it move, and is any layer's update odd?

Reads only the safetensors file (no base model). PEFT initialises every LoRA `B` to zero, so an
adapter whose `B`s are all still zero is exactly the model it started from, whatever the loss
curve said. The size of each module's update `scale * B @ A` comes from its singular values,
computed exactly from the small factors (see `signals.lowrank`); a layer whose update is far
larger or smaller than the same projection's in the other layers is the mark of a blow-up or a
layer that never trained, while a steady trend across depth is normal and not flagged.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from trainmedic.findings import Finding, Verdict
from trainmedic.probes.base import ProbeSpec, register
from trainmedic.record.safetensors import FLOAT_DTYPES, RAW_DTYPES, LazyTensors
from trainmedic.run import AdapterWeights, Run
from trainmedic.signals.lora_layout import LoraPair, LoraScaling, lora_pairs, lora_scaling, short_name
from trainmedic.signals.lowrank import effective_rank, log_outliers, lowrank_singular_values

KIND = "adapter_weights"
PER_LAYER_METRIC = "LoRA update norm ||scale*B@A||_F"
_CHUNK = 1 << 22  # elements per finiteness pass: bounds the temporary memory on full models
_NAMES_SHOWN = 3


class AdapterWeightsSpec(ProbeSpec):
    outlier_z: float = Field(
        3.5,
        gt=0,
        description="robust z-score (MAD) of log update norm beyond which a layer stands out; "
        "3.5 is the usual cut-off for modified z-scores (Iglewicz & Hoaglin)",
    )
    outlier_min_ratio: float = Field(
        3.0,
        gt=1,
        description="an odd layer must also differ from the median of its module type by this factor "
        "either way; healthy adapters' per-layer norms vary by up to ~2x, mostly with depth",
    )
    min_layers: int = Field(
        5,
        ge=3,
        description="fewest layers of one module type for the outlier test; with fewer, the median "
        "and MAD are too unstable to call any layer odd",
    )
    max_table_rows: int = Field(
        64, ge=0, description="rows of the per-module table kept in the evidence (odd ones first)"
    )


@dataclass
class _Update:
    pair: LoraPair
    scale: float
    s: np.ndarray  # singular values of scale * B @ A, descending
    norm: float  # Frobenius norm of scale * B @ A
    eff_rank: float
    zero_b: bool
    ratio: float | None = None
    z: float | None = None
    flagged: bool = False


@register(
    KIND,
    AdapterWeightsSpec,
    needs=("adapter",),
    summary="adapter weights finite, LoRA B factors moved off zero, no layer's update out of line",
)
def adapter_weights(run: Run, spec: AdapterWeightsSpec) -> Finding:
    adapter = run.adapter
    if adapter is None:
        return _finding(Verdict.SKIP, "no adapter/model weights file found", None, {})
    if not adapter.header:
        return _finding(Verdict.SKIP, f"{adapter.source.name} holds no tensors", None, _base(adapter))
    evidence = _base(adapter)
    nonfinite, checked, skipped = _scan_finite(adapter)
    bad_elems = sum(nonfinite.values())
    evidence["nonfinite"] = {
        "tensors": len(nonfinite),
        "elements": bad_elems,
        "first": [{"name": n, "count": c} for n, c in list(nonfinite.items())[:10]],
    }
    evidence["skipped_tensors"] = skipped[:20]
    evidence["counts"] = {"tensors": len(adapter.header), "tensors_checked": checked, "skipped": len(skipped)}
    evidence["thresholds"] = spec.model_dump(exclude={"enabled"})

    pairs = lora_pairs(adapter.header)
    fails: list[str] = []
    warns: list[str] = []
    if nonfinite:
        names = ", ".join(short_name(n) for n in list(nonfinite)[:_NAMES_SHOWN])
        more = f" and {len(nonfinite) - _NAMES_SHOWN} more" if len(nonfinite) > _NAMES_SHOWN else ""
        fails.append(
            f"{len(nonfinite)} of {len(adapter.header)} tensors hold non-finite values "
            f"({bad_elems} elements): {names}{more}"
        )
    if not pairs:
        evidence["lora"] = {"applied": False, "reason": "no lora_A / lora_B tensors in the file"}
        return _full_model_verdict(adapter, fails, checked, skipped, evidence)

    updates, malformed, scaling = _lora_updates(adapter, pairs, set(nonfinite))
    zero_b = _zero_b(adapter, pairs, updates)
    n_b = sum(p.b is not None for p in pairs)
    if n_b and len(zero_b) == n_b:
        fails.append(
            f"all {n_b} LoRA B factors are exactly zero: "
            "PEFT initialises B to zero, so the adapter never moved"
        )
    elif zero_b:
        labels = ", ".join(p.label for p in zero_b[:_NAMES_SHOWN])
        more = f" and {len(zero_b) - _NAMES_SHOWN} more" if len(zero_b) > _NAMES_SHOWN else ""
        warns.append(f"{len(zero_b)} of {n_b} LoRA B factors are exactly zero ({labels}{more})")
    if malformed:
        warns.append(f"{len(malformed)} LoRA module(s) could not be measured ({malformed[0]['reason']})")

    tested = _mark_outliers(updates, spec)
    odd = [u for u in updates if u.flagged]
    if odd:
        odd.sort(key=lambda u: -abs(math.log(u.ratio or 1.0)))
        shown = ", ".join(f"{u.pair.label} ({u.ratio:.3g}x)" for u in odd[:_NAMES_SHOWN])
        more = f" and {len(odd) - _NAMES_SHOWN} more" if len(odd) > _NAMES_SHOWN else ""
        warns.append(f"odd layer update size vs the median of the same module type: {shown}{more}")

    layers = sorted({u.pair.layer for u in updates if u.pair.layer is not None})
    evidence["lora"] = {
        "applied": True,
        "modules": len(pairs),
        "factors": sum((p.a is not None) + (p.b is not None) for p in pairs),
        "measured": len(updates),
        "layers": len(layers),
        "scale": scaling.note,
        "outlier_test": tested,
        "zero_B": [p.label for p in zero_b[:20]],
        "zero_B_count": len(zero_b),
        "malformed": malformed[:20],
    }
    evidence["per_layer"] = _per_layer(updates, layers)
    evidence["outliers"] = [_row(u) for u in odd[:20]]
    evidence["modules"], evidence["modules_total"] = _table(updates, spec.max_table_rows), len(updates)
    ratios = [u.ratio for u in updates if u.ratio is not None]
    evidence["ratio_to_median_range"] = [_num(min(ratios)), _num(max(ratios))] if ratios else None

    if fails:
        return _finding(Verdict.FAIL, "; ".join(fails), 0.0, evidence)
    if warns:
        return _finding(Verdict.WARN, "; ".join(warns), 0.5, evidence)
    if not updates:
        return _finding(Verdict.SKIP, "no LoRA module could be measured", None, evidence)
    factors = evidence["lora"]["factors"]
    where = f"{factors} LoRA factors in {len(layers)} layers" if layers else f"{factors} LoRA factors"
    spread = f"update norms {min(ratios):.2g}-{max(ratios):.2g}x the median" if ratios else "updates measured"
    odd_note = "no odd layer" if any(tested.values()) else "too few layers for the odd-layer test"
    scale_note = " (scale 1: no usable adapter_config.json)" if scaling.config is None else ""
    return _finding(Verdict.PASS, f"{where}: all finite, {spread}, {odd_note}{scale_note}", 1.0, evidence)


def _finding(verdict: Verdict, message: str, score: float | None, evidence: dict[str, Any]) -> Finding:
    return Finding(KIND, KIND, verdict, message, score=score, evidence=evidence)


def _base(adapter: AdapterWeights) -> dict[str, Any]:
    return {"file": str(adapter.source), "config": adapter.config is not None}


def _full_model_verdict(
    adapter: AdapterWeights, fails: list[str], checked: int, skipped: list[dict[str, str]], ev: dict[str, Any]
) -> Finding:
    note = "no LoRA factors, so the LoRA checks did not apply"
    if fails:
        return _finding(Verdict.FAIL, f"{fails[0]} ({note})", 0.0, ev)
    if checked == 0:
        why = f"all {len(skipped)} tensors are in formats not decoded here" if skipped else "nothing to check"
        return _finding(Verdict.SKIP, f"no tensor could be checked for finiteness: {why}", None, ev)
    extra = f", {len(skipped)} skipped (undecoded dtypes)" if skipped else ""
    return _finding(Verdict.PASS, f"{checked} tensors all finite{extra}; {note}", 1.0, ev)


def _scan_finite(adapter: AdapterWeights) -> tuple[dict[str, int], int, list[dict[str, str]]]:
    """Non-finite element count per tensor (only those with any), tensors checked, tensors skipped."""
    bad: dict[str, int] = {}
    skipped: list[dict[str, str]] = []
    checked = 0
    for name, info in adapter.header.items():
        if info.dtype in RAW_DTYPES:
            skipped.append({"name": name, "dtype": info.dtype, "reason": "8-bit float not decoded here"})
            continue
        checked += 1
        if info.dtype in FLOAT_DTYPES:
            count = _count_nonfinite(adapter, name)
            if count:
                bad[name] = count
    return bad, checked, skipped


def _count_nonfinite(adapter: AdapterWeights, name: str) -> int:
    arrays = adapter.arrays
    bf16_bits = isinstance(arrays, LazyTensors) and adapter.header[name].dtype == "BF16"
    if isinstance(arrays, LazyTensors) and bf16_bits:
        flat = arrays.raw(name).reshape(-1)
    else:
        flat = arrays[name].reshape(-1)
    count = 0
    for lo in range(0, flat.shape[0], _CHUNK):
        chunk = flat[lo : lo + _CHUNK]
        if bf16_bits:  # exponent all ones: inf or nan; no float32 copy needed
            count += int(np.count_nonzero((chunk & 0x7F80) == 0x7F80))
        else:
            count += int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
    return count


def _zero_b(adapter: AdapterWeights, pairs: list[LoraPair], updates: list[_Update]) -> list[LoraPair]:
    """Modules whose B factor is exactly zero (measured ones are known; the others are looked at)."""
    known = {u.pair.b: u.zero_b for u in updates}

    def is_zero(name: str) -> bool:
        if name in known:
            return known[name]
        info = adapter.header[name]
        if info.dtype in RAW_DTYPES or 0 in info.shape:
            return False
        return not np.any(adapter.arrays[name])

    return [p for p in pairs if p.b is not None and is_zero(p.b)]


def _lora_updates(
    adapter: AdapterWeights, pairs: list[LoraPair], nonfinite: set[str]
) -> tuple[list[_Update], list[dict[str, str]], LoraScaling]:
    """Singular values of every measurable pair, batched by factor shape; and what could not be."""
    scaling = lora_scaling(adapter.config)
    malformed: list[dict[str, str]] = []
    groups: dict[tuple[int, int, int], list[tuple[LoraPair, np.ndarray, np.ndarray]]] = defaultdict(list)
    for pair in pairs:
        reason, b, a = _factors(adapter, pair, nonfinite)
        if reason or a is None or b is None:
            malformed.append({"module": short_name(pair.module), "reason": reason or "unreadable"})
            continue
        groups[(b.shape[0], b.shape[1], a.shape[1])].append((pair, b, a))
    updates: list[_Update] = []
    for (out, r, inp), group in groups.items():
        per_batch = max(1, _CHUNK // ((out + inp) * r))  # bounds the float64 copies on big models
        for lo in range(0, len(group), per_batch):
            updates.extend(_measure(group[lo : lo + per_batch], scaling))
    updates.sort(key=lambda u: (u.pair.layer is None, u.pair.layer or 0, u.pair.kind))
    return updates, malformed, scaling


def _measure(members: list[tuple[LoraPair, np.ndarray, np.ndarray]], scaling: LoraScaling) -> list[_Update]:
    """Spectra of same-shaped pairs in one batched QR + SVD."""
    b_stack = np.stack([m[1] for m in members]).astype(np.float64)
    a_stack = np.stack([m[2] for m in members]).astype(np.float64)
    scales = np.array([scaling.scale(m[0].module) for m in members])
    spectra = lowrank_singular_values(b_stack, a_stack, scales)
    norms = np.sqrt(np.sum(spectra**2, axis=1))
    ranks = effective_rank(spectra)
    return [
        _Update(pair, float(scales[i]), spectra[i], float(norms[i]), float(ranks[i]), not b.any())
        for i, (pair, b, _) in enumerate(members)
    ]


def _factors(
    adapter: AdapterWeights, pair: LoraPair, nonfinite: set[str]
) -> tuple[str | None, np.ndarray | None, np.ndarray | None]:
    """(why not measurable, B as out x r, A as r x in)."""
    if pair.a is None or pair.b is None:
        return f"{'lora_A' if pair.a is None else 'lora_B'} missing", None, None
    for name in (pair.a, pair.b):
        info = adapter.header[name]
        if info.dtype not in FLOAT_DTYPES:
            return f"{short_name(name)} has dtype {info.dtype}, not a decoded float", None, None
        if name in nonfinite:
            return f"{short_name(name)} is not finite", None, None
        if len(info.shape) < 2 or 0 in info.shape:
            return f"{short_name(name)} has shape {list(info.shape)}, not a non-empty matrix", None, None
    a = np.asarray(adapter.arrays[pair.a])
    b = np.asarray(adapter.arrays[pair.b])
    a = a.reshape(a.shape[0], -1)  # conv LoRA: A is (r, in, kh, kw), B is (out, r, 1, 1)
    b = b.reshape(b.shape[0], -1)
    if b.shape[1] != a.shape[0]:
        return f"B is {b.shape[0]}x{b.shape[1]} but A is {a.shape[0]}x{a.shape[1]}", None, None
    return None, b, a


def _mark_outliers(updates: list[_Update], spec: AdapterWeightsSpec) -> dict[str, bool]:
    """Flag, per module type, layers whose update norm stands out; say which types were tested."""
    by_kind: dict[str, list[_Update]] = defaultdict(list)
    for u in updates:
        if u.pair.layer is not None and u.norm > 0:
            by_kind[u.pair.kind].append(u)
    tested: dict[str, bool] = {}
    for kind, members in by_kind.items():
        norms = np.array([u.norm for u in members])
        out = log_outliers(norms, z_threshold=spec.outlier_z, min_ratio=spec.outlier_min_ratio)
        tested[kind] = len(members) >= spec.min_layers
        for u, ratio, z, flag in zip(members, out.ratio, out.z, out.flagged, strict=True):
            u.ratio, u.z = float(ratio), float(z)
            u.flagged = bool(flag) and tested[kind]
    return tested


def _per_layer(updates: list[_Update], layers: list[int]) -> dict[str, Any]:
    sq: dict[int, float] = defaultdict(float)
    flagged: set[int] = set()
    for u in updates:
        if u.pair.layer is not None:
            sq[u.pair.layer] += u.norm**2
            if u.flagged:
                flagged.add(u.pair.layer)
    return {
        "metric": PER_LAYER_METRIC,
        "layers": layers,
        "values": [_num(math.sqrt(sq[layer])) for layer in layers],
        "flagged": sorted(flagged),
    }


def _row(u: _Update) -> dict[str, Any]:
    s = u.s
    return {
        "module": short_name(u.pair.module) + (f"[{u.pair.adapter}]" if u.pair.adapter else ""),
        "layer": u.pair.layer,
        "type": u.pair.kind,
        "scale": _num(u.scale),
        "frobenius": _num(u.norm),
        "top_singular_value": _num(s[0]) if s.size else 0.0,
        "effective_rank": _num(u.eff_rank),
        "singular_values": [_num(x) for x in s[:16]],
        "ratio_to_median": _num(u.ratio),
        "z": _num(u.z),
        "zero_B": u.zero_b,
        "flagged": u.flagged,
    }


def _table(updates: list[_Update], cap: int) -> list[dict[str, Any]]:
    ordered = sorted(updates, key=lambda u: not (u.flagged or u.zero_b))  # stable: odd ones first
    return [_row(u) for u in ordered[:cap]]


def _num(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return float(f"{x:.7g}") if math.isfinite(x) else None
