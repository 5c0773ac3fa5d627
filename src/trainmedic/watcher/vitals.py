"""`Vitals`: the per-step callback. It observes and treats inside one optimizer step; what spans
steps (budgets beyond a stop, rollback, OOM) belongs to the supervisor.

Per step it records the raw training loss (captured where the Trainer computes it, once
attached), the pre-clip global gradient norm in fp32, the learning rate, tokens and wall time;
runs the detectors; and treats: ZClip rescales an outlier gradient, a non-finite or
severely spiked step has its update skipped (every `p.grad = None`: no parameter or optimizer
moment changes; the scheduler and `global_step` still advance, which the step record says).

For ZClip to see the raw norm the Trainer's own clipping must be off: `Vitals` sets
`max_grad_norm = 0` at train start and applies the user's cap itself. Once attached, it keeps the
Trainer's logged `loss`, `grad_norm` and `train_loss` to the updates that were applied
(`logged.AppliedWindow`): a treated NaN never reaches the user's dashboards.

Used alone (`trainer.add_callback(Vitals())`) it sees gradients every step and the loss at
logging steps only; `watch(trainer)` or `Vitals().attach(trainer)` add the per-step loss.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from trainmedic.watcher.agreement import adopt_split, agree
from trainmedic.watcher.alerts import trackio_alert
from trainmedic.watcher.capture import wire
from trainmedic.watcher.checkpoints import breaks_clean_window
from trainmedic.watcher.config import WatchConfig
from trainmedic.watcher.detectors import Detectors
from trainmedic.watcher.events import Action, Event, StepVitals, finite_or_none
from trainmedic.watcher.grads import drop_grads, grads_of, scale_, total_norm
from trainmedic.watcher.logged import AppliedWindow
from trainmedic.watcher.rollback import RollbackRequest, scale_lr
from trainmedic.watcher.runlog import RunLog, installed_versions
from trainmedic.watcher.treatment_state import load_treatment, save_treatment
from trainmedic.watcher.zclip import ClipDecision, ZClip

logger = logging.getLogger("trainmedic")
# TRL logs these per micro-batch in `trainer._metrics["train"]`; they are worth a curve.
TRL_KEYS = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "reward")


class Vitals(TrainerCallback):
    def __init__(
        self,
        config: WatchConfig | str | None = None,
        *,
        run_log: bool = True,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config if isinstance(config, WatchConfig) else WatchConfig.preset(config or "default")
        cfg = self.config
        self.zclip = ZClip(alpha=cfg.zclip_alpha, z_thresh=cfg.zclip_z, warmup=cfg.zclip_warmup)
        self.detectors = Detectors(cfg)
        self.events: list[Event] = []
        self.actions: list[Action] = []
        self.counts: Counter[str] = Counter()
        self.last: StepVitals | None = None
        self.stop_reason: str | None = None
        self.recorder: RunLog | None = None
        self.run_id: str | None = None
        self.run_log = run_log
        self.echo = echo
        self.user_cap: float | None = None
        self.oom: Any = None  # the supervisor's OomGuard, whose learned split is saved with checkpoints
        # told of every step that breaks a clean window (the Certifier voids pending certifications)
        self.trouble_listeners: list[Callable[[int, str], None]] = []
        self._trainer: Any = None
        self._params: list[torch.nn.Parameter] | None = None
        self._loss: torch.Tensor | None = None
        self._norm: torch.Tensor | None = None  # this step's norm, when the Trainer asked for it first
        self._tokens: torch.Tensor | None = None
        self._extra: dict[str, list[float]] = {}
        self._t0 = 0.0
        self._pending: StepVitals | None = None
        self._consecutive_skips = 0
        self._cap_known = False
        # rollback: asked for by the budgets/divergence, carried out by the supervisor
        self.can_roll_back = False
        self.rollback_request: RollbackRequest | None = None
        self.lr_scale = 1.0  # cumulative LR reduction from rollbacks, applied on every (re)start
        self._checkpoint_lr_scale = 1.0  # the scale the resumed checkpoint was trained with
        self.skip_batches = 0  # micro-batches to drop after a rollback (the data window that hurt)
        # micro-batches dropped so far in this run's timeline; a resume must drop them again, since
        # the Trainer fast-forwards its data by step count alone
        self.dropped = 0
        self._agreed_split = 1  # the OOM split all ranks use (the finest any of them needed)
        self._checkpoint_dropped = 0
        self._post_warmup_steps = 0
        self._post_warmup_clips = 0
        self.window = AppliedWindow()  # the applied updates since the Trainer last logged

    # -- wiring ----------------------------------------------------------------------------------
    def attach(self, trainer: Any) -> Vitals:
        """Capture each micro-batch's loss where the Trainer computes it, and add trainmedic's
        metrics to the Trainer's own logs so every `report_to` integration shows them."""
        if self._trainer is trainer:
            return self  # wrapping twice would count every micro-batch's loss twice
        self._trainer = trainer
        handler = trainer.callback_handler
        if self not in handler.callbacks:
            handler.callbacks.insert(0, self)
        wire(self, trainer)
        return self

    def metrics(self) -> dict[str, float]:
        """`trainmedic/...` values for the Trainer's logs (and so TensorBoard, W&B, trackio...)."""
        out = {
            "trainmedic/events": float(len(self.events)),
            "trainmedic/warnings": float(sum(e.severity != "info" for e in self.events)),
            "trainmedic/skips": float(self.counts["skip"]),
            "trainmedic/clips": float(self.counts["clip"]),
        }
        if self.last is not None and self.last.grad_norm_after_clip is not None:
            out["trainmedic/grad_norm_after_clip"] = float(self.last.grad_norm_after_clip)
        if self.zclip.mean is not None:
            out["trainmedic/zclip_mean"] = float(self.zclip.mean)
        out["trainmedic/rollbacks"] = float(self.counts["rollback"])
        return out | self.window.metrics()

    # -- the moments of a step -------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if model is not None:
            self._params = [p for p in model.parameters() if p.requires_grad]
        if not self._cap_known:  # a second train() (resume, rollback) finds our own 0 there
            cap = self.config.max_grad_norm
            if cap is None and args.max_grad_norm and args.max_grad_norm > 0:
                cap = float(args.max_grad_norm)
            self.user_cap, self._cap_known = cap, True
        cap = self.user_cap
        self.zclip.max_norm = cap
        args.max_grad_norm = 0.0  # trainmedic clips (ZClip + the user's cap) itself
        self.window.reset()
        self._checkpoint_lr_scale = 1.0
        self._checkpoint_dropped = 0
        if state.global_step > 0:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            load_treatment(self, ckpt, int(args.per_device_train_batch_size))
        # drop again what the resumed timeline had dropped, then a rollback's new window (if any)
        self.skip_batches += self._checkpoint_dropped
        self.dropped = self.skip_batches
        factor = self.lr_scale / self._checkpoint_lr_scale
        scale_lr(kwargs.get("optimizer"), kwargs.get("lr_scheduler"), factor)
        if self.run_log and state.is_world_process_zero and self.recorder is None:
            self.recorder = RunLog.open(
                Path(args.output_dir),
                run_id=self.run_id,
                config=self.config.to_dict() | {"max_grad_norm_applied": cap},
                versions=installed_versions(),
                max_steps=state.max_steps,
                resumed_from_step=state.global_step or None,
            )
            self.run_id = self.recorder.run_id
            line = f"[trainmedic] watching {args.output_dir}: run log {self.recorder.path}"
            self._say(line, logging.INFO)
        return control

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._t0 = time.perf_counter()
        return control

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> Any:
        if model is None:
            return control
        if self._params is None:
            self._params = [p for p in model.parameters() if p.requires_grad]
        grads = grads_of(self._params)
        norm_t = self._norm
        logged_norm = norm_t  # the tensor the Trainer logs as grad_norm, when it asked us for it
        if norm_t is None:
            self._unscale_fp16()
            norm_t = total_norm(grads)
        self._norm = None
        loss_t = self._loss
        step = state.global_step + 1
        if loss_t is not None:
            # every rank averages the loss (the norm is already global): one collective, one sync
            split = self.oom.split if self.oom is not None else 1
            agreed, splits = agree(torch.stack([loss_t.to(norm_t.device), norm_t]), split)
            loss, norm = agreed.tolist()
            self._agreed_split, actions = adopt_split(self.oom, splits, self._agreed_split, step)
            for action in actions:
                self._act(action)
        else:
            loss, norm = None, float(norm_t)
        tokens = int(self._tokens) if self._tokens is not None else None
        self._loss = self._tokens = None
        lr = _lr(optimizer)
        events, skip = self.detectors.before_update(step, loss, norm, lr)
        for event in events:  # what was seen, then what was done about it
            self._emit(event)
        lr = self._cap_lr_jump(step, events, optimizer, kwargs.get("lr_scheduler"), lr)
        after: float | None
        if skip is not None:
            drop_grads(self._params)
            self._trouble(step, skip)
            after = 0.0
            self._act(
                Action(step, "skip", skip, {"loss": finite_or_none(loss), "grad_norm": finite_or_none(norm)})
            )
            self._consecutive_skips += 1
            self.window.skipped(loss, logged_norm)
        else:
            self._consecutive_skips = 0
            self.window.applied(loss, norm)
            decision = self.zclip.decide(norm) if self.config.zclip else _cap_only(norm, self.user_cap)
            grad_events = self.detectors.gradient(step, decision, self.zclip.mean)
            for event in grad_events:
                self._emit(event)
            events += grad_events
            after = self._clip(step, grads, decision)
        self._pending = StepVitals(step, loss, norm, after, lr, skip is not None, tokens)
        self._enforce_budgets(step, control, events)
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        vitals = self._pending
        if vitals is None:
            return control
        vitals.time = time.perf_counter() - self._t0
        vitals.extra = {k: sum(v) / len(v) for k, v in self._extra.items() if v}
        self._extra = {}
        if vitals.extra:
            self.detectors.record_extra(vitals.step, vitals.extra)
        if state.epoch is not None:
            vitals.extra["epoch"] = float(state.epoch)
        self.last, self._pending = vitals, None
        if self._trainer is not None:
            self.window.repair(self._trainer, int(state.global_step))
        if self.recorder is not None:
            self.recorder.write(vitals.to_record())
        return control

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> Any:
        # Alone (not attached), the logged loss is the only loss there is: detect on it.
        if self._trainer is None and logs and "loss" in logs and isinstance(logs["loss"], int | float):
            events, _ = self.detectors.before_update(state.global_step, float(logs["loss"]), None, None)
            for event in events:
                self._emit(event)
            self._enforce_budgets(state.global_step, control, events)
        return control

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kwargs: Any
    ) -> Any:
        value = (metrics or {}).get("eval_loss")
        eval_loss = float(value) if isinstance(value, int | float) else None
        if self.recorder is not None and metrics:
            self.recorder.eval(state.global_step, metrics)
        for event in self.detectors.evaluation(state.global_step, eval_loss):
            self._emit(event)
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir() and state.is_world_process_zero:
            save_treatment(
                self, ckpt, int(args.per_device_train_batch_size), int(args.gradient_accumulation_steps)
            )
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        for event in self.detectors.finish():
            self._emit(event)
        return control

    def close(self, status: str, reason: str, step: int) -> None:
        """Write the final record and release the log (the supervisor calls this once)."""
        if self.recorder is not None:
            self.recorder.run_complete(step, status, reason, step)
            self.recorder.close()
            self.recorder = None

    # -- treatments ------------------------------------------------------------------------------
    def _clip(self, step: int, grads: list[torch.Tensor], decision: ClipDecision) -> float:
        norm = decision.norm
        if self.zclip.ready:
            self._post_warmup_steps += 1
        if decision.target is None or decision.target >= norm:
            return norm
        scale_(grads, decision.target / (norm + 1e-12))
        if decision.reason == "zscore":
            self.counts["clip"] += 1
            self._post_warmup_clips += 1
        if decision.reason == "zscore" and decision.z is not None:
            # the user's fixed cap is routine and shows in grad_norm_after_clip; ZClip is a treatment
            detail = {
                "grad_norm": finite_or_none(norm),
                "clipped_to": finite_or_none(decision.target),
                "z": finite_or_none(decision.z),
            }
            why = f"ZClip: norm {norm:.4g} is {decision.z:.1f} sigma above its running mean, rescaled"
            self._act(Action(step, "clip", why, detail), count=False)
        return decision.target

    def _cap_lr_jump(
        self, step: int, events: list[Event], optimizer: Any, scheduler: Any, lr: float | None
    ) -> float | None:
        """Undo a learning-rate jump before the update uses it (optimizer and scheduler alike, so it
        stays undone); a schedule never multiplies its own peak, so the jump is a bug or a fault."""
        jump = next((e for e in events if e.rule == "lr_jump"), None)
        if jump is None or not self.config.cap_lr_jumps or lr is None:
            return lr
        ratio = float(jump.evidence["ratio"])
        scale_lr(optimizer, scheduler, 1.0 / ratio)
        capped = _lr(optimizer)
        self.detectors.correct_lr(capped if capped is not None else lr / ratio)
        why = f"learning rate x{ratio:.3g} above its highest so far: brought back to {lr / ratio:.3g}"
        self._act(Action(step, "lr_cap", why, {"from": lr, "to": lr / ratio, "ratio": ratio}))
        return capped

    def _enforce_budgets(self, step: int, control: Any, events: list[Event]) -> None:
        cfg = self.config
        reason = None
        if self.counts["skip"] > cfg.max_skips:
            reason = f"{self.counts['skip']} skipped updates exceed the budget of {cfg.max_skips}"
        elif self._consecutive_skips > cfg.max_consecutive_skips:
            reason = (
                f"{self._consecutive_skips} consecutive skipped updates (budget {cfg.max_consecutive_skips})"
            )
        elif (
            self._post_warmup_steps >= cfg.min_steps_for_clip_budget
            and self._post_warmup_clips > cfg.max_clip_fraction * self._post_warmup_steps
        ):
            reason = (
                f"ZClip clipped {self._post_warmup_clips} of {self._post_warmup_steps} steps "
                f"(budget {cfg.max_clip_fraction:.0%}): outliers have become the norm, the run is unstable"
            )
        elif cfg.stop_on_divergence and any(e.rule == "divergence" for e in events):
            reason = next(e.message for e in events if e.rule == "divergence")
        if reason is None or self.stop_reason is not None or self.rollback_request is not None:
            return
        if not reason.startswith("diverging"):
            self._emit(Event(step, "budget", "fail", f"treatment budget exhausted: {reason}"))
        control.should_training_stop = True
        if self.can_roll_back:
            self.rollback_request = RollbackRequest(step, self._trouble_onset(step, events), reason)
            return
        self.stop_reason = reason
        self._act(Action(step, "stop", reason))

    # -- bookkeeping -----------------------------------------------------------------------------
    def _emit(self, event: Event) -> None:
        self.events.append(event)
        if event.severity != "info" and breaks_clean_window(event.rule):
            self._trouble(event.step, event.message)
            onset = event.evidence.get("onset_step")
            if isinstance(onset, int) and onset != event.step:
                self._trouble(onset, event.message)
        self.counts[f"event:{event.rule}"] += 1
        if self.recorder is not None:
            self.recorder.write(event.to_record())
        line = f"[trainmedic] step {event.step}: {event.severity.upper()} {event.message}"
        self._say(line, logging.ERROR if event.severity == "fail" else logging.WARNING)
        trackio_alert(self._trainer, event)

    def _trouble_onset(self, step: int, events: list[Event]) -> int:
        """Where the trouble began: a divergence's onset, or the first of the skips in a row."""
        onsets = [e.evidence.get("onset_step") for e in events if e.rule == "divergence"]
        found = [o for o in onsets if isinstance(o, int)]
        if found:
            return min(found)
        return step - max(self._consecutive_skips - 1, 0)

    def rewind(self, to_step: int) -> None:
        """Forget what happened after `to_step` (a rollback will recompute it): detectors are
        rebuilt and fed the surviving history, so they agree with a check of the final log."""
        old = self.detectors
        self.detectors = Detectors(self.config)
        keep = [(s, v) for s, v in zip(old.steps, old.losses, strict=True) if s <= to_step]
        lrs = dict(zip(old.lr_steps, old.lrs, strict=True))
        for s, v in keep:
            self.detectors.before_update(s, v, None, lrs.get(s))
        self.rollback_request = None
        self._consecutive_skips = 0
        self._post_warmup_steps = self._post_warmup_clips = 0

    def _trouble(self, step: int, why: str) -> None:
        for listen in self.trouble_listeners:
            listen(step, why)

    def _act(self, action: Action, *, count: bool = True) -> None:
        self.actions.append(action)
        if count:
            self.counts[action.action] += 1
        if self.recorder is not None:
            self.recorder.write(action.to_record())
        if action.action != "clip":  # clips are routine; events say why
            verbs = {
                "skip": "update skipped",
                "stop": "stopping the run",
                "rollback": "rolling back",
                "lr_cap": "learning rate capped",
            }
            verb = verbs.get(action.action, action.action)
            line = f"[trainmedic] step {action.step}: {verb}: {action.reason}"
            self._say(line, logging.WARNING)

    def _say(self, line: str, level: int) -> None:
        if self.echo is not None:
            self.echo(line)
        else:
            logger.log(level, line)

    def _collect_trl_metrics(self, trainer: Any) -> None:
        metrics = getattr(trainer, "_metrics", None)
        train = metrics.get("train") if isinstance(metrics, dict) else None
        if not isinstance(train, dict):
            return
        for key in TRL_KEYS:
            values = train.get(key)
            if values:
                self._extra.setdefault(key, []).append(float(values[-1]))

    def _unscale_fp16(self) -> None:
        accelerator = getattr(self._trainer, "accelerator", None)
        if accelerator is not None and getattr(accelerator, "scaler", None) is not None:
            accelerator.unscale_gradients()  # as the Trainer's own clipping would


def _lr(optimizer: Any) -> float | None:
    try:
        return float(optimizer.param_groups[0]["lr"])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


def _cap_only(norm: float, cap: float | None) -> ClipDecision:
    if cap is not None and math.isfinite(norm) and norm > cap:
        return ClipDecision(norm, cap, None, "cap")
    return ClipDecision(norm, None, None, "none")
