"""`watch(trainer)`: run `trainer.train()` under supervision and say plainly how it ended.

The supervisor owns what spans steps. In this version that is the run's end: a clean finish,
a stop because a budget ran out or the loss diverged, or a crash (a postmortem is written and
the exception re-raised, never swallowed). Rollback, OOM recovery and agreement between
processes plug in here.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trainmedic.watcher.config import WatchConfig
from trainmedic.watcher.events import Action, Event
from trainmedic.watcher.retry import RetryPolicy
from trainmedic.watcher.rollback import RollbackRequest
from trainmedic.watcher.vitals import Vitals

logger = logging.getLogger("trainmedic")


@dataclass
class WatchResult:
    """How a watched run ended, what was seen and what was done."""

    status: str  # completed | stopped
    reason: str
    steps: int
    final_loss: float | None
    events: list[Event] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    log_path: Path | None = None
    postmortem_path: Path | None = None
    train_output: Any = None

    @property
    def ok(self) -> bool:
        return self.status == "completed" and not any(e.severity == "fail" for e in self.events)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for a in self.actions:
            counts[a.action] = counts.get(a.action, 0) + 1
        treated = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no treatment"
        loss = f", final loss {self.final_loss:.4g}" if self.final_loss is not None else ""
        head = f"{self.status} after {self.steps} steps ({self.reason})"
        return f"{head}: {len(self.events)} event(s), {treated}{loss}"


def watch(
    trainer: Any,
    config: WatchConfig | str | None = None,
    *,
    resume: bool | None = None,
    resume_from_checkpoint: str | bool | None = None,
    echo: Any = None,
    vitals: Vitals | None = None,
    preflight: int = 2,
    retry: RetryPolicy | None = None,
) -> WatchResult:
    """Train `trainer` under supervision; returns a `WatchResult` (raises what `train()` raises).

    `preflight` batches are first run forward and backward with the model left untouched, so a
    shape, dtype, data or memory error surfaces before the long run starts (0 turns it off).
    `resume=True` (or the environment variable `TRAINMEDIC_RESUME=1`, which `trainmedic resume`
    sets) continues from the newest certified checkpoint of `output_dir`, treatment state and
    run log included, or starts from scratch, saying so, when there is none; an explicit
    `resume_from_checkpoint` wins. Transient network errors of hub pushes and reporters are
    retried with backoff (`retry`, default `RetryPolicy()`), each retry logged as an action.

    A second `watch(trainer)` carries on with the watcher already attached (never a second one),
    and the TrainingArguments watch changes to do its work (`CHANGED_ARGS`) are the user's again
    when it returns.
    """
    from trainmedic.watcher.say import make_visible, sayer

    if echo is None:
        make_visible()
    say = sayer(echo)
    vitals = _one_watcher(trainer, vitals, config, echo)
    user_args = _snapshot(trainer.args)
    try:
        return _watch(trainer, vitals, say, resume, resume_from_checkpoint, preflight, retry, echo)
    finally:
        _restore(trainer, user_args)


# The TrainingArguments fields watch changes only to do its work (it clips in place of the
# Trainer). An OOM fallback's smaller micro-batch is different: a treatment the result and the
# run log report, kept so that a later train() does not run out of memory again.
CHANGED_ARGS = ("max_grad_norm",)


def _snapshot(args: Any) -> dict[str, Any]:
    return {k: getattr(args, k) for k in CHANGED_ARGS if hasattr(args, k)}


def _restore(trainer: Any, saved: dict[str, Any]) -> None:
    """Give the user's TrainingArguments back as they were (`CHANGED_ARGS`)."""
    for key, value in saved.items():
        setattr(trainer.args, key, value)


def _one_watcher(trainer: Any, vitals: Vitals | None, config: WatchConfig | str | None, echo: Any) -> Vitals:
    """The trainer's one `Vitals`: the one given, else the one already attached (a second
    `watch(trainer)` carries on with it rather than stacking a second watcher, whose run log and
    loss capture would double the first's), else a new one."""
    attached = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Vitals)]
    others = [cb for cb in attached if cb is not vitals]
    if vitals is not None:
        if others:
            raise ValueError(
                "this trainer already has another trainmedic Vitals attached; give that one, or none"
            )
        return vitals
    if not attached:
        return Vitals(config, echo=echo)
    found = attached[0]
    wanted = config if isinstance(config, WatchConfig) else WatchConfig.preset(config) if config else None
    if wanted is not None and wanted != found.config:
        raise ValueError(
            "this trainer is already watched with another WatchConfig; "
            "pass the same one, or build a new trainer"
        )
    if echo is not None:
        found.echo = echo
    return found


