"""Probes: one module per question, each registering itself by kind (see `base`)."""

from __future__ import annotations

import importlib

from trainmedic.probes.base import REGISTRY, Probe, ProbeSpec

# Report order: what a reader wants first (can the run be trusted at all) down to details.
PROBE_MODULES = (
    "nonfinite",
    "training_drift",
    "not_learning",
    "overfit",
    "memorization",
    "gradient_ghost",
    "adapter_weights",
    "live_events",
)


def all_probes() -> dict[str, Probe[ProbeSpec]]:
    """Import every probe module once and return the registry in report order."""
    for name in PROBE_MODULES:
        importlib.import_module(f"trainmedic.probes.{name}")
    return {kind: REGISTRY[kind] for kind in PROBE_MODULES if kind in REGISTRY} | {
        k: v for k, v in REGISTRY.items() if k not in PROBE_MODULES
    }
