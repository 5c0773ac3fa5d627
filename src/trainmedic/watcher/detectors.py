"""The live detectors: `check`'s statistics fed one optimizer step at a time.

Spike, divergence and non-finite detection are the streaming twins in `trainmedic.signals`, with
the same defaults as the `training_drift`/`nonfinite` probes, so a post-hoc `check` of the run
log flags the same steps. Not-learning and overfitting are the probes themselves, run every few
steps on the history so far: one implementation, by construction.
"""

from __future__ import annotations

import math
from pathlib import Path

from trainmedic.findings import Verdict
from trainmedic.probes.not_learning import NotLearningSpec, not_learning
from trainmedic.probes.overfit import OverfitSpec, overfit
from trainmedic.run import Run, Series
from trainmedic.signals.nonfinite import NonFiniteDetector
from trainmedic.signals.spikes import SpikeDetector, SpikeRule
from trainmedic.signals.trend import DivergenceDetector, DivergenceRule
from trainmedic.watcher.config import WatchConfig
from trainmedic.watcher.events import Event, finite_or_none
from trainmedic.watcher.zclip import ClipDecision


class Detectors:
    def __init__(self, cfg: WatchConfig) -> None:
        self.cfg = cfg
        self.nonfinite = NonFiniteDetector()
        self.spike = SpikeDetector(SpikeRule(k=cfg.spike_k, window=cfg.spike_window))
        self.severe = (
            SpikeDetector(SpikeRule(k=cfg.skip_spike_k, window=cfg.spike_window))
            if cfg.skip_spike_k
            else None
        )
        self.divergence = DivergenceDetector(
            DivergenceRule(
                rise=cfg.divergence_rise,
                noise_k=cfg.divergence_noise_k,
                patience=cfg.divergence_patience,
                window=cfg.spike_window,
            )
        )
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.lr_steps: list[int] = []
        self.lrs: list[float] = []
        self.eval_steps: list[int] = []
        self.eval_losses: list[float] = []
        self.extra: dict[str, tuple[list[int], list[float]]] = {}
        self._reported: set[str] = set()
        self._vanishing = 0

    # -- per step, before the update is applied ------------------------------------------------
    def before_update(
        self, step: int, loss: float | None, grad_norm: float | None, lr: float | None
    ) -> tuple[list[Event], str | None]:
        """Events for this step's loss and gradient, and the reason to skip its update, if any."""
        events: list[Event] = []
        skip: str | None = None
        for flag in self.nonfinite.update(step, loss, grad_norm, lr):
            series = flag.kind.split(":", 1)[1]
            events.append(
                Event(
                    flag.step,
                    f"nonfinite_{'grad' if series == 'grad_norm' else series}",
                    "fail",
                    f"{series.replace('_', ' ')} is {flag.value} at step {flag.step}",
                    {"value": finite_or_none(flag.value)},
                )
            )
        if (loss is not None and not math.isfinite(loss)) or (
            grad_norm is not None and not math.isfinite(grad_norm)
        ):
            skip = "non-finite loss or gradient"
        if loss is not None and math.isfinite(loss):
            self.steps.append(step)
            self.losses.append(loss)
            severe = self.severe.update(step, loss) if self.severe is not None else None
            spike = self.spike.update(step, loss)
            if spike is not None:
                sev_word = "severe " if severe is not None else ""
                events.append(
                    Event(
                        step,
                        "loss_spike",
                        "warn",
                        f"{sev_word}loss spike at step {step}: {loss:.4g} above the threshold "
                        f"{spike.threshold:.4g} set by the recent noise ({self.cfg.spike_k:g} sigma)",
                        {"loss": finite_or_none(loss), "threshold": finite_or_none(spike.threshold)},
                    )
                )
            if severe is not None and skip is None:
                skip = f"loss spike beyond {self.cfg.skip_spike_k:g} sigma (a poisoned batch?)"
            div = self.divergence.update(step, loss)
            if div is not None:
                events.append(
                    Event(
                        step,
                        "divergence",
                        "fail",
                        f"diverging: the smoothed loss has stayed above {div.threshold:.4g} since step "
                        f"{div.onset_step} (a {self.cfg.divergence_rise:.0%} rise over its best)",
                        {
                            "loss": finite_or_none(loss),
                            "threshold": finite_or_none(div.threshold),
                            "onset_step": div.onset_step,
                        },
                    )
                )
        if lr is not None and math.isfinite(lr):
            peak = max(self.lrs, default=0.0)
            if peak > 0 and lr > self.cfg.lr_jump_ratio * peak:
                events.append(
                    Event(
                        step,
                        "lr_jump",
                        "warn",
                        f"learning rate jumped to {lr:.3g} at step {step}, x{lr / peak:.3g} its highest "
                        "so far: no ordinary schedule does that",
                        {"lr": lr, "previous_peak": peak, "ratio": lr / peak},
                    )
                )
            self.lr_steps.append(step)
            self.lrs.append(lr)
        if step >= self.cfg.plateau_min_steps and step % self.cfg.plateau_every == 0:
            events.extend(self._not_learning(step))
        return events, skip

    # -- per step, after ZClip decided -----------------------------------------------------------
    def gradient(self, step: int, decision: ClipDecision, running_mean: float | None) -> list[Event]:
        cfg = self.cfg
        events: list[Event] = []
        z, norm = decision.z, decision.norm
        if z is not None and z > cfg.explode_z and norm > cfg.explode_floor:
            events.append(
                Event(
                    step,
                    "grad_explosion",
                    "warn",
                    f"gradient norm {norm:.4g} at step {step} is {z:.1f} sigma above its running mean "
                    f"{running_mean:.4g}"
                    if running_mean is not None
                    else f"gradient norm {norm:.4g} exploded",
                    {"grad_norm": finite_or_none(norm), "z": finite_or_none(z)},
                )
            )
        floor = cfg.vanish_floor
        if running_mean is not None:
            floor = max(floor, cfg.vanish_ratio * running_mean)
        self._vanishing = self._vanishing + 1 if math.isfinite(norm) and norm < floor else 0
        if self._vanishing == cfg.vanish_patience:
            events.append(
                Event(
                    step,
                    "grad_vanishing",
                    "warn",
                    f"gradient norm has stayed below {floor:.3g} for {cfg.vanish_patience} steps "
                    f"(now {norm:.3g}): the update has stopped reaching the trainable weights",
                    {"grad_norm": finite_or_none(norm), "floor": finite_or_none(floor)},
                )
            )
        return events

    def correct_lr(self, lr: float) -> None:
        """The step's learning rate after a treatment changed it (what the update really used)."""
        if self.lrs:
            self.lrs[-1] = lr

    def record_extra(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            steps, vals = self.extra.setdefault(key, ([], []))
            steps.append(step)
            vals.append(value)

    # -- at evaluation ---------------------------------------------------------------------------
    def evaluation(self, step: int, eval_loss: float | None) -> list[Event]:
        if eval_loss is None:
            return []
        self.eval_steps.append(step)
        self.eval_losses.append(eval_loss)
        finding = overfit(self._run(), OverfitSpec())
        if finding.verdict is not Verdict.WARN:
            return []
        best = finding.evidence.get("best_step")
        key = f"overfit:{best}"
        if key in self._reported:
            return []
        self._reported.add(key)
        return [Event(step, "overfit", "warn", finding.message, {"best_step": best})]

    def finish(self) -> list[Event]:
        return [
            Event(f.step, "nonfinite_grad", "fail", f"grad norm is {f.value} at step {f.step}", {})
            for f in self.nonfinite.finish()
        ]

    # -- helpers ---------------------------------------------------------------------------------
    def _run(self) -> Run:
        return Run(
            path=_LIVE,
            layout="live",
            train_loss=Series.of(self.steps, self.losses),
            learning_rate=Series.of(self.lr_steps, self.lrs),
            eval_loss=Series.of(self.eval_steps, self.eval_losses),
            extra={k: Series.of(s, v) for k, (s, v) in self.extra.items()},
        )

    def _not_learning(self, step: int) -> list[Event]:
        if "not_learning" in self._reported or len(self.losses) < 5:
            return []
        finding = not_learning(
            self._run(),
            NotLearningSpec(chance_tol=self.cfg.chance_tol, min_rel_drop=self.cfg.plateau_min_rel_drop),
        )
        if finding.verdict is not Verdict.FAIL:
            return []
        self._reported.add("not_learning")
        return [Event(step, "not_learning", "fail", f"not learning: {finding.message}", {})]


_LIVE = Path("<live>")
