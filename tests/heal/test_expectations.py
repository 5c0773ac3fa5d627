"""A round's checked expectations, judged on hand-made step tables."""

from __future__ import annotations

import math
from itertools import pairwise

from trainmedic.findings import Verdict
from trainmedic.heal.expectations import StepRow, check, heal_nll


def rows(nll: list[float], div: list[float] | None = None, norms: list[float | None] | None = None,
         tau: float = 0.1) -> list[StepRow]:  # fmt: skip
    div = div or [0.0] * len(nll)
    norms = norms or [1.0] * len(nll)
    return [
        StepRow(i + 1, n, d, n, g, float(d > tau), 8)
        for i, (n, d, g) in enumerate(zip(nll, div, norms, strict=True))
    ]


def verdicts(found: list) -> dict[str, Verdict]:
    return {f.name: f.verdict for f in found}


def test_heal_nll_is_the_mean_of_the_last_five_steps() -> None:
    assert heal_nll(rows([9, 9, 9, 1, 2, 3, 4, 5])) == 3.0
    assert heal_nll(rows([2, 4])) == 3.0
    assert heal_nll([]) is None


def test_a_healthy_kl_round_passes_everything() -> None:
    found = check(
        rows([6, 5.5, 5, 4.5, 4, 3.8, 3.5, 3.2, 3, 2.9], [0, 0.05, 0.2, 0.3, 0.2] * 2), "kl_rev", 0.1
    )
    assert verdicts(found) == {
        "nll_falls": Verdict.PASS,
        "divergence": Verdict.PASS,
        "grad_norms_finite": Verdict.PASS,
        "barrier_fired": Verdict.PASS,
    }


def test_nll_that_does_not_fall_fails() -> None:
    found = verdicts(check(rows([3, 3, 3, 3, 4, 4, 4, 4]), "nll", 0.1))
    assert found["nll_falls"] is Verdict.FAIL


def test_divergence_must_be_zero_without_a_barrier_and_positive_with_one() -> None:
    assert verdicts(check(rows([5, 4], [0.0, 0.0]), "wd", 0.1))["divergence"] is Verdict.PASS
    assert verdicts(check(rows([5, 4], [0.0, 0.2]), "nll", 0.1))["divergence"] is Verdict.FAIL
    assert verdicts(check(rows([5, 4], [0.0, 0.0]), "kl_fwd", 0.1))["divergence"] is Verdict.FAIL
    assert "barrier_fired" not in verdicts(check(rows([5, 4]), "nll", 0.1))


def test_a_barrier_that_never_fired_is_a_warning_that_names_tau() -> None:
    found = check(rows([5, 4, 3], [0.01, 0.02, 0.03], tau=0.5), "kl_rev", 0.5)
    (barrier,) = [f for f in found if f.name == "barrier_fired"]
    assert barrier.verdict is Verdict.WARN
    assert "tau=0.5" in barrier.message and "never fired" in barrier.message


def test_a_non_finite_or_missing_gradient_norm_fails_and_names_the_step() -> None:
    found = check(rows([5, 4, 3], norms=[1.0, math.nan, None]), "nll", 0.1)
    (grads,) = [f for f in found if f.name == "grad_norms_finite"]
    assert grads.verdict is Verdict.FAIL and "steps 2, 3" in grads.message


def test_a_long_round_table_is_thinned_evenly_and_keeps_the_last_step() -> None:
    from trainmedic.heal.render import MAX_ROWS, shown_rows

    short = rows([5.0] * 12)
    assert shown_rows(short) == short
    shown = shown_rows(rows([5.0] * 104))
    steps = [r.step for r in shown]
    assert len(shown) <= MAX_ROWS + 1 and steps[0] == 1 and steps[-1] == 104
    assert len({b - a for a, b in pairwise(steps[:-1])}) == 1  # evenly spaced, then the last
