"""The round's model: the base, the earlier rounds' adapters (applied, frozen) and one new adapter.

The reference for the divergence barrier is the ORIGINAL model, every adapter off, history
included, so the barrier resists the drift of all rounds together rather than only this one's.
It is the same module with PEFT's `disable_adapter()`, not a second copy of the weights.

History adapters are checked against the base before anything is loaded: one trained on another
base or with tensors that contradict its own config would otherwise load with a size-mismatch
traceback deep inside PEFT, or worse, load and quietly mean something else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from trainmedic.heal.errors import HealError

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel

NEW = "default"  # the round's own adapter: PEFT saves the "default" adapter at the top of a directory
ROUND_FILE = "trainmedic-heal.json"  # each round's record beside its adapter: settings, fingerprint, steps
FINGERPRINT_BYTES = 1 << 20  # of each weights file: enough to tell two trainings of one architecture apart
_LORA = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_VOLATILE_CONFIG_KEYS = ("transformers_version", "architectures", "dtype", "torch_dtype")


def base_fingerprint(base: Path) -> str:
    """A short digest of a base model directory: its config and the start of each weights file.

    Two bases with the same architecture but different weights differ here; re-saving the same
    model with another library version does not (volatile config keys are left out).
    """
    digest = hashlib.sha256()
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    stable = {k: v for k, v in config.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(stable, sort_keys=True).encode())
    for weights in sorted([*base.glob("*.safetensors"), *base.glob("*.bin")]):
        digest.update(weights.name.encode())
        digest.update(str(weights.stat().st_size).encode())
        with weights.open("rb") as fh:
            digest.update(fh.read(FINGERPRINT_BYTES))
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class HistoryAdapter:
    """A checked history adapter: where it is, its rank and how many LoRA pairs it holds."""

    path: Path
    rank: int
    pairs: int


def check_history(
    paths: Sequence[Path], model: PreTrainedModel, base: Path, fingerprint: str
) -> list[HistoryAdapter]:
    """Check each history adapter against the loaded base; `HealError` names the file at fault."""
    seen: set[Path] = set()
    for p in paths:
        if Path(p).resolve() in seen:
            raise HealError("is given twice as --history; it would be applied twice", path=p)
        seen.add(Path(p).resolve())
    return [_check_one(Path(p), model, base, fingerprint) for p in paths]


def _check_one(path: Path, model: PreTrainedModel, base: Path, fingerprint: str) -> HistoryAdapter:
    from trainmedic.record.errors import ReadError
    from trainmedic.record.safetensors import read_json_object, read_safetensors

    config_path, weights_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not path.is_dir() or not config_path.is_file() or not weights_path.is_file():
        raise HealError(
            "not a PEFT adapter directory (needs adapter_config.json and adapter_model.safetensors)",
            path=path,
        )
    try:
        config = read_json_object(config_path, what="adapter config")
        header = read_safetensors(weights_path, config_path=config_path).header
    except ReadError as exc:
        raise HealError(exc.message, path=exc.path, line=exc.line) from None
    if config.get("peft_type") != "LORA":
        raise HealError(
            f"peft_type is {config.get('peft_type')!r}; a heal history must be LoRA", path=config_path
        )
    _check_base(path, config, base, fingerprint)
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise HealError(f"'r' must be a positive integer, got {rank!r}", path=config_path)
    pattern = config.get("rank_pattern") or {}
    modules = dict(model.named_modules())
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, info in header.items():
        m = _LORA.match(name)
        if m:
            shapes.setdefault(m["module"], {})[m["ab"]] = info.shape
    if not shapes:
        raise HealError("holds no LoRA weights (no '*.lora_A.weight' tensors)", path=weights_path)
    for module_name, ab in sorted(shapes.items()):
        _check_pair(
            weights_path, module_name, ab, modules.get(module_name), _rank_for(module_name, rank, pattern)
        )
    return HistoryAdapter(path, rank, len(shapes))


def _check_base(path: Path, config: dict[str, Any], base: Path, fingerprint: str) -> None:
    """A round written by heal records its base's fingerprint; otherwise compare the recorded base."""
    recorded: str | None = None
    round_file = path / ROUND_FILE
    if round_file.is_file():
        try:
            recorded = json.loads(round_file.read_text(encoding="utf-8")).get("base_fingerprint")
        except (OSError, ValueError, AttributeError):
            recorded = None
    if recorded is None:
        other = config.get("base_model_name_or_path")
        if (
            isinstance(other, str)
            and other
            and Path(other).is_dir()
            and (Path(other) / "config.json").is_file()
        ):
            if Path(other).resolve() == base.resolve():
                return
            recorded = base_fingerprint(Path(other))
    if recorded is not None and recorded != fingerprint:
        raise HealError(
            f"was trained on a different base model (fingerprint {recorded}, this base {fingerprint}); "
            "history adapters must come from rounds on the same --base",
            path=path,
        )


