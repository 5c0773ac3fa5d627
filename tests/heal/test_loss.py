"""The barrier's pieces on small tensors whose values are worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from trainmedic.heal.loss import IGNORE, barrier, heal_loss, per_example_kl, per_example_nll


def logits_of(*probs: list[float]) -> torch.Tensor:
    """[1, positions, vocab] logits whose softmax is `probs` at each position."""
    return torch.tensor([[math.log(p) for p in row] for row in probs]).unsqueeze(0)


def test_kl_matches_the_hand_computed_values_in_both_directions() -> None:
    cur, ref = logits_of([0.5, 0.5]), logits_of([0.9, 0.1])
    mask = torch.tensor([[True]])
    rev = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(current || original)
    fwd = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(original || current)
    assert per_example_kl(cur, ref, mask, "kl_rev").item() == pytest.approx(rev, abs=1e-6)
    assert per_example_kl(cur, ref, mask, "kl_fwd").item() == pytest.approx(fwd, abs=1e-6)


def test_kl_is_nonnegative_and_zero_when_current_equals_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 11, generator=gen), torch.randn(3, 5, 11, generator=gen)
    mask = torch.ones(3, 5, dtype=torch.bool)
    for mode in ("kl_rev", "kl_fwd"):
        assert (per_example_kl(a, b, mask, mode) > 0).all()
        assert per_example_kl(a, a.clone(), mask, mode).abs().max().item() < 1e-6


def test_kl_averages_over_trained_positions_only() -> None:
    cur = logits_of([0.5, 0.5], [0.5, 0.5])
    ref = logits_of([0.9, 0.1], [0.5, 0.5])
    both, first = torch.tensor([[True, True]]), torch.tensor([[True, False]])
    one = per_example_kl(cur, ref, first, "kl_rev").item()
    assert per_example_kl(cur, ref, both, "kl_rev").item() == pytest.approx(one / 2, abs=1e-6)


def test_nll_is_the_mean_over_each_examples_completion_tokens() -> None:
    logits = logits_of([0.25, 0.75], [0.5, 0.5], [0.9, 0.1])
    targets = torch.tensor([[1, 0, 0]])
    mask = torch.tensor([[True, False, True]])
    expected = (-math.log(0.75) - math.log(0.9)) / 2
    assert per_example_nll(logits, targets, mask).item() == pytest.approx(expected, abs=1e-6)


def test_the_barrier_is_zero_below_tau_and_linear_above() -> None:
    d = torch.tensor([0.0, 0.1, 0.3, 1.0])
    assert barrier(d, lam=2.0, tau=0.3).tolist() == pytest.approx([0.0, 0.0, 0.0, 1.4])


def test_heal_loss_is_the_mean_of_per_example_nll_plus_barrier() -> None:
    # two examples, vocab 2; position 0 is the prompt (label IGNORE), position 1 is predicted from 0
    cur = torch.cat([logits_of([0.5, 0.5], [0.5, 0.5]), logits_of([0.9, 0.1], [0.5, 0.5])]).requires_grad_()
    ref = torch.cat([logits_of([0.9, 0.1], [0.5, 0.5]), logits_of([0.9, 0.1], [0.5, 0.5])])
    labels = torch.tensor([[IGNORE, 0], [IGNORE, 0]])
    parts = heal_loss(cur, labels, mode="kl_rev", lam=3.0, tau=0.1, ref_logits=ref)
    nll = [-math.log(0.5), -math.log(0.9)]
    kl = [0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), 0.0]
    per = [nll[0] + 3.0 * (kl[0] - 0.1), nll[1]]  # the second example is at the reference: no barrier
    assert parts.nll.tolist() == pytest.approx(nll, abs=1e-6)
    assert parts.divergence.tolist() == pytest.approx(kl, abs=1e-6)
    assert parts.per_example.tolist() == pytest.approx(per, abs=1e-6)
    assert parts.fired.tolist() == [True, False]
    assert parts.loss.item() == pytest.approx(sum(per) / 2, abs=1e-6)
    parts.loss.backward()
    assert cur.grad is not None


def test_the_reference_gets_no_gradient() -> None:
    cur = logits_of([0.5, 0.5], [0.5, 0.5]).requires_grad_()
    ref = logits_of([0.9, 0.1], [0.2, 0.8]).requires_grad_()
    labels = torch.tensor([[IGNORE, 1]])
    heal_loss(cur, labels, mode="kl_fwd", lam=1.0, tau=0.0001, ref_logits=ref).loss.backward()
    assert cur.grad is not None and ref.grad is None


@pytest.mark.parametrize("mode", ["nll", "wd"])
def test_modes_without_a_barrier_have_zero_divergence_and_plain_nll(mode: str) -> None:
    cur = logits_of([0.5, 0.5], [0.25, 0.75])
    labels = torch.tensor([[IGNORE, 1]])
    parts = heal_loss(cur, labels, mode=mode, lam=5.0, tau=0.1)  # type: ignore[arg-type]
    assert parts.divergence.tolist() == [0.0] and not parts.fired.any()
    assert parts.loss.item() == pytest.approx(-math.log(0.5), abs=1e-6)


def test_a_kl_mode_without_reference_logits_is_an_error() -> None:
    with pytest.raises(ValueError, match="reference model's logits"):
        heal_loss(logits_of([0.5, 0.5], [0.5, 0.5]), torch.tensor([[IGNORE, 1]]), mode="kl_rev", lam=1, tau=1)