def _watch(
    trainer: Any,
    vitals: Vitals,
    say: Any,
    resume: bool | None,
    resume_from_checkpoint: str | bool | None,
    preflight: int,
    retry: RetryPolicy | None,
    echo: Any,
) -> WatchResult:
    from trainmedic.watcher.resume import resolve_resume
    from trainmedic.watcher.retry import install_retries

    resume_from_checkpoint = resolve_resume(trainer, vitals, resume, resume_from_checkpoint, say)
    if preflight and not resume_from_checkpoint:
        stopped = _preflight(trainer, vitals, preflight, echo)
        if stopped is not None:
            return stopped
    if vitals.oom is None:
        from trainmedic.watcher.oom import OomGuard

        # beneath Vitals: a piece that fits must not be counted again when a later piece fails
        vitals.oom = OomGuard(on_action=vitals._act).attach(trainer)
    vitals.attach(trainer)
    _certify(trainer, vitals)
    install_retries(trainer, vitals._act, retry)
    start = time.perf_counter()
    try:
        output = _train_with_rollbacks(trainer, vitals, resume_from_checkpoint)
    except BaseException as exc:
        step = int(trainer.state.global_step)
        reason = f"{type(exc).__name__}: {exc}"
        vitals.close("crashed", reason, step)
        _postmortem(trainer, vitals, "crashed", reason, time.perf_counter() - start, exc)
        raise
    step = int(trainer.state.global_step)
    status, reason = (
        ("stopped", vitals.stop_reason) if vitals.stop_reason else ("completed", "reached the end")
    )
    log_path = vitals.recorder.path if vitals.recorder is not None else None
    vitals.close(status, reason, step)
    pm = _postmortem(trainer, vitals, status, reason, time.perf_counter() - start, None)
    last = vitals.last
    final = last.loss if last is not None and last.loss is not None and math.isfinite(last.loss) else None
    result = WatchResult(
        status=status,
        reason=reason,
        steps=step,
        final_loss=final,
        events=list(vitals.events),
        actions=list(vitals.actions),
        log_path=log_path,
        postmortem_path=pm,
        train_output=output,
    )
    if trainer.is_world_process_zero():
        where = ", ".join(f"{k} {v}" for k, v in (("run log", log_path), ("postmortem", pm)) if v is not None)
        say(f"[trainmedic] {result.summary()}" + (f"; {where}" if where else ""))
    return result


def _train_with_rollbacks(trainer: Any, vitals: Vitals, resume: str | bool | None) -> Any:
    """The escalation ladder's top rungs. Inside a step Vitals clips and skips; when a budget runs
    out or the loss diverges it ends the attempt and asks for a rollback, which is carried out
    here until the rollback budget is spent, after which Vitals stops the run itself."""
    from trainmedic.watcher.oom import OomNotRecoverable

    cfg = vitals.config
    rollbacks = vitals.counts["rollback"]  # a resumed run keeps the budget it had spent
    vitals.can_roll_back = cfg.max_rollbacks > 0
    while True:
        try:
            output = trainer.train(resume_from_checkpoint=resume)
        except OomNotRecoverable as exc:
            resume = _smaller_micro_batches(trainer, vitals, exc)
            continue
        request = vitals.rollback_request
        if request is None:
            return output
        resume = _roll_back(trainer, vitals, request)
        if resume is None:
            return output
        rollbacks += 1
        vitals.can_roll_back = rollbacks < cfg.max_rollbacks


def _roll_back(trainer: Any, vitals: Vitals, request: RollbackRequest) -> str | None:
    """Rewind to the newest certified checkpoint from before the trouble began, with a really lower
    learning rate, skipping the data window that led to the trouble. None: nowhere to go, stop."""
    from trainmedic.watcher.checkpoints import newest_certified

    # rank 0 chooses and every rank follows: a choice read from disk must not race rank 0's writes
    mine = newest_certified(Path(trainer.args.output_dir), before_step=request.onset)
    ckpt = _from_rank_zero(mine if trainer.is_world_process_zero() else None)
    if ckpt is None:
        reason = f"{request.reason}; no certified checkpoint from before step {request.onset} to roll back to"
        vitals.stop_reason = reason
        vitals._act(Action(request.step, "stop", reason))
        vitals.rollback_request = None
        return None
    to_step = int(ckpt.name.rsplit("-", 1)[1])
    vitals.lr_scale *= vitals.config.rollback_lr_factor
    window = max(request.step - to_step, 0)
    vitals.skip_batches = window * int(trainer.args.gradient_accumulation_steps)
    why = (
        f"{request.reason}: back to {ckpt.name} (certified), learning rate x{vitals.lr_scale:g}, "
        f"skipping the data of steps {to_step + 1}-{request.step}"
    )
    detail = {
        "to": str(ckpt),
        "to_step": to_step,
        "lr_scale": vitals.lr_scale,
        "skipped_batches": vitals.skip_batches,
    }
    vitals._act(Action(request.step, "rollback", why, detail))
    vitals.rewind(to_step)
    return str(ckpt)


