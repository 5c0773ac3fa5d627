"""The YAML spec: overrides and selection, and clear errors for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainmedic.spec import SpecError, load_spec, spec_from_mapping


def test_override_reaches_the_probe_spec() -> None:
    spec = spec_from_mapping({"probes": {"training_drift": {"min_steps": 25}}})
    chosen = {probe.kind: s for probe, s in spec.selected()}
    assert chosen["training_drift"].min_steps == 25  # type: ignore[attr-defined]


def test_disabled_probe_is_not_selected() -> None:
    spec = spec_from_mapping({"probes": {"memorization": {"enabled": False}}})
    assert "memorization" not in {probe.kind for probe, _ in spec.selected()}


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ([1, 2], "must be a mapping"),
        ({"probs": {}}, "unknown top-level key"),
        ({"probes": {"nope": {}}}, "probes.nope: no such probe"),
        ({"probes": {"training_drift": 3}}, "expected a mapping"),
        ({"probes": {"training_drift": {"min_steps": "many"}}}, "probes.training_drift.min_steps"),
        ({"only": "nonfinite"}, "'only' must be a list"),
        ({"only": ["nonfinite", "bogus"]}, "no such probe ['bogus']"),
    ],
)
def test_spec_mistakes_name_the_field(data: object, needle: str) -> None:
    with pytest.raises(SpecError) as info:
        spec_from_mapping(data, source="s.yaml")
    assert needle in str(info.value)
    assert "s.yaml" in str(info.value)


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "spec.yaml"
    bad.write_text("probes: [unclosed\n")
    with pytest.raises(SpecError, match=r"spec\.yaml: not valid YAML"):
        load_spec(bad)
