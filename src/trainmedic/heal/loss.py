"""The heal loss, as pure functions of logits: `loss = nll + lam * relu(D - tau)` per example.

`D` measures how far the current model's next-token distributions have moved from the
original's on the example's completion positions:

- `kl_rev`, KL(current || original): mode-seeking. It is large where the current model puts mass
  on tokens the original finds implausible, so the incoherent samples a filter missed (which
  need exactly that) are resisted while a style the original can already express is not.
- `kl_fwd`, KL(original || current): mass-covering; it resists the current model dropping
  tokens the original liked.
- `nll` and `wd` have no divergence term (`D = 0`); `wd` anchors through weight decay on the
  adapter instead (see `trainmedic.heal.trainer`).

KL is summed over the vocabulary at each completion position and averaged over the example's
completion positions, so `tau` is in nats per token whatever the completion's length. The
barrier is per example: an example whose `D` stays under `tau` trains on plain NLL, one that
drifts past it is pulled back in proportion to the excess.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    import torch

Divergence = Literal["nll", "kl_fwd", "kl_rev", "wd"]
DIVERGENCES: tuple[Divergence, ...] = ("nll", "kl_fwd", "kl_rev", "wd")
KL_MODES: tuple[Divergence, ...] = ("kl_fwd", "kl_rev")
IGNORE = -100


class LossParts(NamedTuple):
    """The batch loss (mean of per-example losses) and the per-example terms, for the step table."""

    loss: torch.Tensor  # scalar, with gradient
    nll: torch.Tensor  # [batch], detached
    per_example: torch.Tensor  # [batch], detached: nll + barrier
    divergence: torch.Tensor  # [batch], detached
    fired: torch.Tensor  # [batch] bool: D above tau, so the barrier pulled this example back


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align predictions with targets: (logits[:, :-1], targets[:, 1:], mask of trained positions)."""
    targets = labels[:, 1:]
    return logits[:, :-1], targets, targets != IGNORE


def per_example_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over each example's trained positions: [batch]. Inputs are already shifted."""
    import torch.nn.functional as F

    token_nll = F.cross_entropy(
        logits.float().transpose(1, 2), targets.masked_fill(~mask, 0), reduction="none"
    )
    return _masked_mean(token_nll, mask)


def per_example_kl(
    logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor, mode: Divergence
) -> torch.Tensor:
    """KL per position summed over the vocabulary, averaged over trained positions: [batch].

    `kl_rev` is KL(current || reference), `kl_fwd` KL(reference || current). Gradients flow
    through `logits` only; the reference is a constant. Only the trained positions are turned
    into float32 distributions: with a large vocabulary those tensors are the biggest of the step.
    """
    import torch

    if mode not in KL_MODES:
        raise ValueError(f"per_example_kl: mode must be one of {KL_MODES}, got {mode!r}")
    rows, cols = mask.nonzero(as_tuple=True)
    cur = torch.log_softmax(logits[rows, cols].float(), dim=-1)
    ref = torch.log_softmax(ref_logits[rows, cols].detach().float(), dim=-1)
    p, q = (cur, ref) if mode == "kl_rev" else (ref, cur)  # KL(p || q) = sum p (log p - log q)
    token_kl = (p.exp() * (p - q)).sum(-1)
    total = torch.zeros(mask.shape[0], dtype=token_kl.dtype, device=token_kl.device).index_add(
        0, rows, token_kl
    )
    return total / mask.sum(-1).clamp(min=1).to(total.dtype)


def barrier(divergence: torch.Tensor, lam: float, tau: float) -> torch.Tensor:
    """`lam * relu(D - tau)`: zero while the divergence stays under `tau`."""
    import torch

    return lam * torch.relu(divergence - tau)


def heal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    mode: Divergence,
    lam: float,
    tau: float,
    ref_logits: torch.Tensor | None = None,
) -> LossParts:
    """The round's loss on one batch of unshifted logits and labels (IGNORE where not trained)."""
    import torch

    logits, targets, mask = shift(logits, labels)
    nll = per_example_nll(logits, targets, mask)
    if mode in KL_MODES:
        if ref_logits is None:
            raise ValueError(f"heal_loss: mode {mode!r} needs the reference model's logits")
        div = per_example_kl(logits, ref_logits[:, :-1], mask, mode)
        per_example = nll + barrier(div, lam, tau)
        fired = div.detach() > tau
    else:
        div = torch.zeros_like(nll)
        per_example = nll
        fired = torch.zeros_like(nll, dtype=torch.bool)
    return LossParts(per_example.mean(), nll.detach(), per_example.detach(), div.detach(), fired)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp(min=1.0)
