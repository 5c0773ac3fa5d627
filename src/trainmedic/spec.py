"""The check spec: which probes run and with which thresholds, optionally from a YAML file.

```yaml
probes:                      # per-probe overrides; any field of the probe's spec
  training_drift: {min_steps: 20, spike_sigma: 4.0}
  memorization: {enabled: false}
only: [nonfinite, training_drift]   # optional: run just these
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trainmedic.probes import all_probes
from trainmedic.probes.base import Probe, ProbeSpec


class SpecError(Exception):
    """A spec file or override is wrong; the message names the file and the field."""


@dataclass
class CheckSpec:
    specs: dict[str, ProbeSpec] = field(default_factory=dict)
    only: frozenset[str] | None = None

    def selected(self) -> list[tuple[Probe[ProbeSpec], ProbeSpec]]:
        chosen = []
        for kind, probe in all_probes().items():
            spec = self.specs.get(kind) or probe.spec_cls.model_construct()
            if self.only is not None and kind not in self.only:
                continue
            if spec.enabled:
                chosen.append((probe, spec))
        return chosen


def default_spec() -> CheckSpec:
    return CheckSpec()


def load_spec(path: Path) -> CheckSpec:
    """Parse a YAML spec file; every mistake is a SpecError naming the file and the key."""
    import yaml  # only needed when a spec file is given

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read spec file: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    return spec_from_mapping(data if data is not None else {}, source=str(path))


def spec_from_mapping(data: Any, *, source: str = "<spec>") -> CheckSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the spec must be a mapping with 'probes' and/or 'only'")
    unknown = set(data) - {"probes", "only"}
    if unknown:
        raise SpecError(f"{source}: unknown top-level key(s) {sorted(unknown)}; expected 'probes', 'only'")
    probes = all_probes()
    known = ", ".join(probes)
    specs: dict[str, ProbeSpec] = {}
    overrides = data.get("probes") or {}
    if not isinstance(overrides, dict):
        raise SpecError(f"{source}: 'probes' must map probe names to their settings")
    for kind, values in overrides.items():
        if kind not in probes:
            raise SpecError(f"{source}: probes.{kind}: no such probe (known: {known})")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise SpecError(f"{source}: probes.{kind}: expected a mapping of settings, got {values!r:.60}")
        try:
            specs[kind] = probes[kind].spec_cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise SpecError(f"{source}: probes.{kind}.{loc}: {first['msg']}") from None
    only = data.get("only")
    only_set: frozenset[str] | None = None
    if only is not None:
        if not isinstance(only, list) or not all(isinstance(k, str) for k in only):
            raise SpecError(f"{source}: 'only' must be a list of probe names")
        bad = [k for k in only if k not in probes]
        if bad:
            raise SpecError(f"{source}: only: no such probe {bad} (known: {known})")
        only_set = frozenset(only)
    return CheckSpec(specs=specs, only=only_set)
