"""The toy base model: the tiny Llama, briefly pre-trained on stdlib docstrings, cached on disk.

A LoRA on a randomly initialised model barely moves its loss, so every fine-tuning test and demo
starts from this base instead. It is built once per machine (about 40 s on 2 cores) into
`$TRAINMEDIC_CACHE/toy-base-v<N>` (default `~/.cache/trainmedic`): built in a temporary sibling
directory, renamed into place, under a file lock, so a half-built directory is never used.
Bump CACHE_VERSION whenever the recipe below changes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from trainmedic.toy.corpus import Split

log = logging.getLogger(__name__)

CACHE_VERSION = 1
MARKER = "build.json"  # written last, inside the directory before the rename: its presence means complete

# The recipe (nanoGPT-style): AdamW, linear warm-up, cosine decay to 10 %, fixed seed.
SEED = 0
STEPS = 300
BATCH = 16
SEQ_LEN = 128
LR = 3e-3
WARMUP = 30
MIN_LR_FRACTION = 0.1
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0


def cache_root() -> Path:
    """Where cached toy artifacts live: `$TRAINMEDIC_CACHE`, else `~/.cache/trainmedic`."""
    env = os.environ.get("TRAINMEDIC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "trainmedic"


def toy_base(cache_dir: Path | None = None, say: Callable[[str], None] | None = None) -> Path:
    """The directory of the pre-trained toy base (tokenizer + model), built on first use.

    `say` hears what takes time: a wait for another process that is building it, and the build's
    progress (default: this module's logger at WARNING)."""
    root = cache_root() if cache_dir is None else Path(cache_dir)
    tell = say if say is not None else log.warning
    return ensure_built(
        root / f"toy-base-v{CACHE_VERSION}", lambda out: pretrain_base(out, say=tell), say=tell
    )


def load_base(path: Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) from a toy base directory (default: the cached one), fully offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = toy_base() if path is None else Path(path)
    missing = [f for f in ("config.json", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path}: no {' or '.join(missing)}; "
            "expected a directory written by toy_base() or save_pretrained()"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype="float32"
    )
    return model, tokenizer


def build_info(path: Path) -> dict[str, Any]:
    """The build record of a toy base directory (seconds, steps, losses, versions)."""
    info: dict[str, Any] = json.loads((path / MARKER).read_text(encoding="utf-8"))
    return info


# ---------------------------------------------------------------------------- the cache


def is_complete(path: Path) -> bool:
    try:
        return build_info(path).get("cache_version") == CACHE_VERSION
    except (OSError, ValueError, AttributeError):
        return False


LOCK_REPORT_EVERY_S = 30.0


@contextlib.contextmanager
def _file_lock(path: Path, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """An exclusive `flock` on `path`; the holder writes who it is into the file, so a process that
    has to wait can say whom it waits for (the kernel drops the lock when its holder dies)."""
    import fcntl
    import socket

    with path.open("a+") as fh:
        waited = 0.0
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if say is not None and waited % LOCK_REPORT_EVERY_S == 0:
                    fh.seek(0)
                    holder = fh.read(200).strip() or "another process"
                    how_long = f" ({waited:.0f} s so far)" if waited else ""
                    say(f"waiting for {path.name}, held by {holder}: it is building the same thing{how_long}")
                time.sleep(0.5)
                waited += 0.5
        if waited and say is not None:
            say(f"{path.name} released after {waited:.0f} s")
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_built(
    target: Path, build: Callable[[Path], dict[str, Any]], say: Callable[[str], None] | None = None
) -> Path:
    """Return `target` once complete, running `build(tmp_dir) -> info` at most once across processes.

    `build` fills a fresh temporary sibling directory; its info becomes the marker file and the
    directory is renamed into place. Leftovers of an interrupted build are removed, never used.
    `say` hears about a wait for another process that holds the build lock.
    """
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_name(target.name + ".lock"), say):
        if is_complete(target):  # built by another process while we waited for the lock
            return target
        _remove_leftovers(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            info = {"cache_version": CACHE_VERSION, **build(tmp)}
            (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _remove_leftovers(target: Path) -> None:
    """Under the lock nobody else is building, so any temporary sibling is from a dead build."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():  # incomplete or from another cache version: move aside, then delete
        trash = target.with_name(f".{target.name}.tmp-stale-{os.getpid()}")
        os.rename(target, trash)
        shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------- the pre-training


def token_stream(tokenizer: PreTrainedTokenizerBase, split: Split) -> torch.Tensor:
    """All documents of a corpus split as one id stream, each followed by EOS."""
    import torch

    from trainmedic.toy.corpus import corpus_texts

    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(corpus_texts(split)):
        ids.extend(enc.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def heldout_loss(model: torch.nn.Module, stream: torch.Tensor, seq_len: int = SEQ_LEN) -> float:
    """Mean next-token loss over consecutive windows of `stream` (deterministic, no sampling)."""
    import torch

    windows = stream[: (len(stream) // seq_len) * seq_len].view(-1, seq_len)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(32):
            out = model(input_ids=chunk, labels=chunk)
            n = chunk.numel() - chunk.shape[0]  # predicted tokens: all but the first per window
            total += float(out.loss) * n
            count += n
    model.train(was_training)
    return total / count


def lr_at(step: int, steps: int = STEPS, peak: float = LR, warmup: int = WARMUP) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


PROGRESS_EVERY = 50


def pretrain(
    model: torch.nn.Module,
    stream: torch.Tensor,
    steps: int = STEPS,
    seed: int = SEED,
    say: Callable[[str], None] | None = None,
) -> list[float]:
    """Train on random windows of `stream`; return the per-step training losses. `say` hears a
    progress line every PROGRESS_EVERY steps."""
    import torch

    started = time.perf_counter()

    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms: weight decay would shrink them to 0
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=BETAS,
    )
    model.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps)
        starts = torch.randint(len(stream) - SEQ_LEN, (BATCH,), generator=gen)
        batch = torch.stack([stream[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        losses.append(loss.item())
        if say is not None and (step + 1) % PROGRESS_EVERY == 0:
            elapsed = time.perf_counter() - started
            left = elapsed / (step + 1) * (steps - step - 1)
            done = f"{elapsed:.0f} s, ~{left:.0f} s left"
            say(f"pre-training step {step + 1}/{steps}, loss {losses[-1]:.3f} ({done})")
    return losses


def pretrain_base(out: Path, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the tokenizer and the pre-trained model into `out`; return the build record. `say`
    hears that the build starts and how it progresses (default: this module's logger)."""
    import torch

    tell = say if say is not None else log.warning
    tell(f"building the toy base model once into {out.parent} ({STEPS} pre-training steps, 1-3 minutes)")
    started = time.perf_counter()
    threads = torch.get_num_threads()
    # batches of 16 x 128 tokens keep every core busy (about 1.7x faster on 2 than on 1), even
    # when the caller asked for one thread for the small fine-tunes that follow
    torch.set_num_threads(max(threads, _cores()))
    try:
        return _pretrain_into(out, tell, started)
    finally:
        torch.set_num_threads(threads)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _pretrain_into(out: Path, tell: Callable[[str], None], started: float) -> dict[str, Any]:
    import tokenizers
    import torch
    import transformers

    from trainmedic.toy.model import build_model
    from trainmedic.toy.tokenizer import toy_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        tokenizer = toy_tokenizer()
        model = build_model(tokenizer, seed=SEED)
        train_ids, heldout_ids = token_stream(tokenizer, "train"), token_stream(tokenizer, "heldout")
        initial = heldout_loss(model, heldout_ids)
        losses = pretrain(model, train_ids, say=tell)
        final = heldout_loss(model, heldout_ids)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tail = losses[-20:]
    return {
        "build_seconds": round(time.perf_counter() - started, 2),
        "steps": len(losses),
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "peak_lr": LR,
        "seed": SEED,
        "train_tokens": len(train_ids),
        "heldout_tokens": len(heldout_ids),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "ln_vocab": math.log(len(tokenizer)),
        "heldout_loss_initial": initial,
        "train_loss_final": sum(tail) / len(tail),
        "heldout_loss_final": final,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
