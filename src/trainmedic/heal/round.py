"""`heal_round`: one watched LoRA round on kept examples, anchored to the original model.

Read top to bottom, the recipe is: check every input (numbers, data, base, history, layers),
tokenize with exact completion masks, stack the history adapters (frozen) under a fresh one,
train it under `watch` with `loss = nll + lam * relu(D - tau)`, save the new adapter, check the
round's expectations. Everything that can be wrong with the input raises `HealError` before the
first training step.

Stacking rounds (the recipe the docs show): round k passes the adapters of rounds 1..k-1 as
`history`; the reference stays the original base, so drift is bounded across rounds, not
re-anchored at each one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainmedic.findings import Finding, Verdict, finite_or_none
from trainmedic.heal.adapters import ROUND_FILE
from trainmedic.heal.data import Example, from_records, read_kept
from trainmedic.heal.errors import HealError
from trainmedic.heal.expectations import check, heal_nll
from trainmedic.heal.loss import DIVERGENCES, Divergence

if TYPE_CHECKING:
    from trainmedic.heal.adapters import HistoryAdapter
    from trainmedic.heal.expectations import StepRow
    from trainmedic.heal.tokens import Encoded
    from trainmedic.watcher import WatchConfig, WatchResult

# Defaults, and why. The toy numbers are in bench/README.md ("heal: divergence barriers").
DIVERGENCE: Divergence = "kl_rev"  # mode-seeking: resists what the original finds implausible
LAM = 1.0  # one nat of excess KL per token costs as much as one nat of NLL
TAU = 0.1  # nats/token of KL allowed for free; small enough that the barrier acts within a round
EPOCHS = 3.0  # kept sets are small; three passes is TRL's default for SFT
RANK = 8
LR = 2e-4  # the common LoRA rate (QLoRA, TRL examples); tiny models want more (the toy demo uses 5e-3)
MAX_LEN = 512
BATCH_SIZE = 8
MIN_TRAIN = 8  # fewer kept examples than this: the filter upstream starved the round
GRAD_CLIP = 1.0  # on the adapter's parameters (watch applies it, after its own ZClip)
TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RoundConfig:
    """Every knob of a round. `validate()` names the flag of the first bad value."""

    divergence: Divergence = DIVERGENCE
    lam: float = LAM
    tau: float = TAU
    epochs: float = EPOCHS
    rank: int = RANK
    alpha: int | None = None  # None: 2 * rank, PEFT's common choice (scale 2)
    layers: tuple[int, int] | None = None  # [start, end) decoder layers; None: all
    targets: tuple[str, ...] = TARGETS
    lr: float = LR
    max_len: int = MAX_LEN
    batch_size: int = BATCH_SIZE
    min_train: int = MIN_TRAIN
    seed: int = 0

    def validate(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise HealError(f"--divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        for name in ("lam", "tau", "lr", "epochs"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise HealError(f"--{name} must be a positive number, got {value!r}")
        if self.alpha is not None and not (isinstance(self.alpha, int) and self.alpha > 0):
            raise HealError(f"--alpha must be a positive integer, got {self.alpha!r}")
        for name, low in (("rank", 1), ("batch_size", 1), ("min_train", 1), ("max_len", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise HealError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if not self.targets:
            raise HealError("targets must name at least one module (e.g. q_proj)")
        pair = self.layers
        if pair is not None and not (
            isinstance(pair, tuple | list) and len(pair) == 2 and all(type(x) is int for x in pair)
        ):
            raise HealError(f"--layers must be START:END, two integers, got {pair!r}")

    @property
    def lora_alpha(self) -> int:
        return 2 * self.rank if self.alpha is None else self.alpha


@dataclass
class HealResult:
    """A finished round: where its adapter is, its step table, and its checked expectations."""

    out: Path
    config: RoundConfig
    rows: list[StepRow]
    expectations: list[Finding]
    watch: WatchResult
    examples: int  # examples trained on
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    base_fingerprint: str = ""

    @property
    def heal_nll(self) -> float | None:
        return heal_nll(self.rows)

    @property
    def ok(self) -> bool:
        return not any(f.verdict in (Verdict.FAIL, Verdict.ERROR) for f in self.expectations)

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON (no NaN): non-finite numbers become null."""
        return {
            "schema_version": SCHEMA_VERSION,
            "out": str(self.out),
            "config": asdict(self.config),
            "base_fingerprint": self.base_fingerprint,
            "examples": self.examples,
            "heal_nll": finite_or_none(self.heal_nll),
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "watch": {"status": self.watch.status, "reason": self.watch.reason, "steps": self.watch.steps},
            "notes": self.notes,
            "expectations": [
                {"name": f.name, "verdict": f.verdict.value, "message": f.message, "evidence": f.evidence}
                for f in self.expectations
            ],
            "steps": [
                {k: finite_or_none(v) if isinstance(v, float) else v for k, v in asdict(r).items()}
                for r in self.rows
            ],
        }


