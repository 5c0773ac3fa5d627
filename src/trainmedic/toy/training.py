"""Trainers on the toy base that are safe and quick on a small CPU: one call, a real run.

Each helper returns an un-started trainer (call `.train()`), so tests can add callbacks, wrap
methods or inject faults first. Everything a real GPU recipe would turn on and a CPU cannot
use (bf16, gradient checkpointing, dataloader workers, reporters, checkpoints) is off; any
keyword not named below goes to the training arguments and wins over these defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments
    from trl import DPOTrainer, SFTTrainer

# At these rates a 60-step run on the toy data drops its loss by about 2 nats (LoRA r=8 on q/k/v/o:
# 6.2 -> 4.1) and a DPO run leaves ln 2 within ten steps; 10x the LoRA rate diverges. Full
# fine-tuning moves every weight and needs a smaller rate.
LORA_LR = 5e-3
FULL_LR = 1e-3
DPO_LORA_LR = 1e-3
DPO_FULL_LR = 1e-4
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _defaults(output_dir: str | Path, steps: int, lr: float, seed: int, batch_size: int) -> dict[str, Any]:
    return {
        "output_dir": str(output_dir),
        "max_steps": steps,
        "learning_rate": lr,
        "per_device_train_batch_size": batch_size,
        # Constant after a short warm-up: a fault injected at step k meets the same rate wherever k is.
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": min(5, max(steps // 10, 0)),
        "seed": seed,
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "activation_checkpointing": False,  # the v5 name; TRL's configs default the old one to True
        "torch_compile": False,
        "report_to": "none",
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
    }


def _merge(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = {**defaults, **overrides}
    # The two checkpointing names are aliases: an override of either one sets both.
    if "gradient_checkpointing" in overrides and "activation_checkpointing" not in overrides:
        merged["activation_checkpointing"] = overrides["gradient_checkpointing"]
    elif "activation_checkpointing" in overrides and "gradient_checkpointing" not in overrides:
        merged["gradient_checkpointing"] = overrides["activation_checkpointing"]
    return merged


def _quiet(trainer: Any) -> Any:
    """Drop the stdout printer `disable_tqdm` installs; the logs stay in `trainer.state.log_history`."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def toy_args(output_dir: str | Path, **overrides: Any) -> TrainingArguments:
    """CPU-safe `TrainingArguments` for the toy model; `overrides` win."""
    from transformers import TrainingArguments

    base = _defaults(output_dir, steps=60, lr=LORA_LR, seed=0, batch_size=8)
    return TrainingArguments(**_merge(base, overrides))


def lora_config(r: int = 8) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"
    )


def _base(base: Path | None, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import set_seed

    from trainmedic.toy.base import load_base

    set_seed(seed)  # the Trainer seeds too, but LoRA weights are initialised before it exists
    return load_base(base)


def toy_trainer(
    output_dir: str | Path,
    *,
    lora: bool = True,
    steps: int = 60,
    lr: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    seq_len: int = 64,
    base: Path | None = None,
    train_dataset: Dataset | None = None,
    eval_dataset: Dataset | None = None,
    callbacks: list[Any] | None = None,
    **overrides: Any,
) -> Trainer:
    """A causal-LM `Trainer` on the toy base: LoRA (r=8 on q/k/v/o) or full fine-tuning."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    from trainmedic.toy.data import lm_dataset

    lr = (LORA_LR if lora else FULL_LR) if lr is None else lr
    args = TrainingArguments(**_merge(_defaults(output_dir, steps, lr, seed, batch_size), overrides))
    model, tokenizer = _base(base, seed)
    if lora:
        model = get_peft_model(model, lora_config())  # type: ignore[assignment]
    if train_dataset is None:
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        train_dataset = lm_dataset(tokenizer, n=min(steps * per_step, 1024), seq_len=seq_len, seed=seed)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    return _quiet(trainer)


def toy_sft_trainer(
    output_dir: str | Path,
    *,
    lora: bool = True,
    steps: int = 20,
    lr: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    n_examples: int = 128,
    base: Path | None = None,
    train_dataset: Dataset | None = None,
    callbacks: list[Any] | None = None,
    **overrides: Any,
) -> SFTTrainer:
    """TRL `SFTTrainer` on prompt/completion data; the loss covers the completion only."""
    from trl import SFTConfig, SFTTrainer

    from trainmedic.toy.data import prompt_completion_dataset

    lr = (LORA_LR if lora else FULL_LR) if lr is None else lr
    sft = {"completion_only_loss": True, "max_length": 128, "packing": False}
    args = SFTConfig(**_merge({**_defaults(output_dir, steps, lr, seed, batch_size), **sft}, overrides))
    model, tokenizer = _base(base, seed)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=prompt_completion_dataset(n_examples, seed) if train_dataset is None else train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config() if lora else None,
        callbacks=callbacks,
    )
    return _quiet(trainer)


def toy_dpo_trainer(
    output_dir: str | Path,
    *,
    lora: bool = True,
    steps: int = 20,
    lr: float | None = None,
    beta: float = 0.1,
    seed: int = 0,
    batch_size: int = 8,
    n_examples: int = 128,
    base: Path | None = None,
    train_dataset: Dataset | None = None,
    callbacks: list[Any] | None = None,
    **overrides: Any,
) -> DPOTrainer:
    """TRL `DPOTrainer` on prompt/chosen/rejected data.

    The reference is left to TRL: with LoRA it is the same model with the adapter disabled; in full
    fine-tuning TRL loads a second copy of the base from its directory.
    """
    from trl import DPOConfig, DPOTrainer

    from trainmedic.toy.data import preference_dataset

    lr = (DPO_LORA_LR if lora else DPO_FULL_LR) if lr is None else lr
    dpo = {"beta": beta, "max_length": 128}
    args = DPOConfig(**_merge({**_defaults(output_dir, steps, lr, seed, batch_size), **dpo}, overrides))
    model, tokenizer = _base(base, seed)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=preference_dataset(n_examples, seed) if train_dataset is None else train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config() if lora else None,
        callbacks=callbacks,
    )
    return _quiet(trainer)
