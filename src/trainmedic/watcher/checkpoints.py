"""Certified checkpoints, and rotation that never deletes the last healthy one.

The Trainer resumes from the highest-numbered `checkpoint-N`, and `save_total_limit` deletes the
oldest: once a run goes bad, only bad checkpoints are left. Here `checkpoint-N` is PENDING once
it is complete (all `Trainer._save_checkpoint` writes, readable) with finite weights, and
CERTIFIED once the steps N+1..N+K ran clean; `checkpoint-N/trainmedic-certified.json` is then
written atomically and `newest_certified` may pick it.

`Certifier` takes over `save_total_limit` (None at train start, the user's value back at the
end) because the Trainer rotates inside `_save_checkpoint`, before any callback could object;
nothing is wrapped or forked. It keeps the newest `keep_certified` certified checkpoints, every
pending one (else a window spanning several saves would never certify anything), the newest
and the best (`best_model_checkpoint`); of the uncertified rest, the user's limit. Without a
user limit nothing is deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from transformers import TrainerCallback

import trainmedic
from trainmedic.fsutil import atomic_write
from trainmedic.record.errors import ReadError
from trainmedic.record.hf import CHECKPOINT_RE, checkpoints
from trainmedic.record.safetensors import LazyTensors, read_safetensors
from trainmedic.run import AdapterWeights

logger = logging.getLogger("trainmedic")

MARKER = "trainmedic-certified.json"
SCHEMA_VERSION = 1
STATE_NAME = "trainer_state.json"
WEIGHTS = ("adapter_model.safetensors", "model.safetensors")
WEIGHT_INDEXES = ("adapter_model.safetensors.index.json", "model.safetensors.index.json")
# Rules of the watcher's events that break a clean window (see `breaks_clean_window`).
TROUBLE_RULES = ("nonfinite", "loss_spike", "divergence", "grad_explosion")
# Bits that make a stored float non-finite: (dtype as unsigned ints, mask, value of x & mask).
_NONFINITE_BITS: dict[str, tuple[type[np.unsignedinteger[Any]], int, int]] = {
    "F64": (np.uint64, 0x7FF0000000000000, 0x7FF0000000000000),
    "F32": (np.uint32, 0x7F800000, 0x7F800000),
    "F16": (np.uint16, 0x7C00, 0x7C00),
    "BF16": (np.uint16, 0x7F80, 0x7F80),
    "F8_E5M2": (np.uint8, 0x7C, 0x7C),
    "F8_E4M3": (np.uint8, 0x7F, 0x7F),  # the fn variant: no infinities, NaN is S.1111.111
    "F8_E8M0": (np.uint8, 0xFF, 0xFF),
}
_CHUNK = 1 << 22  # values per finiteness test: bounded temporaries on multi-GB tensors


def breaks_clean_window(rule: str) -> bool:
    """Whether an event of this rule voids certifications: non-finite values, spikes, divergence
    and gradient explosions may damage weights; overfitting or a plateau does not."""
    return rule.startswith(TROUBLE_RULES)


class Reporter(Protocol):
    """Told about every change of a checkpoint's status (`RunLog.checkpoint` fits)."""

    def __call__(self, step: int, path: Path, /, **fields: Any) -> None: ...


@dataclass
class Inspection:
    """What one look at a checkpoint directory found."""

    problems: list[str] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)  # relative path -> size in bytes
    state_sha256: str | None = None
    tensors: int = 0  # floating-point tensors checked for finiteness
    values: int = 0
    nonfinite: list[str] = field(default_factory=list)  # "file:tensor" holding NaN or infinity

    @property
    def ok(self) -> bool:
        return not self.problems and not self.nonfinite

    def why_not(self) -> str:
        if self.problems:
            return "incomplete: " + "; ".join(self.problems)
        shown = ", ".join(self.nonfinite[:3]) + (" ..." if len(self.nonfinite) > 3 else "")
        return f"non-finite weights in {len(self.nonfinite)} tensor(s): {shown}"