def heal_round(
    base: str | Path,
    data: str | Path | Sequence[Mapping[str, Any]],
    out: str | Path,
    *,
    history: Sequence[str | Path] = (),
    config: RoundConfig | None = None,
    watch_config: WatchConfig | str | None = None,
    echo: Callable[[str], None] | None = None,
    **knobs: Any,
) -> HealResult:
    """Train one heal round and save its adapter to `out`; `knobs` override `RoundConfig` fields.

    `data` is a kept.jsonl path or records shaped like its lines. Raises `HealError` for bad input
    (before training); a crash inside training is re-raised after watch's postmortem.
    """
    started = time.perf_counter()
    try:
        cfg = RoundConfig(**{**asdict(config or RoundConfig()), **knobs})
    except TypeError as exc:
        raise HealError(f"unknown round setting: {exc}") from None
    cfg.validate()
    watch_config = _watch_config(watch_config)
    base, out = Path(base), Path(out)
    prepared = _prepare(cfg, base, out, data, [Path(h) for h in history])
    trainer, vitals = _trainer(cfg, prepared, out, watch_config, echo)

    from trainmedic.heal.adapters import NEW
    from trainmedic.watcher import watch

    result = watch(trainer, vitals=vitals, echo=echo)
    trainer.model.save_pretrained(str(out), selected_adapters=[NEW])
    rows = [trainer.rows[s] for s in sorted(trainer.rows)]
    found = [_watched(result), *check(rows, cfg.divergence, cfg.tau)]
    heal = HealResult(
        out=out,
        config=cfg,
        rows=rows,
        expectations=found,
        watch=result,
        examples=len(prepared.encoded.rows),
        notes=prepared.encoded.notes(),
        seconds=time.perf_counter() - started,
        base_fingerprint=prepared.fingerprint,
    )
    from trainmedic.fsutil import atomic_write

    record = heal.to_dict() | {"base": str(base), "history": [str(h.path) for h in prepared.history]}
    atomic_write(out / ROUND_FILE, json.dumps(record, indent=2, allow_nan=False) + "\n")
    return heal


@dataclass
class _Prepared:
    """Everything a round needs, each piece checked: the loaded base, its fingerprint, the
    checked history adapters and the tokenized data."""

    model: Any
    tokenizer: Any
    fingerprint: str
    history: list[HistoryAdapter]
    encoded: Encoded


def _prepare(cfg: RoundConfig, base: Path, out: Path, data: Any, history: list[Path]) -> _Prepared:
    """Check every input, cheapest first; `HealError` names what to fix. Nothing is trained here."""
    from trainmedic.heal.adapters import base_fingerprint, check_history
    from trainmedic.heal.tokens import encode

    _check_paths(base, out, history)
    examples = _examples(data)
    model, tokenizer = _load(base)
    _check_model_fit(cfg, model)
    fingerprint = base_fingerprint(base)
    checked = check_history(history, model, base, fingerprint)
    source = str(data) if isinstance(data, str | Path) else "data"
    encoded = encode(examples, tokenizer, cfg.max_len, source=source)
    if len(encoded.rows) < cfg.min_train:
        skipped = len(encoded.empty_after_truncation)
        raise HealError(
            f"the filter starved the data: {len(encoded.rows)} usable kept example(s)"
            f"{f' ({skipped} skipped as empty after truncation)' if skipped else ''}, fewer than "
            f"--min-train {cfg.min_train}; fix upstream, do not train",
            path=source,
        )
    return _Prepared(model, tokenizer, fingerprint, checked, encoded)


