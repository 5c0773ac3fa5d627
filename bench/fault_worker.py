"""The processes of fault scenarios 8 and 9, started by `fault_procs.py`.

    python bench/fault_worker.py kill-in-save MODE OUT REPORTS --base DIR --data DIR --steps N --at K
    torchrun --nproc_per_node 2 bench/fault_worker.py nan-on-rank-1 MODE OUT REPORTS ...

MODE is `plain` (`trainer.train()`) or `watch`. Both scenarios train what `fault_setup` builds,
on the data the benchmark built once and saved (`--data`).

kill-in-save: the process SIGKILLs itself in the middle of writing the checkpoint of step K
(the weights are written, `optimizer.pt` is half written, `trainer_state.json` not yet), after
writing K to REPORTS/killed-at. Started again with `TRAINMEDIC_RESUME=1` (plain: by the benchmark;
watch: by `trainmedic resume OUT`, which runs this same command line again with it) it injects
nothing and resumes: plain with `train(resume_from_checkpoint=True)`, watch from the newest
certified checkpoint.

nan-on-rank-1: two ranks (CPU, gloo), micro-batch 4 each (8 per step, as in one process); the
loss of step K is NaN on rank 1 only. Both ranks evaluate (the Trainer shares the eval blocks
between them) and write REPORTS/rank-R.json; each leaves through `os._exit(0)` after a barrier,
since gloo sometimes aborts at interpreter exit after a finished run.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import signal
from pathlib import Path
from typing import Any

import torch

import fault_setup as setup
from trainmedic.watcher.resume import RESUME_ENV, resume_requested

SCENARIOS = ("kill-in-save", "nan-on-rank-1")
KILLED_AT = "killed-at"


def kill_during_save(trainer: Any, at: int, reports: Path) -> None:
    """SIGKILL this process while the optimizer state of checkpoint `at` is being written: the
    weights are on disk, half of `optimizer.pt` too, `trainer_state.json` is not yet."""
    original = trainer._save_optimizer_and_scheduler

    def save(output_dir: str) -> None:
        if trainer.state.global_step != at:
            original(output_dir)
            return
        buffer = io.BytesIO()
        torch.save(trainer.optimizer.state_dict(), buffer)
        data = buffer.getvalue()
        with open(Path(output_dir) / "optimizer.pt", "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        (reports / KILLED_AT).write_text(str(at))
        os.kill(os.getpid(), signal.SIGKILL)

    trainer._save_optimizer_and_scheduler = save


def kill_in_save(args: argparse.Namespace, train: Any, held_out: Any) -> dict[str, Any]:
    resumed = resume_requested(None)
    trainer = setup.make_trainer(args.out, args.base, args.steps, train, held_out)
    clock = setup.Clock()
    trainer.add_callback(clock)
    picked = None
    if not resumed:
        kill_during_save(trainer, args.at, args.reports)
    elif args.mode == "plain":
        from transformers.trainer_utils import get_last_checkpoint

        picked = get_last_checkpoint(str(args.out))  # what `resume_from_checkpoint=True` takes
    outcome, _ = setup.train_one_way(trainer, args.mode, resume=resumed)
    outcome.started_at = clock.started_at
    if outcome.ended != "crashed":
        outcome.eval_loss = float(trainer.evaluate()["eval_loss"])
    return {**outcome.to_json(), "picked": Path(picked).name if picked else None}


def nan_on_rank_1(args: argparse.Namespace, train: Any, held_out: Any) -> dict[str, Any]:
    rank = int(os.environ.get("RANK", "0"))
    trainer = setup.make_trainer(
        args.out,
        args.base,
        args.steps,
        train,
        held_out,
        batch_size=setup.BATCH // 2,
        use_cpu=True,
        ddp_backend="gloo",
    )
    clock = setup.Clock()
    trainer.add_callback(clock)
    if rank == 1:
        setup.nan_loss_at(trainer, clock, args.at)
    outcome, result = setup.train_one_way(trainer, args.mode)
    outcome.fault_step = args.at
    if result is not None:
        outcome.latency = setup.detection_latency(result.events, result.actions, args.at)
    if outcome.ended != "crashed":
        outcome.eval_loss = float(trainer.evaluate()["eval_loss"])  # on both ranks: a collective
    actions = [[a.step, a.action] for a in result.actions] if result is not None else []
    return {**outcome.to_json(), "rank": rank, "actions": actions, "weights": fingerprint(trainer.model)}


def fingerprint(model: Any) -> str:
    """A hash of the trainable weights: equal on every rank while the ranks stay in step."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("mode", choices=("plain", "watch"))
    parser.add_argument("out", type=Path, help="the run's output_dir")
    parser.add_argument("reports", type=Path, help="folder for rank-R.json")
    parser.add_argument("--base", type=Path, required=True, help="the toy base's folder")
    parser.add_argument("--data", type=Path, required=True, help="the data `fault_setup.save_data` wrote")
    parser.add_argument("--steps", type=int, default=setup.STEPS)
    parser.add_argument("--at", type=int, required=True, help="the step the fault strikes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with setup.quiet():
        train, held_out = setup.load_saved_data(args.data)
        run = kill_in_save if args.scenario == "kill-in-save" else nan_on_rank_1
        report = run(args, train, held_out)
    report["resumed"] = os.environ.get(RESUME_ENV) == "1"
    name = f"rank-{os.environ.get('RANK', '0')}.json"
    tmp = args.reports / f".{name}.tmp"
    tmp.write_text(json.dumps(report, allow_nan=False))
    tmp.rename(args.reports / name)


if __name__ == "__main__":
    main()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        os._exit(0)
