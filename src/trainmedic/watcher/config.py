"""What the live watcher looks for and what it may do about it: every knob, with its reason.

Three presets: `default`; `aggressive` (low tolerance: flags and treats earlier, small budgets);
`conservative` (only clear failures: wide thresholds, large budgets). The spike and divergence
defaults equal those of `check`'s training_drift probe, so the live watcher and a post-hoc
check flag the same steps of the same curve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class WatchConfigError(ValueError):
    """A config file or mapping is wrong; the message names the field."""


class WatchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Loss spikes (signals.spikes.SpikeRule)
    spike_k: float = Field(
        6.0, gt=0, description="robust sigmas above the recent level that make a loss spike"
    )
    spike_window: int = Field(32, ge=4, description="points of trailing history the noise is measured on")
    skip_spike_k: float | None = Field(
        12.0,
        gt=0,
        description="a spike this many sigmas high is a poisoned batch: skip its update (None: never skip)",
    )
    # Divergence (signals.trend.DivergenceRule)
    divergence_rise: float = Field(0.5, gt=0, description="smoothed loss this fraction above its best")
    divergence_noise_k: float = Field(
        4.0, gt=0, description="...and at least this many noise sigmas above it"
    )
    divergence_patience: int = Field(3, ge=1, description="consecutive smoothed points above the bar")
    stop_on_divergence: bool = Field(
        True, description="end the attempt on a confirmed divergence: roll back, or stop with a diagnosis"
    )
    # ZClip (Kumar et al. 2025)
    zclip: bool = Field(True, description="adaptive z-score clipping of the total gradient norm")
    zclip_alpha: float = Field(0.97, gt=0, lt=1, description="EMA factor of the norm's mean and variance")
    zclip_z: float = Field(2.5, gt=0, description="z-score above which the norm is clipped")
    zclip_warmup: int = Field(25, ge=1, description="steps of plain statistics before adaptive clipping")
    max_grad_norm: float | None = Field(
        None,
        gt=0,
        description="hard cap on the norm; None takes the Trainer's max_grad_norm (0 there: no cap)",
    )
    # Gradient explosion / vanishing, relative to ZClip's statistics, with absolute floors
    explode_z: float = Field(10.0, gt=0, description="z-score of the norm reported as a gradient explosion")
    explode_floor: float = Field(1e-3, ge=0, description="norms below this are never an explosion")
    vanish_ratio: float = Field(1e-3, gt=0, description="norm below this fraction of its running mean...")
    vanish_floor: float = Field(1e-10, ge=0, description="...or below this absolute value, is vanishing")
    vanish_patience: int = Field(10, ge=1, description="consecutive vanishing steps before reporting")
    # Not learning / chance, judged after warm-up every few steps
    plateau_every: int = Field(50, ge=5, description="steps between two not-learning checks")
    plateau_min_steps: int = Field(100, ge=10, description="no not-learning verdict before this many steps")
    plateau_min_rel_drop: float = Field(0.02, ge=0, description="relative loss drop that counts as learning")
    chance_tol: float = Field(0.02, gt=0, description="nats from ln 2 / ln 3 / ln 4 that count as chance")
    # Overfitting at evaluation
    overfit_patience: int = Field(3, ge=2, description="consecutive eval-loss rises while train loss falls")
    # Budgets: past any of them the watcher stops the run with a diagnosis
    max_skips: int = Field(10, ge=0, description="skipped updates in the whole run")
    max_consecutive_skips: int = Field(3, ge=1, description="skipped updates in a row (the data is poison)")
    max_clip_fraction: float = Field(
        0.5, gt=0, le=1, description="fraction of post-warm-up steps ZClip may clip before it is the norm"
    )
    min_steps_for_clip_budget: int = Field(
        50, ge=1, description="steps after warm-up before that fraction applies"
    )

    lr_jump_ratio: float = Field(
        3.0, gt=1, description="a learning rate this many times its highest so far is a jump, not a schedule"
    )
    cap_lr_jumps: bool = Field(
        True, description="bring a jumped learning rate back to its highest so far, before the update"
    )
    # Rollback: the rung above skip, below stop
    max_rollbacks: int = Field(3, ge=0, description="rollbacks to a certified checkpoint before stopping")
    rollback_lr_factor: float = Field(
        0.5, gt=0, lt=1, description="learning-rate multiplier applied at each rollback (cumulative)"
    )
    # Certified checkpoints
    certify_after: int = Field(
        10, ge=1, description="clean optimizer steps after a save before the checkpoint is certified"
    )
    keep_certified: int = Field(2, ge=1, description="certified checkpoints kept out of rotation")
    checkpoint_every: int | None = Field(
        None,
        ge=1,
        description=(
            "also save a checkpoint every this many steps, so a rollback recomputes at most about "
            "this many plus certify_after (None: only the Trainer's own save schedule)"
        ),
    )

    @classmethod
    def preset(cls, name: str) -> WatchConfig:
        """`default`, `aggressive` (low tolerance) or `conservative` (only clear failures)."""
        if name not in PRESETS:
            raise WatchConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<config>") -> WatchConfig:
        """Build from a mapping; a `preset` key picks the base the other keys override."""
        if not isinstance(data, dict):
            raise WatchConfigError(f"{source}: a watch config must be a mapping")
        values = dict(data)
        base = values.pop("preset", "default")
        if base not in PRESETS:
            raise WatchConfigError(f"{source}: preset: unknown {base!r}; choose one of {sorted(PRESETS)}")
        try:
            return cls(**{**PRESETS[base], **values})
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise WatchConfigError(f"{source}: {loc}: {first['msg']}") from None

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> WatchConfig:
        import yaml

        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise WatchConfigError(f"{p}: cannot read watch config: {exc}") from None
        except yaml.YAMLError as exc:
            raise WatchConfigError(f"{p}: not valid YAML: {exc}") from None
        return cls.from_dict(data if data is not None else {}, source=str(p))


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "aggressive": {
        "spike_k": 4.0,
        "skip_spike_k": 8.0,
        "divergence_rise": 0.3,
        "divergence_patience": 2,
        "zclip_z": 2.0,
        "explode_z": 6.0,
        "plateau_min_steps": 60,
        "overfit_patience": 2,
        "max_skips": 5,
        "max_consecutive_skips": 2,
        "max_clip_fraction": 0.3,
    },
    "conservative": {
        "spike_k": 8.0,
        "skip_spike_k": 20.0,
        "divergence_rise": 1.0,
        "divergence_patience": 5,
        "zclip_z": 3.0,
        "explode_z": 20.0,
        "plateau_min_steps": 300,
        "overfit_patience": 5,
        "max_skips": 50,
        "max_consecutive_skips": 8,
        "max_clip_fraction": 0.8,
    },
}
