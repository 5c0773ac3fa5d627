"""gradient_ghost: what the optimizer's second moments say about how training ended.

Adam's `exp_avg_sq` is a running mean of squared gradients. After enough steps it should be
finite and non-zero everywhere (zero means no gradient ever reached the parameter), and each
transformer layer's level should follow the model's depth profile: gradient scale legitimately
drifts with depth, so a layer is flagged only when it stands out from the trend through its
neighbours, never for its depth alone. Nothing here passes on the strength of a check that
could not be made: without names there is no per-layer view, and the verdict says so.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from trainmedic.findings import Finding, Verdict, finite_or_none
from trainmedic.probes.base import ProbeSpec, register
from trainmedic.record.param_map import layer_index, map_param_names
from trainmedic.run import OptimizerState, ParamMoments, Run

KIND = "gradient_ghost"
METRIC = "mean exp_avg_sq (Adam second moment)"
_SHOWN = 3


class GradientGhostSpec(ProbeSpec):
    min_steps_threshold: int = Field(
        50,
        ge=0,
        description="fewer optimizer steps than this is severely undertrained: Adam's moments still "
        "reflect the first few batches, not the data",
    )
    undertrained_layer_ratio: float = Field(
        2.0,
        gt=1,
        description="a layer whose mean exp_avg_sq exceeds this multiple of the depth trend through its "
        "neighbours is still high-variance (its gradients have not settled like the rest)",
    )
    layer_failure_frac: float = Field(
        0.3,
        ge=0,
        le=1,
        description="more than this fraction of layers still high-variance is a FAIL, not a WARN: the "
        "adapter as a whole has not settled",
    )
    neighbours: int = Field(
        2,
        ge=1,
        description="layers on each side that a layer is compared with (one odd neighbour is outvoted)",
    )
    min_layers: int = Field(
        3,
        ge=3,
        description="fewest judged layers for the per-layer comparison; with fewer, an odd layer can't be "
        "told from a depth trend",
    )
    judge_edge_layers: bool = Field(
        False,
        description="judge the first and last layer too; off because the first writes onto the raw "
        "embeddings, whose small norm amplifies its gradients through every later norm (10-100x the "
        "other layers in healthy runs), and the last feeds the head directly",
    )
    nonfinite_param_frac: float = Field(
        0.5,
        gt=0,
        le=1,
        description="fraction of parameters with NaN/Inf in exp_avg_sq at which the state counts as mostly "
        "non-finite (FAIL); fewer is a WARN: those parameters' updates are already NaN",
    )


@dataclass
class _Stat:
    param: ParamMoments
    mean: float  # float64 mean of exp_avg_sq (NaN/Inf when any entry is)
    nonfinite: int  # non-finite entries
    zero: bool  # every entry exactly zero


@register(
    KIND,
    GradientGhostSpec,
    needs=("optimizer",),
    summary="optimizer second moments: finite, non-zero, and no layer standing out from the depth trend",
)
def gradient_ghost(run: Run, spec: GradientGhostSpec) -> Finding:
    opt = run.optimizer
    if opt is None:
        return _finding(
            Verdict.SKIP, "no optimizer state (training_state.pt / optimizer.pt) found: nothing to judge"
        )
    ev: dict[str, Any] = {
        "global_step": opt.global_step,
        "epoch": finite_or_none(opt.epoch),
        "best_val_loss": finite_or_none(opt.best_val_loss),
        "use_qlora": opt.use_qlora,
        "n_params": len(opt.params),
        "n_layers": None,
        "worst_layers": [],
        "thresholds": spec.model_dump(exclude={"enabled"}),
    }
    step, step_source = _global_step(opt)
    ev["global_step"], ev["global_step_source"] = step, step_source
    at_step = f" at step {step}" if step is not None else ""
    if step is not None and step < spec.min_steps_threshold:
        return _finding(
            Verdict.FAIL,
            f"severely undertrained: {step} optimizer steps ({step_source}) < {spec.min_steps_threshold}",
            0.0,
            ev,
        )
    if not opt.params:
        return _finding(Verdict.SKIP, "the optimizer state lists no parameters: nothing to judge", None, ev)
    stateful = [p for p in opt.params if p.state_keys]
    if not stateful:
        return _finding(
            Verdict.FAIL,
            f"none of {len(opt.params)} parameters has optimizer state: no gradient ever reached the adapter",
            0.0,
            ev,
        )
    readable = [p for p in stateful if p.exp_avg_sq is not None and p.exp_avg_sq.dtype.kind == "f"]
    ev["second_moment_source"] = _source(readable)
    if not readable:
        return _finding(Verdict.SKIP, _no_second_moment(stateful), None, ev)

    stats = [_stat(p) for p in readable]
    bad = [s for s in stats if not math.isfinite(s.mean)]
    ev["n_params_with_second_moment"] = len(stats)
    ev["nonfinite_entries"] = sum(s.nonfinite for s in stats)
    ev["nonfinite_params"] = len(bad)
    if len(bad) == len(stats):
        return _finding(
            Verdict.FAIL,
            f"every parameter's exp_avg_sq holds NaN/Inf ({len(bad)} of {len(stats)}): training diverged",
            0.0,
            ev,
        )
    if len(bad) >= spec.nonfinite_param_frac * len(stats):
        return _finding(
            Verdict.FAIL,
            f"mostly non-finite: {len(bad)} of {len(stats)} parameters' exp_avg_sq hold NaN/Inf "
            f"({ev['nonfinite_entries']} entries)",
            0.0,
            ev,
        )
    good = [s for s in stats if math.isfinite(s.mean)]
    zero = [s for s in good if s.zero]
    ev["zero_params"] = len(zero)
    ev["zero_param_names"] = [_label(s.param) for s in zero[:_SHOWN]]
    if len(zero) == len(good):
        return _finding(
            Verdict.FAIL,
            f"every exp_avg_sq entry of {len(good)} parameters is exactly zero{at_step}: "
            "no gradient ever reached the adapter",
            0.0,
            ev,
        )

    concerns: list[str] = []
    unchecked: list[str] = []
    if bad:
        concerns.append(
            f"{len(bad)} of {len(stats)} parameters' exp_avg_sq hold NaN/Inf (their updates are NaN)"
        )
    if zero:
        concerns.append(f"{len(zero)} parameters never got a gradient (exp_avg_sq all zero)")
    if len(readable) < len(stateful):
        concerns.append(f"{len(stateful) - len(readable)} parameters keep no readable second moment")
    if step is None:
        unchecked.append("step count (no global_step and no Adam step counter)")
    verdict, score, layer_msg = _layers(run, opt, good, stats, spec, ev, concerns, unchecked)
    if verdict is Verdict.PASS and (concerns or unchecked):
        verdict, score = Verdict.WARN, (0.7 if concerns else 0.5)
    ev["checked"] = f"{len(good)} parameters' exp_avg_sq finite and non-zero{at_step}"
    ev["not_checked"] = unchecked
    parts = [layer_msg] if layer_msg else [f"checked {ev['checked']}"]
    parts += concerns
    if unchecked:
        parts.append("not checked: " + "; ".join(unchecked))
    return _finding(verdict, "; ".join(parts), score, ev)


def _layers(
    run: Run,
    opt: OptimizerState,
    good: list[_Stat],
    stats: list[_Stat],
    spec: GradientGhostSpec,
    ev: dict[str, Any],
    concerns: list[str],
    unchecked: list[str],
) -> tuple[Verdict, float, str]:
    """The per-layer view; an empty message (and PASS) when it could not be made."""
    names = _names(run, opt, ev)
    if names is None:
        unchecked.append(f"per-layer comparison ({ev['mapping_note']})")
        return Verdict.PASS, 0.9, ""
    layer_of = {p.id: layer_index(n) for p, n in ((s.param, names.get(s.param.id, "")) for s in stats)}
    counts = Counter(layer for layer in layer_of.values() if layer is not None)
    ev["n_params_outside_layers"] = sum(1 for layer in layer_of.values() if layer is None)
    ev["n_layers"] = len(counts)
    if not counts:
        unchecked.append("per-layer comparison (no parameter name has a `.layers.N.` index)")
        return Verdict.PASS, 0.9, ""
    if len(set(counts.values())) > 1:
        (lo, nlo), (hi, nhi) = (
            min(counts.items(), key=lambda kv: kv[1]),
            max(counts.items(), key=lambda kv: kv[1]),
        )
        unchecked.append(
            f"per-layer comparison (non-uniform parameters per layer: layer {hi} has {nhi}, layer {lo} has "
            f"{nlo}; no grouping)"
        )
        return Verdict.PASS, 0.9, ""
    sums: dict[int, list[float]] = defaultdict(list)
    for s in good:
        layer = layer_of[s.param.id]
        if layer is not None:
            sums[layer].append(s.mean)
    layers = sorted(counts)
    values = [float(np.mean(sums[layer])) if sums[layer] else math.nan for layer in layers]
    dead = [layer for layer, v in zip(layers, values, strict=True) if v == 0.0]
    edges = [] if spec.judge_edge_layers or len(layers) < 3 else [layers[0], layers[-1]]
    judged = [
        (layer, v)
        for layer, v in zip(layers, values, strict=True)
        if math.isfinite(v) and v > 0 and layer not in edges
    ]
    ev["edge_layers_not_judged"] = edges
    scope = f"{len(judged)} interior layers" if edges else f"{len(judged)} layers"
    if dead:
        concerns.append(f"layer(s) {_list(dead)} got no gradient at all (mean exp_avg_sq 0)")
    ev["comparison"] = (
        f"each layer's {METRIC} vs the depth trend through its {spec.neighbours} neighbours on each side "
        "(robust log-linear fit over depth, then the median of the neighbours' residuals)"
    )
    pl = {
        "metric": METRIC,
        "layers": layers,
        "values": [finite_or_none(v) for v in values],
        "flagged": sorted(dead),
    }
    ev["per_layer"] = pl
    if len(judged) < spec.min_layers:
        unchecked.append(f"per-layer comparison ({scope} with a usable mean < {spec.min_layers})")
        return Verdict.PASS, 0.9, ""
    x = np.array([layer for layer, _ in judged], dtype=np.float64)
    ratio, trend = trend_ratios(x, np.log([v for _, v in judged]), spec.neighbours)
    ev["depth_trend_ratio"] = finite_or_none(trend)
    order = np.argsort(-ratio)
    ev["worst_layers"] = [
        {
            "layer": int(x[i]),
            "ratio": finite_or_none(ratio[i]),
            "mean_exp_avg_sq": finite_or_none(judged[i][1]),
        }
        for i in order[:_SHOWN]
    ]
    high = [int(x[i]) for i in order if ratio[i] > spec.undertrained_layer_ratio]
    pl["flagged"] = sorted(set(high) | set(dead))
    ev["flagged_layers"] = sorted(high)
    if not high:
        limit = spec.undertrained_layer_ratio
        what = f"no layer's {METRIC} above {limit:g}x the depth trend through its neighbours"
        return (
            Verdict.PASS,
            0.9,
            f"{what} ({scope} judged, {len(good)} parameters"
            + (f", step {ev['global_step']})" if ev["global_step"] is not None else ")"),
        )
    frac = len(high) / len(judged)
    shown = ", ".join(f"layer {layer} at {_ratio(ratio, x, layer):.1f}x" for layer in high[:_SHOWN])
    msg = (
        f"{len(high)} of {scope} still high-variance ({METRIC}): {shown} the depth trend "
        f"through their neighbours (limit {spec.undertrained_layer_ratio:g}x)"
    )
    if frac > spec.layer_failure_frac:
        return Verdict.FAIL, 0.3, f"{msg}; {frac:.0%} > {spec.layer_failure_frac:.0%} of layers"
    return Verdict.WARN, 0.7, msg


def trend_ratios(x: np.ndarray, y: np.ndarray, neighbours: int) -> tuple[np.ndarray, float]:
    """Each point's ratio to the depth trend through its neighbours, and the trend's end-to-end ratio.

    `y` is log level over depth `x`. A repeated-median line (robust to almost half the points
    being odd) removes the overall depth trend; each point's residual is then compared with the
    median residual of up to `neighbours` points on each side, which absorbs smooth curvature.
    """
    n = len(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        slopes = (y[None, :] - y[:, None]) / (x[None, :] - x[:, None])
    np.fill_diagonal(slopes, np.nan)
    slope = float(np.median(np.nanmedian(slopes, axis=1)))
    resid = y - slope * x
    resid = resid - np.median(resid)
    excess = np.empty(n)
    for i in range(n):
        near = np.r_[resid[max(0, i - neighbours) : i], resid[i + 1 : i + 1 + neighbours]]
        excess[i] = resid[i] - np.median(near)
    return np.exp(excess), math.exp(slope * (x[-1] - x[0]))


def _stat(p: ParamMoments) -> _Stat:
    arr = p.exp_avg_sq
    assert arr is not None
    if arr.size == 0:
        return _Stat(p, math.nan, 0, False)
    mean = float(arr.mean(dtype=np.float64))
    # float64 sums of float32 values cannot overflow, so a finite mean means every entry is finite
    nonfinite = 0 if math.isfinite(mean) else int(np.count_nonzero(~np.isfinite(arr)))
    return _Stat(p, mean, nonfinite, mean == 0.0 and not np.any(arr))


def _names(run: Run, opt: OptimizerState, ev: dict[str, Any]) -> dict[int, str] | None:
    """Verified id -> name, from the optimizer state or else mapped against `run.adapter`."""
    ev["mapping_verified"], ev["mapping_note"] = opt.mapping_verified, opt.mapping_note
    if opt.mapping_verified and all(p.name for p in opt.params):
        return {p.id: p.name for p in opt.params if p.name}
    if run.adapter is None:
        return None
    mapping = map_param_names(opt.params, {k: v.shape for k, v in run.adapter.header.items()})
    ev["mapping_verified"], ev["mapping_note"] = mapping.verified, mapping.note
    return mapping.names if mapping.verified else None


def _global_step(opt: OptimizerState) -> tuple[int | None, str]:
    if opt.global_step is not None:
        return opt.global_step, "global_step"
    steps = [p.step for p in opt.params if p.step is not None and math.isfinite(p.step)]
    if steps:
        return int(max(steps)), "Adam step counter"
    return None, "unknown"


def _source(readable: list[ParamMoments]) -> str:
    decoded = sum(1 for p in readable if "exp_avg_sq" not in p.state_keys)
    if not decoded:
        return "exp_avg_sq"
    return f"exp_avg_sq ({decoded} decoded from bitsandbytes state2, block scales verified)"


def _no_second_moment(stateful: list[ParamMoments]) -> str:
    keys = sorted({k for p in stateful for k in p.state_keys} - {"step"})
    shown = ", ".join(keys[:6]) or "nothing but a step counter"
    if "state2" in keys:
        return (
            f"bitsandbytes 8-bit optimizer state ({shown}) whose decoding could not be verified (block "
            "maxima do not match the quantisation map's top code): second moments unknown, nothing judged"
        )
    if "exp_avg_sq_row" in keys:
        return f"factored second moment (Adafactor: {shown}) is not judged: no per-entry exp_avg_sq"
    odd = [p for p in stateful if p.exp_avg_sq is not None]
    if odd:
        dtype = odd[0].exp_avg_sq.dtype if odd[0].exp_avg_sq is not None else "?"
        return f"exp_avg_sq is stored as {dtype}, not a float type this probe can read: nothing judged"
    return (
        f"the optimizer keeps no second moment (state holds {shown}; SGD/Lion-style): gradient variance "
        "per layer can't be judged"
    )


def _ratio(ratio: np.ndarray, x: np.ndarray, layer: int) -> float:
    return float(ratio[int(np.flatnonzero(x == layer)[0])])


def _label(p: ParamMoments) -> str:
    return p.name or f"id {p.id}"


def _list(items: list[int]) -> str:
    return ", ".join(str(i) for i in items[:8]) + (f", ... ({len(items)})" if len(items) > 8 else "")


def _finding(
    verdict: Verdict, message: str, score: float | None = None, ev: dict[str, Any] | None = None
) -> Finding:
    return Finding(KIND, KIND, verdict, message, score, ev or {})