def _smaller_micro_batches(trainer: Any, vitals: Vitals, exc: Any) -> str:
    """OOM that splitting could not get through: back to the newest certified checkpoint before
    the step, resumed with a smaller per-device batch and proportionally more accumulation, so
    the effective batch stays the same. No learning-rate change and no data skipped: the run was
    healthy, only too large. Re-raises `exc` when there is no fallback or nowhere to go back to."""
    from trainmedic.watcher.checkpoints import newest_certified

    fallback = exc.fallback
    if not fallback:
        raise exc
    if trainer.args.world_size > 1:  # the other ranks wait in a collective this rank left
        exc.add_note(f"trainmedic: restart every process with {fallback} (and resume)")
        raise exc
    mine = newest_certified(Path(trainer.args.output_dir), before_step=exc.step)
    if mine is None:
        exc.add_note(f"trainmedic: no certified checkpoint before step {exc.step} to resume with {fallback}")
        raise exc
    from trainmedic.watcher.resume import use_micro_batches

    to_step = int(mine.name.rsplit("-", 1)[1])
    before = {k: int(getattr(trainer.args, k)) for k in fallback}
    use_micro_batches(trainer, fallback)
    if vitals.oom is not None:
        vitals.oom.split = 1  # the smaller micro-batch starts whole; it splits again if it must
    trainer.model.zero_grad(set_to_none=True)
    why = (
        f"{exc}: back to {mine.name} (certified), per-device batch {before['per_device_train_batch_size']}"
        f" -> {fallback['per_device_train_batch_size']}, gradient accumulation "
        f"{before['gradient_accumulation_steps']} -> {fallback['gradient_accumulation_steps']} "
        "(same effective batch)"
    )
    detail = {"to": str(mine), "to_step": to_step, "before": before, "after": dict(fallback)}
    vitals._act(Action(exc.step, "oom_fallback", why, detail))
    vitals.rewind(to_step)
    return str(mine)


def _from_rank_zero(value: Any) -> Any:
    """Rank 0's value on every rank (a no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _certify(trainer: Any, vitals: Vitals) -> None:
    """Certify checkpoints only after a clean window, and keep certified ones out of rotation."""
    from trainmedic.watcher.checkpoints import Certifier

    if any(isinstance(cb, Certifier) for cb in trainer.callback_handler.callbacks):
        return

    def report(step: int, path: Path, /, **fields: Any) -> None:
        if vitals.recorder is not None:
            vitals.recorder.checkpoint(step, path, **fields)

    certifier = Certifier(
        clean_steps=vitals.config.certify_after, keep_certified=vitals.config.keep_certified, report=report
    )
    trainer.add_callback(certifier)
    vitals.trouble_listeners.append(certifier.trouble)
    every = vitals.config.checkpoint_every
    if every is not None:
        from trainmedic.watcher.cadence import SaveCadence

        trainer.add_callback(SaveCadence(every))


def _preflight(trainer: Any, vitals: Vitals, batches: int, echo: Any) -> WatchResult | None:
    """Run the preflight; a failed one stops before training, with the reason and a postmortem."""
    from trainmedic.watcher.preflight import preflight as run_preflight

    check = run_preflight(trainer, batches=batches)
    from trainmedic.watcher.say import sayer

    say = sayer(echo)
    say(f"[trainmedic] {check.summary()}")
    if check.ok:
        return None
    if set(check.kinds) == {"memory"}:
        # a micro-batch that does not fit whole is what the OOM guard splits: warn and go on
        for event in check.events():
            vitals.events.append(replace(event, severity="warn"))
        say("[trainmedic] preflight: out of memory on a whole micro-batch; training goes on and splits it")
        return None
    for event in check.events():
        vitals.events.append(event)
        say(f"[trainmedic] preflight: {event.message}")
    reason = check.summary()
    pm = _postmortem(trainer, vitals, "stopped", reason, check.seconds, None)
    return WatchResult(
        status="stopped",
        reason=reason,
        steps=0,
        final_loss=None,
        events=list(vitals.events),
        postmortem_path=pm,
    )


def _postmortem(
    trainer: Any, vitals: Vitals, status: str, reason: str, elapsed: float, exc: BaseException | None
) -> Path | None:
    if not trainer.is_world_process_zero():
        return None
    from dataclasses import asdict

    from trainmedic.watcher.postmortem import write_postmortem
    from trainmedic.watcher.runlog import installed_versions

    return write_postmortem(
        Path(trainer.args.output_dir),
        status=status,
        reason=reason,
        last_vitals=asdict(vitals.last) if vitals.last is not None else None,
        events=[asdict(e) for e in vitals.events],
        actions=[asdict(a) for a in vitals.actions],
        config=vitals.config.to_dict(),
        versions=installed_versions(),
        elapsed_s=elapsed,
        exception=exc,
    )