def _rank_for(module: str, rank: int, pattern: dict[str, Any]) -> int:
    for key, value in pattern.items():  # PEFT's own rule: the key matches a suffix of the module name
        if re.match(rf"(.*\.)?({key})$", module) and isinstance(value, int):
            return value
    return rank


def _check_pair(where: Path, name: str, ab: dict[str, tuple[int, ...]], module: Any, rank: int) -> None:
    if set(ab) != {"A", "B"}:
        raise HealError(f"{name} has lora_{next(iter(ab))} but not its pair", path=where)
    a, b = ab["A"], ab["B"]
    if module is None or not hasattr(module, "in_features"):
        raise HealError(
            f"adapts {name}, which this base model does not have (or is not a linear layer): "
            "it was trained on a different base",
            path=where,
        )
    if len(a) != 2 or len(b) != 2 or a[1] != module.in_features or b[0] != module.out_features:
        raise HealError(
            f"{name}: LoRA shapes A{list(a)} B{list(b)} do not fit the base's layer "
            f"({module.in_features} -> {module.out_features}): it was trained on a different base",
            path=where,
        )
    if a[0] != rank or b[1] != rank:
        raise HealError(
            f"{name}: the tensors have rank {a[0]}/{b[1]} but adapter_config.json says r={rank}; "
            "the config does not belong to these weights",
            path=where,
        )


def attach(
    model: PreTrainedModel, config: LoraConfig, history: Sequence[HistoryAdapter]
) -> tuple[PeftModel, list[torch.nn.Parameter]]:
    """The base with the new trainable adapter and the history adapters active but frozen.

    Returns the model and the history parameters, which must be frozen again after every
    reference pass: leaving `disable_adapter()` re-enables gradients on every active adapter.
    """
    from peft import get_peft_model

    with warnings.catch_warnings():  # PEFT asks a deprecated transformers property; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)  # the new adapter, named NEW
    names = [f"history_{i}" for i in range(len(history))]
    for name, adapter in zip(names, history, strict=True):
        peft_model.load_adapter(str(adapter.path), adapter_name=name, is_trainable=False)
    if names:
        cast(Any, peft_model.base_model).set_adapter([NEW, *names])  # all applied in the forward pass
    frozen = [p for n, p in peft_model.named_parameters() if any(f".{name}." in n for name in names)]
    freeze(frozen)
    return peft_model, frozen


def freeze(params: Sequence[torch.nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(False)


@contextlib.contextmanager
def original_model(peft_model: PeftModel, frozen: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Inside: the round-0 original (every adapter off), no gradients. Outside: as before."""
    import torch

    try:
        with torch.no_grad(), cast(Any, peft_model).disable_adapter():
            yield
    finally:
        freeze(frozen)


def trainable_names(peft_model: PeftModel) -> list[str]:
    return [n for n, p in peft_model.named_parameters() if p.requires_grad]
