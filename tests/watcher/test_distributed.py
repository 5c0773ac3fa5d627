"""Several processes: every decision is the same on every rank, and only rank 0 writes files.

Each scenario launches `torchrun --nproc_per_node 2` (CPU, gloo) on `dist_worker.py`, a watched
toy LoRA run; each rank reports its actions and a hash of its trainable weights (equal hashes:
the ranks stayed in step). A rank waiting forever on a collective the other never joins fails
the test through the launch timeout instead of blocking the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.distributed as dist  # noqa: E402

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch build has no gloo backend for CPU processes", allow_module_level=True)

WORKER = Path(__file__).with_name("dist_worker.py")
# a healthy launch takes ~15-20 s on a quiet 2-core CPU and 5x that under load; a hang lasts until
# gloo's 30 min timeout
TIMEOUT_S = 900
NAN_AT, LR_AT, OOM_AT = 7, 25, 5


@dataclass
class Launch:
    returncode: int
    out: Path
    ranks: list[dict[str, Any]]
    output: str


@pytest.fixture(scope="module")
def base() -> Path:
    from trainmedic.toy.base import toy_base

    return toy_base()  # built (or found cached) once here, so the workers only load it


def launch(scenario: str, at: int, base: Path, tmp: Path) -> Launch:
    torchrun = Path(sys.executable).with_name("torchrun")
    out, reports = tmp / "out", tmp / "reports"
    reports.mkdir(parents=True)
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(WORKER), scenario]
    cmd += [str(base), str(out), str(reports), str(at)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # a session of its own, so a hang is ended with every worker torchrun started
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(
            f"{scenario}: the ranks did not finish within {TIMEOUT_S} s (a rank waits on a "
            f"collective the other never joins?)\n{output[-4000:]}"
        )
    finally:  # every worker, whatever ended the wait (an interrupt included)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    found = sorted(reports.glob("rank-*.json"))
    ranks = [json.loads(p.read_text()) for p in found]
    return Launch(proc.returncode, out, ranks, output)


def finished(run: Launch) -> None:
    assert run.returncode == 0, run.output[-4000:]
    assert [r["rank"] for r in run.ranks] == [0, 1], run.output[-4000:]
    assert all(r["world_size"] == 2 for r in run.ranks)


@pytest.fixture(scope="module")
def nan_run(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Launch:
    return launch("nan", NAN_AT, base, tmp_path_factory.mktemp("nan"))


@pytest.fixture(scope="module")
def diverge_run(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Launch:
    return launch("diverge", LR_AT, base, tmp_path_factory.mktemp("diverge"))


def test_nan_loss_on_rank_1_only_is_skipped_at_that_step_by_both_ranks(nan_run: Launch) -> None:
    finished(nan_run)
    zero, one = nan_run.ranks
    assert zero["actions"] == one["actions"] == [[NAN_AT, "skip"]]
    assert zero["status"] == one["status"] == "completed"
    assert zero["steps"] == one["steps"] == 20
    assert zero["weights"] == one["weights"]  # the skip left both replicas identical


def test_only_rank_0_writes_the_run_log_and_the_postmortem(nan_run: Launch) -> None:
    finished(nan_run)
    zero, one = nan_run.ranks
    (log,) = (nan_run.out / "logs").glob("train-*.jsonl")
    assert zero["log_path"] == str(log) and one["log_path"] is None
    assert zero["postmortem_path"] == str(nan_run.out / "trainmedic-postmortem.json")
    assert one["postmortem_path"] is None
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "step"] == list(range(1, 21))
    assert [(r["step"], r["action"]) for r in records if r["type"] == "action"] == [(NAN_AT, "skip")]
    assert sum(r["type"] == "banner" for r in records) == 1


def test_divergence_rolls_back_both_ranks_to_the_same_certified_checkpoint(diverge_run: Launch) -> None:
    finished(diverge_run)
    zero, one = diverge_run.ranks
    assert zero["actions"] == one["actions"]
    assert [a for _, a in zero["actions"]].count("rollback") == 1, zero["actions"]
    assert zero["rollback_to"] == one["rollback_to"]
    assert zero["rollback_to"][0] < LR_AT
    assert zero["status"] == one["status"] == "completed"
    assert zero["steps"] == one["steps"] == 40
    assert zero["weights"] == one["weights"]


def test_only_rank_0_certifies_checkpoints(diverge_run: Launch) -> None:
    from trainmedic.watcher.checkpoints import MARKER

    finished(diverge_run)
    zero, one = diverge_run.ranks
    assert one["certified_here"] == []
    assert zero["certified_here"], "the run saved every 10 steps and certified none"
    on_disk = sorted(int(m.parent.name.rsplit("-", 1)[1]) for m in diverge_run.out.glob(f"*/{MARKER}"))
    assert set(on_disk) <= set(zero["certified_here"])
    (log,) = (diverge_run.out / "logs").glob("train-*.jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    certified = [r["step"] for r in records if r["type"] == "checkpoint" and r.get("status") == "certified"]
    assert certified and len(certified) == len(set(certified))  # each certification logged once


def test_oom_on_rank_1_only_is_split_there_and_the_ranks_stay_in_step(base: Path, tmp_path: Path) -> None:
    # Rank 1 runs the failed micro-batch's forward again in two pieces; without care the extra
    # forward's buffer broadcast pairs with rank 0's gradient all-reduce and both wait forever.
    run = launch("oom", OOM_AT, base, tmp_path)
    finished(run)
    zero, one = run.ranks
    assert one["oom_raised"] == 1  # paid once: later micro-batches are split up front
    assert one["actions"] == [[OOM_AT, "oom_split"]]
    # rank 0 hears of it in the step's agreement, cuts its own micro-batches as finely, and logs it
    assert zero["actions"] == [[OOM_AT, "oom_split"]]
    logged = [json.loads(line) for line in Path(zero["log_path"]).read_text().splitlines()]
    (split,) = [r for r in logged if r["type"] == "action" and r["action"] == "oom_split"]
    assert split["detail"]["rank"] == 1 and split["detail"]["agreed"] == 2
    assert zero["status"] == one["status"] == "completed"
    assert zero["steps"] == one["steps"] == 12
    assert zero["weights"] == one["weights"]  # one gradient sync per micro-batch on both ranks
