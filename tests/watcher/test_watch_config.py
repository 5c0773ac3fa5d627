"""Watch presets and config files: round trips and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainmedic.watcher.config import PRESETS, WatchConfig, WatchConfigError


def test_presets_order_their_tolerance() -> None:
    default, aggressive, conservative = (
        WatchConfig.preset(n) for n in ("default", "aggressive", "conservative")
    )
    assert aggressive.spike_k < default.spike_k < conservative.spike_k
    assert aggressive.max_skips < default.max_skips < conservative.max_skips


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = WatchConfig.preset("aggressive")
    path = tmp_path / "watch.yaml"
    path.write_text(cfg.to_yaml())
    assert WatchConfig.from_yaml(path) == cfg


def test_preset_key_is_a_base_for_overrides() -> None:
    cfg = WatchConfig.from_dict({"preset": "conservative", "max_skips": 7})
    assert cfg.max_skips == 7 and cfg.spike_k == PRESETS["conservative"]["spike_k"]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"spike_kk": 3}, "spike_kk"),
        ({"spike_k": -1}, "spike_k"),
        ({"preset": "wild"}, "unknown 'wild'"),
        ([1], "must be a mapping"),
    ],
)
def test_bad_config_names_the_field(data: object, needle: str) -> None:
    with pytest.raises(WatchConfigError, match=needle):
        WatchConfig.from_dict(data, source="w.yaml")


def test_unknown_preset_is_a_clear_error() -> None:
    with pytest.raises(WatchConfigError, match="unknown preset"):
        WatchConfig.preset("yolo")


def test_watch_config_defaults_match_check() -> None:
    from trainmedic.probes.training_drift import TrainingDriftSpec

    cfg, spec = WatchConfig(), TrainingDriftSpec()
    assert (cfg.spike_k, cfg.spike_window) == (spec.spike_k, spec.spike_window)
    assert (cfg.divergence_rise, cfg.divergence_noise_k, cfg.divergence_patience) == (
        spec.divergence_rise,
        spec.divergence_noise_k,
        spec.divergence_patience,
    )