def _check_paths(base: Path, out: Path, history: list[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise HealError("exists and is not a directory; --out takes a new directory", path=out)
    if not base.is_dir() or not (base / "config.json").is_file():
        raise HealError(
            "not a model directory (no config.json); --base takes a local model directory", path=base
        )
    if (out / "adapter_model.safetensors").exists():
        raise HealError("already holds an adapter; give each round a new --out directory", path=out)
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held:  # a round writes README.md, logs/, adapter files: nothing of the user's may be replaced
        shown = ", ".join(held[:3]) + (" ..." if len(held) > 3 else "")
        raise HealError(f"is not empty ({shown}); --out takes a new or empty directory", path=out)
    for h in history:
        if h.resolve() == out.resolve():
            raise HealError(
                "--out is also given as --history; a round cannot overwrite its own history", path=h
            )


def _watch_config(value: WatchConfig | str | None) -> WatchConfig | None:
    """A preset name becomes its config now, so a typo fails before the model is loaded."""
    if not isinstance(value, str):
        return value
    from trainmedic.watcher.config import WatchConfig, WatchConfigError

    try:
        return WatchConfig.preset(value)
    except WatchConfigError as exc:
        raise HealError(f"--watch: {exc}") from None


def _examples(data: str | Path | Sequence[Mapping[str, Any]]) -> list[Example]:
    if isinstance(data, str | Path):
        return read_kept(data)
    return from_records(data)


def _load(base: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype="float32")
    except (OSError, ValueError) as exc:
        raise HealError(f"cannot load the base model: {exc}", path=base) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of loss and attention
    return model, tokenizer


def _check_model_fit(cfg: RoundConfig, model: Any) -> None:
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if cfg.layers is not None:
        start, end = cfg.layers
        if n_layers is None:
            raise HealError("--layers: the base's config does not say how many layers it has")
        if not 0 <= start < end <= n_layers:
            raise HealError(
                f"--layers {start}:{end} is outside the model: it has {n_layers} decoder layers, "
                f"so START:END must satisfy 0 <= START < END <= {n_layers}"
            )
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.targets if t not in names]
    if missing:
        raise HealError(f"target module(s) {', '.join(missing)} not found in the base model")
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.max_len > limit:
        raise HealError(f"--max-len {cfg.max_len} exceeds the model's {limit} positions")


def _trainer(
    cfg: RoundConfig,
    prepared: _Prepared,
    out: Path,
    watch_config: WatchConfig | None,
    echo: Callable[[str], None] | None,
) -> tuple[Any, Any]:
    """The round's HealTrainer (AdamW, clip 1.0, constant rate after a 10 % warm-up, no checkpoints:
    a round is short, and its one artifact is the adapter saved at the end) and its watcher."""
    import torch
    from peft import LoraConfig
    from transformers import TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback

    from trainmedic.heal.adapters import attach
    from trainmedic.heal.tokens import Collator
    from trainmedic.heal.trainer import HealTrainer, StepTable
    from trainmedic.watcher import Vitals

    set_seed(cfg.seed)  # LoRA's A matrices are drawn now, before the Trainer seeds
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,  # dropout would make the reference pass and the trained pass disagree
        target_modules=list(cfg.targets),
        layers_to_transform=list(range(*cfg.layers)) if cfg.layers else None,
        task_type="CAUSAL_LM",
    )
    peft_model, frozen = attach(prepared.model, lora, prepared.history)
    rows = prepared.encoded.rows
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr,
        weight_decay=cfg.lam if cfg.divergence == "wd" else 0.0,
        max_grad_norm=GRAD_CLIP,
        optim="adamw_torch",
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=max(1, math.ceil(0.1 * steps_per_epoch * cfg.epochs)),
        seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    trainer = HealTrainer(
        model=peft_model,
        args=args,
        train_dataset=rows,
        data_collator=Collator(prepared.tokenizer.pad_token_id),
        processing_class=prepared.tokenizer,
        divergence=cfg.divergence,
        lam=cfg.lam,
        tau=cfg.tau,
        frozen=frozen,
    )
    trainer.remove_callback(PrinterCallback)
    vitals = Vitals(watch_config, echo=echo)
    trainer.add_callback(StepTable(trainer, vitals))
    return trainer, vitals


def _watched(result: WatchResult) -> Finding:
    verdict = Verdict.PASS if result.ok else Verdict.FAIL
    return Finding(name="watch", kind="heal", verdict=verdict, message=result.summary())
