"""The step's agreement: the finest OOM split wins, and rank 0 logs the other ranks' new splits."""

from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")

from trainmedic.watcher.agreement import adopt_split, agree  # noqa: E402


def test_in_one_process_agreement_changes_nothing() -> None:
    values = torch.tensor([2.5, 0.75])
    agreed, splits = agree(values, split=4)
    assert torch.equal(agreed, values) and splits == [4]


def test_every_rank_adopts_the_finest_split_and_another_ranks_oom_is_logged_once() -> None:
    guard = types.SimpleNamespace(split=1)
    agreed, actions = adopt_split(guard, [1, 4], agreed=1, step=7)  # this process is rank 0
    assert agreed == 4 and guard.split == 4
    (action,) = actions
    assert (action.step, action.action) == (7, "oom_split")
    assert action.detail == {"rank": 1, "split": 4, "agreed": 4}
    # the next step: rank 0 now reports 4 as well; nothing new happened, nothing is logged
    agreed, actions = adopt_split(guard, [4, 4], agreed=agreed, step=8)
    assert agreed == 4 and actions == []


def test_this_ranks_own_oom_is_left_to_its_guard_to_report() -> None:
    guard = types.SimpleNamespace(split=2)
    agreed, actions = adopt_split(guard, [2, 1], agreed=1, step=3)
    assert agreed == 2 and guard.split == 2 and actions == []


def test_without_a_guard_the_split_is_still_agreed() -> None:
    agreed, actions = adopt_split(None, [1, 2, 8], agreed=2, step=1)
    assert agreed == 8
    assert [a.detail["rank"] for a in actions] == [2]