def inspect_checkpoint(ckpt: Path, *, resume_state: bool = True, finite: bool = True) -> Inspection:
    """Check `ckpt` holds a complete save (and, with `finite`, that its weights are finite).

    Complete means what `Trainer._save_checkpoint` writes: `trainer_state.json` for this very
    step; safetensors weights (adapter or model, single or sharded) whose headers fit the file
    (a truncated file fails); and, with `resume_state` (False for `save_only_model`), the
    optimizer, the scheduler (DeepSpeed keeps both in its `global_step*` folder) and an RNG
    state. Every torch file present must be a whole zip archive.
    """
    found = Inspection()
    m = CHECKPOINT_RE.match(ckpt.name)
    if m is None or not ckpt.is_dir():
        found.problems.append(f"{ckpt} is not a checkpoint-N directory")
        return found
    found.files = _listing(ckpt)
    _check_state(ckpt, int(m.group(1)), found)
    weights = _weights(ckpt, found)
    names = set(found.files)
    if resume_state:
        top = {n for n in names if "/" not in n} | {n.split("/", 1)[0] for n in names if "/" in n}
        deepspeed = any(n.startswith("global_step") for n in top)
        if not deepspeed and not any(n.startswith("optimizer") or n.endswith("-optimizer.pt") for n in top):
            found.problems.append("no optimizer state (optimizer.pt)")
        if not deepspeed and "scheduler.pt" not in names:
            found.problems.append("no scheduler state (scheduler.pt)")
        if not any(n.startswith("rng_state") and n.endswith(".pth") for n in names):
            found.problems.append("no RNG state (rng_state*.pth)")
    for name in sorted(n for n in names if n.endswith((".pt", ".pth", ".bin")) and "/" not in n):
        if not zipfile.is_zipfile(ckpt / name):  # torch.save's zip: truncation loses its directory
            found.problems.append(f"{name} is not a complete torch archive (truncated?)")
    if finite and not found.problems:
        for shard in weights:
            _check_finite(shard, found)
    return found


def newest_certified(output_dir: str | os.PathLike[str], *, before_step: int | None = None) -> Path | None:
    """The newest certified, still complete `checkpoint-N` in `output_dir` (N < `before_step`).

    Everything is checked again when choosing: the marker (strict JSON, naming this very
    checkpoint), completeness, and that each file the certification listed still has its size
    and the trainer state its hash. A half-written or tampered directory is never returned.
    """
    for step, ckpt in checkpoints(Path(output_dir)):
        if before_step is not None and step >= before_step:
            continue
        if certificate_problem(ckpt) is None:
            return ckpt
    return None


def certificate_problem(ckpt: Path) -> str | None:
    """Why `ckpt` is not (or no longer) a valid certified checkpoint; None when it is one."""
    marker = _read_marker(ckpt)
    if isinstance(marker, str):
        return marker
    found = inspect_checkpoint(ckpt, resume_state=bool(marker.get("resume_state", True)), finite=False)
    if found.problems:
        return found.why_not()
    recorded = marker.get("files")
    if not isinstance(recorded, dict) or not recorded:
        return f"{MARKER} lists no files"
    changed = _changed(recorded, found.files)
    if changed:
        return f"changed since certification: {changed}"
    if marker.get("trainer_state_sha256") != found.state_sha256:
        return f"{STATE_NAME} changed since certification"
    return None


@dataclass
class _Pending:
    step: int
    path: Path
    window: tuple[int, int]
    inspection: Inspection
    resume_state: bool  # False under save_only_model: no optimizer, scheduler or RNG state


