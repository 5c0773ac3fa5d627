"""Verdicts and findings: the one result type every probe returns and every renderer reads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


def finite_or_none(x: float | None) -> float | None:
    """A number for strict JSON evidence: None where it is missing or non-finite."""
    return None if x is None or not math.isfinite(x) else float(x)


class Verdict(StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"  # the probe could not apply (says why)
    ERROR = "error"  # an artifact could not be read (says what and where)

    @property
    def rank(self) -> int:
        """Severity order used by `--fail-on`: skip < pass < warn < fail < error."""
        return _RANK[self]


_RANK = {Verdict.SKIP: 0, Verdict.PASS: 1, Verdict.WARN: 2, Verdict.FAIL: 3, Verdict.ERROR: 4}


@dataclass
class Finding:
    """One probe's answer about one run."""

    name: str
    kind: str
    verdict: Verdict
    message: str
    score: float | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0

    def __post_init__(self) -> None:
        if self.score is not None:
            s = float(self.score)
            self.score = None if not math.isfinite(s) else min(1.0, max(0.0, s))


@dataclass
class Problem:
    """Something wrong with an input file: where it is and what was wrong.

    `fatal` problems made an artifact unusable; the others were tolerated (a torn last
    line after a crash) and are reported as notes.
    """

    path: str
    message: str
    line: int | None = None
    artifact: str = "log"  # log | optimizer | adapter | eval | layout
    fatal: bool = True

    def where(self) -> str:
        return f"{self.path}:{self.line}" if self.line is not None else self.path

    def __str__(self) -> str:
        return f"{self.where()}: {self.message}"


@dataclass
class RunReport:
    """Everything `check` says about one PATH."""

    path: str
    layout: str  # what was recognised, in words a user knows ("dlm store", "HF checkpoint", ...)
    findings: list[Finding]
    run_label: str = ""  # which training run inside the store was judged
    sources: list[str] = field(default_factory=list)  # files actually read
    notes: list[str] = field(default_factory=list)
    other_runs: list[dict[str, Any]] = field(default_factory=list)
    # Downsampled curves for charts: name -> {"steps": [...], "values": [...]} (values may be None
    # where the logged value was non-finite). Names: train_loss, grad_norm, eval_loss, learning_rate.
    curves: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    duration_s: float = 0.0

    @property
    def worst(self) -> Verdict:
        applied = [f.verdict for f in self.findings]
        if not applied:
            return Verdict.SKIP
        return max(applied, key=lambda v: v.rank)

    @property
    def checked_anything(self) -> bool:
        return any(f.verdict is not Verdict.SKIP for f in self.findings)

    def headline(self) -> str:
        """One line for the run: the worst verdict and what drove it."""
        if not self.checked_anything:
            return "nothing to check: no probe could apply to this path"
        worst = self.worst
        culprits = [f.name for f in self.findings if f.verdict is worst]
        if worst is Verdict.PASS:
            return f"healthy: {len(culprits)} probe(s) passed"
        return f"{worst.value.upper()}: " + ", ".join(culprits)
