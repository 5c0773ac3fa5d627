"""Gradient plumbing for in-step treatment: fp32 total norm, rescale, and skip."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def grads_of(params: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.requires_grad and p.grad is not None]


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm in fp32, whatever the gradients' dtype (bf16 norms lose precision)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    norms: list[torch.Tensor]
    if all(g.dtype == torch.float32 and not g.is_sparse for g in grads):
        norms = list(torch._foreach_norm(grads, 2))
    else:
        norms = [torch.linalg.vector_norm(g, 2, dtype=torch.float32) for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2)


def scale_(grads: list[torch.Tensor], factor: float) -> None:
    if grads and factor != 1.0:
        torch._foreach_mul_(grads, factor)


def drop_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Skip this step's update: torch optimizers leave a parameter with `grad=None` untouched
    (no step, no moment update, no weight decay)."""
    for p in params:
        p.grad = None
