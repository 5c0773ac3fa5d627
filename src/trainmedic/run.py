"""The in-memory view of one training run, whatever wrote it.

Readers (`trainmedic.record`) build a `Run`; probes and the live watcher consume it. Curves are
numpy arrays indexed by optimizer step; optimizer moments and adapter tensors are numpy arrays
(memory-mapped where the file allows), never torch tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainmedic.findings import Problem


@dataclass(frozen=True)
class Series:
    """A logged quantity: `values[i]` was logged at optimizer step `steps[i]` (steps ascending)."""

    steps: np.ndarray  # int64
    values: np.ndarray  # float64; may hold NaN/Inf exactly as logged

    @staticmethod
    def empty() -> Series:
        return Series(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))

    @staticmethod
    def of(steps: Any, values: Any) -> Series:
        return Series(np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64))

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def interval(self) -> int:
        """Median number of optimizer steps between two logged points (1 for per-step logs)."""
        if len(self) < 2:
            return 1
        return max(1, int(np.median(np.diff(self.steps))))


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header."""

    name: str
    dtype: str  # safetensors dtype code: F32, F16, BF16, ...
    shape: tuple[int, ...]
    start: int  # byte offsets into the data section
    end: int


@dataclass
class ParamMoments:
    """The optimizer's state for one parameter (one optimizer id)."""

    id: int
    group: int
    shape: tuple[int, ...]
    exp_avg_sq: np.ndarray | None = None  # Adam's second moment, None when the optimizer keeps none
    exp_avg: np.ndarray | None = None
    step: float | None = None
    state_keys: tuple[str, ...] = ()  # every key the state held, e.g. ('state1','state2','qmap1',...)
    name: str | None = None  # parameter name once the id -> name mapping is derived


@dataclass
class OptimizerState:
    """What `training_state.pt` (dlm) or `optimizer.pt` (HF) says about the optimizer."""

    source: Path
    params: list[ParamMoments]
    param_groups: list[dict[str, Any]] = field(default_factory=list)  # JSON-safe subset (lr, wd, ids)
    global_step: int | None = None
    epoch: float | None = None
    best_val_loss: float | None = None
    use_qlora: bool | None = None
    mapping_verified: bool = False
    mapping_note: str = "no parameter names available"


@dataclass
class AdapterWeights:
    """An adapter (or full model) safetensors file: its header, and arrays mapped on demand."""

    source: Path
    header: dict[str, TensorInfo]
    arrays: Mapping[str, np.ndarray]  # lazily memory-mapped views, keyed like `header`
    config: dict[str, Any] | None = None  # adapter_config.json when present
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainingRunInfo:
    """A training run inside a store other than the one judged (listed, not judged)."""

    label: str
    steps: int
    first_step: int
    last_step: int
    final_loss: float | None
    files: list[str]


@dataclass
class Run:
    """One training run: curves, optimizer moments, adapter weights and where they came from."""

    path: Path
    layout: str
    label: str = ""
    train_loss: Series = field(default_factory=Series.empty)
    grad_norm: Series = field(default_factory=Series.empty)
    learning_rate: Series = field(default_factory=Series.empty)
    eval_loss: Series = field(default_factory=Series.empty)
    extra: dict[str, Series] = field(default_factory=dict)  # entropy, reward, rewards/margins, ...
    optimizer: OptimizerState | None = None
    adapter: AdapterWeights | None = None
    max_steps: int | None = None  # planned length when the writer recorded one
    completed: bool | None = None  # a run_complete record / final trainer_state was seen
    other_runs: list[TrainingRunInfo] = field(default_factory=list)
    # What a live watcher recorded in its run log: `event` records (detections) and `action`
    # records (treatments), as plain dicts with at least `step` and `type`.
    events: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    sources: list[Path] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def has_log(self) -> bool:
        return len(self.train_loss) > 0 or len(self.eval_loss) > 0 or len(self.grad_norm) > 0

    def skipped_steps(self) -> np.ndarray:
        """Steps whose update a live watcher skipped (its `skip` action records)."""
        steps = [a.get("step") for a in self.actions if a.get("action") == "skip"]
        whole = [s for s in steps if isinstance(s, int) and not isinstance(s, bool)]
        return np.asarray(whole, dtype=np.int64)

    def fatal_problems(self, artifact: str) -> list[Problem]:
        return [p for p in self.problems if p.fatal and p.artifact == artifact]
