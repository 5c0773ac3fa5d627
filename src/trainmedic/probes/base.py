"""Probe contract and registry.

A probe is a pure function `(Run, Spec) -> Finding` registered under its `kind`. Its spec is a
pydantic model whose fields are the thresholds, each with a default and a one-line reason, so a
YAML spec file can override any of them and a typo in a field name is an error, not a silent
default.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from trainmedic.findings import Finding, Verdict
from trainmedic.run import Run


class ProbeSpec(BaseModel):
    """Base for probe specs: unknown fields are rejected so typos surface."""

    # Schemas are built on first validation (a YAML override), not at import: keeps `check` fast.
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    enabled: bool = True


SpecT = TypeVar("SpecT", bound=ProbeSpec)


@dataclass(frozen=True)
class Probe(Generic[SpecT]):
    kind: str
    spec_cls: type[SpecT]
    fn: Callable[[Run, SpecT], Finding]
    needs: tuple[str, ...]  # artifacts read: "log", "optimizer", "adapter"
    summary: str


REGISTRY: dict[str, Probe[ProbeSpec]] = {}


def register(
    kind: str, spec_cls: type[SpecT], *, needs: tuple[str, ...], summary: str
) -> Callable[[Callable[[Run, SpecT], Finding]], Callable[[Run, SpecT], Finding]]:
    """Decorator: register `fn` as the probe of `kind`."""

    def deco(fn: Callable[[Run, SpecT], Finding]) -> Callable[[Run, SpecT], Finding]:
        if kind in REGISTRY:
            raise ValueError(f"probe kind {kind!r} registered twice")
        REGISTRY[kind] = Probe(kind, spec_cls, fn, needs, summary)  # type: ignore[arg-type]
        return fn

    return deco


def run_probe(probe: Probe[ProbeSpec], run: Run, spec: ProbeSpec) -> Finding:
    """Run one probe, timing it; an unreadable artifact or an internal failure becomes ERROR."""
    t0 = time.perf_counter()
    finding = _unreadable(probe, run)
    if finding is None:
        try:
            finding = probe.fn(run, spec)
        except Exception as exc:  # a probe bug must not crash a CI gate into a traceback
            finding = Finding(
                probe.kind,
                probe.kind,
                Verdict.ERROR,
                f"probe failed internally: {type(exc).__name__}: {exc}",
            )
    finding.duration_s = time.perf_counter() - t0
    return finding


def _unreadable(probe: Probe[ProbeSpec], run: Run) -> Finding | None:
    """ERROR when every artifact the probe needs is missing because it could not be read."""
    for artifact in probe.needs:
        fatal = run.fatal_problems(artifact)
        if fatal and not _present(run, artifact):
            return Finding(
                probe.kind,
                probe.kind,
                Verdict.ERROR,
                f"could not read the {artifact}: {fatal[0]}",
                evidence={"problems": [str(p) for p in fatal[:10]]},
            )
    return None


def _present(run: Run, artifact: str) -> bool:
    if artifact == "log":
        return run.has_log
    if artifact == "optimizer":
        return run.optimizer is not None
    if artifact == "adapter":
        return run.adapter is not None
    return False
