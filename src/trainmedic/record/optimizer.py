"""Optimizer state from a dlm `training_state.pt` or an HF `optimizer.pt`, loaded without torch.

Both hold a PyTorch optimizer `state_dict()`: `state` (int id -> per-parameter tensors) and
`param_groups` (hyper-parameters and the ids of each group). dlm wraps it with its own counters
(`global_step`, `epoch`, `best_val_loss`, `use_qlora`); for HF those live in `trainer_state.json`
beside the file. Tensors arrive as numpy arrays. Optimizers differ in what they keep (Adam:
`exp_avg`/`exp_avg_sq`; SGD: `momentum_buffer`; Lion: `exp_avg` only; bitsandbytes: `state1`/
`state2` with quantisation maps), so a missing second moment stays `None` rather than guessed.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from trainmedic.record.errors import ReadError
from trainmedic.record.param_map import apply_param_names
from trainmedic.run import AdapterWeights, OptimizerState, ParamMoments

# Keys whose value must be a tensor when present (None is tolerated: SGD keeps
# `momentum_buffer: None` when momentum is 0).
ARRAY_KEYS = frozenset(
    {
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "momentum_buffer",
        "exp_avg_sq_row",
        "exp_avg_sq_col",
        "state1",
        "state2",
        "qmap1",
        "qmap2",
        "absmax1",
        "absmax2",
        "max1",
        "max2",
        "new_max1",
        "new_max2",
    }
)
# Where a parameter's shape can be read, most reliable first (bitsandbytes AdEMAMix stacks two
# first moments in `state1`, so `state2` comes before it).
_SHAPE_KEYS = ("exp_avg_sq", "exp_avg", "momentum_buffer", "state2", "state1")
_STATE_JSON_CAP = 512 * 1024 * 1024


def optimizer_state_from(obj: Any, source: Path, *, adapter: AdapterWeights | None) -> OptimizerState:
    """Build an `OptimizerState` from a loaded dlm training state or HF optimizer state dict.

    Structural problems raise `ReadError` naming the field; ids are mapped to names (and the
    mapping verified) when `adapter` is given.
    """
    source = Path(source)
    if not isinstance(obj, dict):
        raise ReadError(source, f"expected a dict at the top level, got {_type(obj)}")
    if "optimizer_state_dict" in obj:
        sd, prefix = obj["optimizer_state_dict"], "optimizer_state_dict"
        if not isinstance(sd, dict):
            raise ReadError(source, f"optimizer_state_dict: expected a dict, got {_type(sd)}")
        counters = obj
    elif "state" in obj:
        sd, prefix = obj, ""
        counters = _trainer_state_beside(source)
    else:
        keys = ", ".join(sorted(str(k) for k in obj)[:12]) or "none"
        raise ReadError(source, f"no 'state' or 'optimizer_state_dict' entry (keys: {keys})")

    groups, group_of = _param_groups(sd, source, _field(prefix, "param_groups"))
    state = sd.get("state")
    spath = _field(prefix, "state")
    if not isinstance(state, dict):
        raise ReadError(source, f"{spath}: expected a dict of per-parameter state, got {_type(state)}")
    params: dict[int, ParamMoments] = {}
    for key, entry in state.items():
        if isinstance(key, bool) or not isinstance(key, int):
            raise ReadError(source, f"{spath}: parameter ids must be ints, found {key!r:.40}")
        if group_of and key not in group_of:
            raise ReadError(source, f"{spath}[{key}]: id {key} is not listed in any param_groups[*].params")
        params[key] = _moments(entry, key, group_of.get(key, 0), source, f"{spath}[{key}]")
    for pid, g in group_of.items():
        if pid not in params:  # PyTorch keeps no state for a parameter that never got a gradient
            params[pid] = ParamMoments(id=pid, group=g, shape=())

    out = OptimizerState(
        source=source,
        params=[params[i] for i in sorted(params)],
        param_groups=groups,
        global_step=_int(counters.get("global_step")),
        epoch=_float(counters.get("epoch")),
        best_val_loss=_float(counters.get("best_val_loss")),
        use_qlora=counters.get("use_qlora") if isinstance(counters.get("use_qlora"), bool) else None,
    )
    apply_param_names(out, adapter)
    return out


def _param_groups(sd: dict[Any, Any], source: Path, path: str) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """JSON-safe hyper-parameters per group, and id -> group index."""
    raw = sd.get("param_groups")
    if raw is None:
        return [], {}
    if not isinstance(raw, list | tuple):
        raise ReadError(source, f"{path}: expected a list, got {_type(raw)}")
    groups: list[dict[str, Any]] = []
    group_of: dict[int, int] = {}
    for g, group in enumerate(raw):
        if not isinstance(group, dict):
            raise ReadError(source, f"{path}[{g}]: expected a dict, got {_type(group)}")
        ids = group.get("params")
        if not isinstance(ids, list | tuple):
            raise ReadError(source, f"{path}[{g}].params: expected a list of ids, got {_type(ids)}")
        for pid in ids:
            if isinstance(pid, bool) or not isinstance(pid, int):
                raise ReadError(source, f"{path}[{g}].params: ids must be ints, found {pid!r:.40}")
            if pid in group_of:
                raise ReadError(source, f"{path}[{g}].params: id {pid} is also in group {group_of[pid]}")
            group_of[pid] = g
        summary: dict[str, Any] = {"n_params": len(ids)}
        for key in ("lr", "initial_lr", "weight_decay", "eps", "momentum"):
            if key in group:
                summary[key] = _float(group[key])
        betas = group.get("betas")
        if isinstance(betas, list | tuple):
            summary["betas"] = [_float(b) for b in betas]
        groups.append(summary)
    return groups, group_of


def _moments(entry: Any, pid: int, group: int, source: Path, path: str) -> ParamMoments:
    if not isinstance(entry, dict):
        raise ReadError(source, f"{path}: expected a dict of state tensors, got {_type(entry)}")
    arrays: dict[str, np.ndarray] = {}
    for key, value in entry.items():
        if isinstance(value, np.ndarray):
            arrays[str(key)] = value
        elif key in ARRAY_KEYS and value is not None:
            raise ReadError(source, f"{path}.{key}: expected an array, got {_type(value)}")
    step = entry.get("step")
    if step is not None and not isinstance(step, int | float | np.ndarray | np.generic):
        raise ReadError(source, f"{path}.step: expected a number, got {_type(step)}")
    exp_avg_sq = arrays.get("exp_avg_sq")
    if exp_avg_sq is None and "state2" in arrays:
        exp_avg_sq = bnb_second_moment(arrays)
    return ParamMoments(
        id=pid,
        group=group,
        shape=_shape(arrays),
        exp_avg_sq=exp_avg_sq,
        exp_avg=arrays.get("exp_avg"),
        step=_float(step),
        state_keys=tuple(str(k) for k in entry),
    )


def _shape(arrays: dict[str, np.ndarray]) -> tuple[int, ...]:
    for key in _SHAPE_KEYS:
        if key in arrays:
            return tuple(int(d) for d in arrays[key].shape)
    row, col = arrays.get("exp_avg_sq_row"), arrays.get("exp_avg_sq_col")
    if row is not None and col is not None and col.ndim >= 1:  # Adafactor's factored moment
        return (*(int(d) for d in row.shape), int(col.shape[-1]))
    return ()


def bnb_second_moment(arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """bitsandbytes' second moment (`state2`) as float, or None when it can't be checked.

    32-bit states are plain floats. 8-bit states store codes into `qmap2` scaled by a per-block
    (`absmax2`) or per-tensor (`max2`) maximum: each value was divided by its block's absolute
    maximum before quantising, so the largest code of every non-empty block must be the map's
    code nearest 1.0. Decoding is returned only when that holds for every block.
    """
    s2 = arrays["state2"]
    if s2.dtype.kind == "f":
        finite = s2[np.isfinite(s2)]
        return s2 if finite.size == 0 or float(finite.min()) >= 0.0 else None
    qmap = arrays.get("qmap2")
    if s2.dtype != np.uint8 or qmap is None or qmap.dtype.kind != "f" or qmap.size != 256 or s2.size == 0:
        return None
    qmap = np.asarray(qmap, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(qmap)) or float(qmap.min()) < 0 or np.any(np.diff(qmap) < 0):
        return None
    top_code = int(np.argmin(np.abs(qmap - 1.0)))
    flat = np.asarray(s2).reshape(-1)
    if "absmax2" in arrays:
        scale = np.asarray(arrays["absmax2"], dtype=np.float32).reshape(-1)
        # blocks of a power-of-two size (256 today, 2048 in older releases); one block: its size
        blocks = [b for b in (2**k for k in range(6, 15)) if -(-flat.size // b) == scale.size]
        if scale.size == 1:
            block = flat.size
        elif len(blocks) == 1:
            block = blocks[0]
        else:
            return None
    elif "max2" in arrays and arrays["max2"].size >= 1:
        scale = np.asarray(arrays["max2"], dtype=np.float32).reshape(-1)[:1]
        block = flat.size
    else:
        return None
    if not np.all(np.isfinite(scale)) or float(scale.min()) < 0:
        return None
    padded = np.zeros(scale.size * block, dtype=np.uint8)
    padded[: flat.size] = flat
    codes = padded.reshape(scale.size, block)
    # codes are indices into an ascending map, so the largest code is the largest value
    busy = scale > 0
    if np.any(codes.max(axis=1)[busy] != top_code):
        return None
    decoded = qmap[codes] * (scale / qmap[top_code])[:, None]
    return decoded.reshape(-1)[: flat.size].reshape(s2.shape)


def _trainer_state_beside(source: Path) -> dict[str, Any]:
    """`global_step`/`epoch` from the trainer_state.json next to an HF optimizer.pt, if readable."""
    path = source.parent / "trainer_state.json"
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _STATE_JSON_CAP:
            return {}
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: data[k] for k in ("global_step", "epoch") if k in data}


def _field(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _float(value: Any) -> float | None:
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "fiu":
        value = value.reshape(-1)[0].item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    f = _float(value)
    return int(f) if f is not None and f.is_integer() else None