class Certifier(TrainerCallback):
    """Certifies checkpoints after `clean_steps` clean steps and rotates them in their place.

    Tell it about trouble with `trouble(step, why)`; hand it a `report` to hear about each
    checkpoint (status `pending`, `certified`, `rejected`, `voided`, `revoked`, `deleted`).
    Only the process that saves checkpoints (`args.should_save`) certifies and deletes.
    """

    def __init__(
        self, clean_steps: int = 10, keep_certified: int = 2, *, report: Reporter | None = None
    ) -> None:
        for name, value in (("clean_steps", clean_steps), ("keep_certified", keep_certified)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        self.clean_steps = clean_steps
        self.keep_certified = keep_certified
        self.report = report
        self.user_limit: int | None = None
        self.pending: dict[int, _Pending] = {}
        self.certified: dict[int, tuple[int, int]] = {}  # certified by this process: step -> window
        self._took_over = False
        self._output_dir: Path | None = None
        self._best: str | None = None
        self._writer = False

    # -- what the watcher calls ------------------------------------------------------------------
    def trouble(self, step: int, why: str) -> None:
        """Trouble at optimizer step `step`: void every certification whose window holds it."""
        for n, p in sorted(self.pending.items()):
            if p.window[0] <= step <= p.window[1]:
                del self.pending[n]
                self._tell(n, p.path, "voided", reason=f"step {step} of its window {list(p.window)}: {why}")
        for n, (a, b) in sorted(self.certified.items()):
            if a <= step <= b and (out := self._output_dir) is not None:
                self._revoke(out / f"checkpoint-{n}", f"step {step} of its window [{a}, {b}]: {why}")

    # -- Trainer moments -------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if not self._took_over:  # a second train() (rollback, resume) keeps the first value
            self.user_limit = args.save_total_limit
            self._took_over = True
        args.save_total_limit = None  # the Trainer must not rotate: this callback does
        self._output_dir = Path(args.output_dir)
        self._writer = bool(args.should_save)
        start = int(state.global_step)
        # Resuming at `start` abandons every later step: what was saved or certified after it
        # belongs to a timeline that is no longer the run's.
        self.pending = {n: p for n, p in self.pending.items() if n <= start}
        if self._writer:
            for n, ckpt in checkpoints(self._output_dir):
                if n > start and (ckpt / MARKER).exists():
                    self._revoke(ckpt, f"training restarted at step {start}; this step lies after it")
        return control

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.pending and self._writer:
            self._certify_due(int(state.global_step), state)
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if not args.should_save:
            return control
        self._output_dir = Path(args.output_dir)
        self._best = state.best_model_checkpoint
        step = int(state.global_step)
        self._certify_due(step, state, rotate=False)
        ckpt = self._output_dir / f"checkpoint-{step}"
        if not ckpt.is_dir():
            logger.warning("[trainmedic] checkpoint %s was not found after saving; not certified", ckpt)
            return control
        # A checkpoint saved again at a step already seen (after a rollback) is new weights.
        (ckpt / MARKER).unlink(missing_ok=True)
        self.certified.pop(step, None)
        resume_state = not args.save_only_model
        found = inspect_checkpoint(ckpt, resume_state=resume_state)
        if found.ok:
            window = (step + 1, step + self.clean_steps)
            self.pending[step] = _Pending(step, ckpt, window, found, resume_state)
            self._tell(step, ckpt, "pending", window=list(window))
        else:
            self._tell(step, ckpt, "rejected", reason=found.why_not())
        self._rotate()
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._writer:
            self._certify_due(int(state.global_step), state)
        if self._took_over:
            args.save_total_limit = self.user_limit
            self._took_over = False
        return control

    # -- certification ---------------------------------------------------------------------------
    def _certify_due(self, step: int, state: Any, *, rotate: bool = True) -> None:
        """Certify the pending checkpoints whose whole window has run (all of it reported)."""
        due = [p for p in self.pending.values() if p.window[1] <= step]
        for p in sorted(due, key=lambda p: p.step):
            del self.pending[p.step]
            again = inspect_checkpoint(p.path, resume_state=p.resume_state, finite=False)
            changed = _changed(p.inspection.files, again.files)
            if again.problems or changed or again.state_sha256 != p.inspection.state_sha256:
                why = again.why_not() if again.problems else f"changed since saved: {changed or STATE_NAME}"
                self._tell(p.step, p.path, "rejected", reason=why)
                continue
            atomic_write(p.path / MARKER, _marker(p, step))
            self.certified[p.step] = p.window
            self._tell(p.step, p.path, "certified", window=list(p.window), marker=str(p.path / MARKER))
        if due and rotate:
            self._best = getattr(state, "best_model_checkpoint", self._best)
            self._rotate()

    def _revoke(self, ckpt: Path, why: str) -> None:
        step = int(ckpt.name.rsplit("-", 1)[1])
        (ckpt / MARKER).unlink(missing_ok=True)
        self.certified.pop(step, None)
        self._tell(step, ckpt, "revoked", reason=why)

    # -- rotation --------------------------------------------------------------------------------
    def _rotate(self) -> None:
        limit, out = self.user_limit, self._output_dir
        if limit is None or limit <= 0 or out is None:
            return
        ckpts = checkpoints(out)  # newest first
        certified = [n for n, c in ckpts if n in self.certified or certificate_problem(c) is None]
        keep = set(certified[: self.keep_certified]) | set(self.pending)
        if ckpts:
            keep.add(ckpts[0][0])  # the newest, as the Trainer keeps it for resuming
        if self._best is not None:
            best = Path(self._best)
            keep.update(n for n, c in ckpts if c == best or c.resolve() == best.resolve())
        uncertified = [n for n, _ in ckpts if n not in certified]
        excess = len(uncertified) - limit
        doomed = [n for n in certified[self.keep_certified :] if n not in keep]
        for n in reversed(uncertified):  # oldest first
            if excess <= 0:
                break
            if n not in keep:
                doomed.append(n)
                excess -= 1
        for n in doomed:
            ckpt = out / f"checkpoint-{n}"
            (ckpt / MARKER).unlink(missing_ok=True)  # never a marker on a half-deleted directory
            shutil.rmtree(ckpt, ignore_errors=True)
            self.certified.pop(n, None)
            self._tell(n, ckpt, "deleted", reason=f"rotation (save_total_limit={limit})")

    def _tell(self, step: int, path: Path, status: str, **fields: Any) -> None:
        if status in ("rejected", "voided", "revoked"):
            logger.warning("[trainmedic] checkpoint-%d %s: %s", step, status, fields.get("reason"))
        if self.report is not None:
            self.report(step, path, certified=status == "certified", status=status, **fields)


# -- helpers ---------------------------------------------------------------------------------------
def _listing(ckpt: Path) -> dict[str, int]:
    """Regular files under `ckpt` and their sizes; trainmedic's own files and temp files excluded."""
    files: dict[str, int] = {}
    for path in ckpt.rglob("*"):
        rel = path.relative_to(ckpt)
        if not any(part.startswith((".", "trainmedic")) for part in rel.parts):
            with contextlib.suppress(OSError):  # gone meanwhile: then it is simply not listed
                if path.is_file():
                    files[rel.as_posix()] = path.stat().st_size
    return files


def _check_state(ckpt: Path, step: int, found: Inspection) -> None:
    if STATE_NAME not in found.files:
        found.problems.append(f"no {STATE_NAME}")
        return
    try:
        data = (ckpt / STATE_NAME).read_bytes()
        state = json.loads(data)  # the Trainer writes bare NaN literals: json accepts them
    except (OSError, ValueError, RecursionError) as exc:
        found.problems.append(f"{STATE_NAME} cannot be read ({type(exc).__name__}: {exc})")
        return
    got = state.get("global_step") if isinstance(state, dict) else None
    if got != step:
        found.problems.append(f"{STATE_NAME} is for step {got!r}, not {step}")
        return
    found.state_sha256 = hashlib.sha256(data).hexdigest()


def _weights(ckpt: Path, found: Inspection) -> list[AdapterWeights]:
    """The safetensors files holding the weights, each with a header that fits its file."""
    shards: list[Path] = []
    weights: list[AdapterWeights] = []
    for index in WEIGHT_INDEXES:
        if index in found.files:
            try:
                weight_map = json.loads((ckpt / index).read_bytes()).get("weight_map")
                shards += [ckpt / s for s in sorted(set(weight_map.values()))]
            except (OSError, ValueError, AttributeError, TypeError) as exc:
                found.problems.append(f"{index} cannot be read ({type(exc).__name__})")
    shards += [ckpt / w for w in WEIGHTS if w in found.files]
    if not shards and not found.problems:
        found.problems.append(f"no safetensors weights ({', '.join(WEIGHTS + WEIGHT_INDEXES)})")
    if any(s.name.startswith("adapter_model") for s in shards) and "adapter_config.json" not in found.files:
        found.problems.append("adapter weights without adapter_config.json")
    for shard in shards:
        try:
            weights.append(read_safetensors(shard))
        except ReadError as exc:
            found.problems.append(f"{Path(exc.path).name}: {exc.message}")
    return weights


def _check_finite(weights: AdapterWeights, found: Inspection) -> None:
    """Find every tensor holding a NaN or an infinity, by its exponent bits (no float copies)."""
    arrays = weights.arrays
    for name, info in weights.header.items():
        if info.dtype not in _NONFINITE_BITS:
            continue
        uint, mask, value = _NONFINITE_BITS[info.dtype]
        try:
            raw = arrays.raw(name) if isinstance(arrays, LazyTensors) else np.asarray(arrays[name])
        except ReadError as exc:
            found.problems.append(f"{weights.source.name}: {exc.message}")
            return
        flat = np.ascontiguousarray(raw).reshape(-1).view(uint)
        found.tensors += 1
        found.values += flat.size
        if any(np.any(flat[i : i + _CHUNK] & uint(mask) == uint(value)) for i in range(0, flat.size, _CHUNK)):
            found.nonfinite.append(f"{weights.source.name}:{name}")


def _changed(recorded: dict[str, Any], now: dict[str, int]) -> str:
    """The recorded files that are gone or have another size now ('' when none)."""
    names = sorted(n for n, size in recorded.items() if now.get(n) != size)
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def _marker(p: _Pending, certified_at: int) -> str:
    found = p.inspection
    payload = {
        "schema_version": SCHEMA_VERSION,
        "writer": "trainmedic",
        "version": trainmedic.__version__,
        "step": p.step,
        "checkpoint": p.path.name,
        "status": "certified",
        "clean_window": list(p.window),
        "clean_steps": p.window[1] - p.window[0] + 1,
        "certified_at_step": certified_at,
        "resume_state": p.resume_state,
        "files": found.files,
        "trainer_state_sha256": found.state_sha256,
        "finite": {"checked_tensors": found.tensors, "checked_values": found.values, "nonfinite": []},
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return json.dumps(payload, indent=1, allow_nan=False) + "\n"


def _read_marker(ckpt: Path) -> dict[str, Any] | str:
    """The certification marker of `ckpt`, or why there is no valid one."""
    try:
        marker = json.loads((ckpt / MARKER).read_bytes(), parse_constant=_reject_constant)
    except FileNotFoundError:
        return "not certified"
    except (OSError, ValueError, RecursionError) as exc:
        return f"{MARKER} cannot be read ({type(exc).__name__}: {exc})"
    if not isinstance(marker, dict) or marker.get("schema_version") != SCHEMA_VERSION:
        return f"{MARKER} is not a certification this version understands"
    step = int(ckpt.name.rsplit("-", 1)[1])
    if (marker.get("status"), marker.get("checkpoint"), marker.get("step")) != ("certified", ckpt.name, step):
        return f"{MARKER} does not certify {ckpt.name} (copied from another checkpoint?)"
    return marker


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not strict JSON")
