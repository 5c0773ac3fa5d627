"""What every process must agree on each step, in one collective.

Each rank judges its own loss, so the loss is averaged over ranks first (the gradient norm is
already global after the data-parallel all-reduce): every detector, and so every skip, rollback
or stop, then decides the same on all ranks by construction. The same all-reduce carries each
rank's OOM split, so a rank that ran out of memory makes every rank cut its micro-batches as
finely, and rank 0, the only one that writes the run log, records it.
"""

from __future__ import annotations

from typing import Any

import torch

from trainmedic.watcher.events import Action


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agree(values: torch.Tensor, split: int = 1) -> tuple[torch.Tensor, list[int]]:
    """`values` averaged over all ranks, and every rank's `split` (index = rank); one all-reduce.
    A no-op in a single process."""
    rank, world = _world()
    if world == 1:
        return values, [split]
    import torch.distributed as dist

    slots = torch.zeros(world, dtype=values.dtype, device=values.device)
    slots[rank] = float(split)
    both = torch.cat([values.reshape(-1), slots])
    dist.all_reduce(both, op=dist.ReduceOp.SUM)
    n = values.numel()
    return (both[:n] / world).reshape(values.shape), [round(s) for s in both[n:].tolist()]


def adopt_split(guard: Any, splits: list[int], agreed: int, step: int) -> tuple[int, list[Action]]:
    """The split every rank uses from now on (the finest any rank needed), with `guard` set to it,
    and an action for each other rank whose own OOM raised it above the previous `agreed` one
    (this rank's own OOM was already reported by its guard)."""
    rank, _ = _world()
    finest = max(max(splits), agreed)
    if guard is not None and finest > guard.split:
        guard.split = finest
    actions = []
    for r, split in enumerate(splits):
        if r != rank and split > agreed:
            reason = (
                f"rank {r} ran out of memory and now cuts each micro-batch into {split} pieces; "
                f"every rank cuts them into {finest} from the next step (same gradient, same batch)"
            )
            actions.append(Action(step, "oom_split", reason, {"rank": r, "split": split, "agreed": finest}))
    return finest, actions
