"""Certified checkpoints: certified only after a clean window, never rotated away, never resumed
from when incomplete. Two real toy runs (clean; NaN gradients from step 13 under the watcher)
plus direct calls of the callback on copies of their checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from trainmedic.record.safetensors import read_safetensors  # noqa: E402
from trainmedic.watcher import checkpoints as ck  # noqa: E402
from trainmedic.watcher.checkpoints import (  # noqa: E402
    MARKER,
    Certifier,
    breaks_clean_window,
    inspect_checkpoint,
    newest_certified,
)


class Reports:
    """Collects what the certifier reports, as the run log would."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, dict[str, Any]]] = []

    def __call__(self, step: int, path: Path, /, **fields: Any) -> None:
        self.seen.append((step, fields["status"], fields))

    def steps(self, status: str) -> list[int]:
        return [s for s, st, _ in self.seen if st == status]


class MarkerWatch(TrainerCallback):
    """Which checkpoints carry a certification marker when each step begins."""

    def __init__(self) -> None:
        self.at: dict[int, set[int]] = {}

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        out = Path(args.output_dir)
        self.at[state.global_step] = {
            int(p.parent.name.split("-")[1]) for p in out.glob(f"checkpoint-*/{MARKER}")
        }


def strict(path: Path) -> dict[str, Any]:
    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """The toy model is tiny: on a busy small CPU, one thread is several times faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base() -> Path:
    from trainmedic.toy.base import toy_base

    return toy_base()


@pytest.fixture(scope="module")
def clean(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Reports, MarkerWatch]:
    from trainmedic.toy.training import toy_trainer

    out = tmp_path_factory.mktemp("clean")
    reports, markers = Reports(), MarkerWatch()
    trainer = toy_trainer(
        out,
        base=base,
        steps=30,
        batch_size=2,
        seq_len=32,
        save_strategy="steps",
        save_steps=10,
        save_total_limit=2,
    )
    trainer.add_callback(Certifier(clean_steps=5, report=reports))
    trainer.add_callback(markers)
    trainer.train()
    return out, reports, markers


@pytest.fixture(scope="module")
def poisoned(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Reports, Any]:
    """NaN gradients from step 13 on; the watcher skips them and reports the trouble."""
    from trainmedic.toy.training import toy_trainer
    from trainmedic.watcher import Vitals, WatchConfig, watch

    out = tmp_path_factory.mktemp("poisoned")
    reports = Reports()
    certifier = Certifier(clean_steps=2, report=reports)
    trainer = toy_trainer(
        out,
        base=base,
        steps=40,
        batch_size=2,
        seq_len=32,
        save_strategy="steps",
        save_steps=10,
        save_total_limit=2,
    )
    trainer.add_callback(certifier)
    original = trainer.training_step

    def training_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        loss = original(model, inputs, *args, **kwargs)
        if trainer.state.global_step + 1 >= 13:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return loss

    trainer.training_step = training_step
    vitals = Vitals(WatchConfig(max_skips=1000, max_consecutive_skips=1000), echo=lambda _: None)
    emit, act = vitals._emit, vitals._act

    def forward_event(event: Any) -> None:  # the wiring the supervisor does
        emit(event)
        if event.severity != "info" and breaks_clean_window(event.rule):
            certifier.trouble(event.step, event.message)

    def forward_action(action: Any, **kw: Any) -> None:
        act(action, **kw)
        if action.action == "skip":
            certifier.trouble(action.step, action.reason)

    vitals._emit, vitals._act = forward_event, forward_action  # type: ignore[method-assign]
    result = watch(trainer, vitals=vitals)
    return out, reports, (trainer, result)


# -- real runs -------------------------------------------------------------------------------------
def test_clean_checkpoints_are_certified_exactly_k_steps_after_their_save(
    clean: tuple[Path, Reports, MarkerWatch],
) -> None:
    out, reports, markers = clean
    assert reports.steps("pending") == [10, 20, 30]
    assert reports.steps("certified") == [10, 20]  # 30's window [31, 35] never ran
    assert 10 not in markers.at[14] and 10 in markers.at[15]
    assert 20 not in markers.at[24] and 20 in markers.at[25]
    assert not (out / "checkpoint-30" / MARKER).exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-10",
        "checkpoint-20",
        "checkpoint-30",
    ]


def test_certification_is_strict_json_naming_window_files_and_finite_check(
    clean: tuple[Path, Reports, MarkerWatch],
) -> None:
    out, _, _ = clean
    marker = strict(out / "checkpoint-20" / MARKER)
    assert marker["step"] == 20 and marker["clean_window"] == [21, 25] and marker["certified_at_step"] == 25
    for name in ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"):
        assert marker["files"][name] == (out / "checkpoint-20" / name).stat().st_size
    assert marker["finite"]["checked_tensors"] > 0 and marker["finite"]["nonfinite"] == []
    assert marker["time"].endswith("+00:00")
    assert not [p for p in (out / "checkpoint-20").iterdir() if p.name.endswith(".tmp")]


def test_newest_certified_and_before_step(clean: tuple[Path, Reports, MarkerWatch]) -> None:
    out, _, _ = clean
    assert newest_certified(out) == out / "checkpoint-20"
    assert newest_certified(out, before_step=20) == out / "checkpoint-10"
    assert newest_certified(out, before_step=11) == out / "checkpoint-10"
    assert newest_certified(out, before_step=10) is None


def test_nan_gradients_never_rotate_away_the_last_certified_checkpoint(
    poisoned: tuple[Path, Reports, Any],
) -> None:
    out, reports, (trainer, result) = poisoned
    assert result.status == "completed" and result.steps == 40
    assert reports.steps("certified") == [10]
    assert reports.steps("voided") == [20, 30] and reports.steps("rejected") == []  # skipped: finite
    voided = {step: fields["reason"] for step, status, fields in reports.seen if status == "voided"}
    assert voided[20].startswith("step 21 of its window [21, 22]") and "nan" in voided[20]
    assert get_last_checkpoint(str(out)).endswith("checkpoint-40")  # what a plain resume would take
    assert reports.steps("deleted") == [20]  # uncertified ones rotate at the user's limit of 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-10",
        "checkpoint-30",
        "checkpoint-40",
    ]
    assert newest_certified(out) == out / "checkpoint-10"
    assert trainer.args.save_total_limit == 2  # the user's value is back after training


# -- the callback on copies of real checkpoints ----------------------------------------------------
def copy_ckpt(src: Path, out: Path, step: int) -> Path:
    dst = out / f"checkpoint-{step}"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(MARKER))
    state = json.loads((dst / "trainer_state.json").read_text())
    state["global_step"] = step
    (dst / "trainer_state.json").write_text(json.dumps(state))
    return dst


def fake(out: Path, limit: int | None = 2) -> SimpleNamespace:
    return SimpleNamespace(
        output_dir=str(out), save_total_limit=limit, should_save=True, save_only_model=False
    )


def at(step: int, best: Path | None = None) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, best_model_checkpoint=str(best) if best else None)


def save(c: Certifier, args: SimpleNamespace, src: Path, step: int, best: Path | None = None) -> None:
    c.on_step_begin(args, at(step - 1), None)
    copy_ckpt(src, Path(args.output_dir), step)
    c.on_save(args, at(step, best), None)


def test_a_checkpoint_with_nan_weights_is_never_certified(
    clean: tuple[Path, Reports, MarkerWatch], tmp_path: Path
) -> None:
    ckpt = copy_ckpt(clean[0] / "checkpoint-10", tmp_path, 10)
    weights = read_safetensors(ckpt / "adapter_model.safetensors")
    info = next(i for i in weights.header.values() if i.dtype == "F32")
    with open(ckpt / "adapter_model.safetensors", "r+b") as fh:
        fh.seek(
            8 + int.from_bytes((ckpt / "adapter_model.safetensors").read_bytes()[:8], "little") + info.start
        )
        fh.write(np.float32("nan").tobytes())
    reports, args = Reports(), fake(tmp_path)
    c = Certifier(clean_steps=1, report=reports)
    c.on_train_begin(args, at(0), None)
    c.on_save(args, at(10), None)
    c.on_step_begin(args, at(50), None)
    assert reports.steps("rejected") == [10] and "non-finite" in reports.seen[0][2]["reason"]
    assert not (ckpt / MARKER).exists() and newest_certified(tmp_path) is None


def test_trouble_voids_only_the_certifications_whose_window_holds_it(
    clean: tuple[Path, Reports, MarkerWatch], tmp_path: Path
) -> None:
    src, reports, args = clean[0] / "checkpoint-10", Reports(), fake(tmp_path, limit=None)
    c = Certifier(clean_steps=5, report=reports)
    c.on_train_begin(args, at(0), None)
    save(c, args, src, 10)
    c.trouble(16, "loss spike")  # after 10's window [11, 15]
    save(c, args, src, 20)
    c.trouble(23, "non-finite gradient")
    c.on_step_begin(args, at(40), None)
    assert reports.steps("certified") == [10] and reports.steps("voided") == [20]
    assert newest_certified(tmp_path) == tmp_path / "checkpoint-10"
    c.trouble(12, "divergence began here")  # reported late (e.g. a divergence's onset)
    assert reports.steps("revoked") == [10] and newest_certified(tmp_path) is None


def test_an_incomplete_checkpoint_is_rejected_when_saved(
    clean: tuple[Path, Reports, MarkerWatch], tmp_path: Path
) -> None:
    ckpt = copy_ckpt(clean[0] / "checkpoint-10", tmp_path, 10)
    (ckpt / "scheduler.pt").unlink()
    reports, args = Reports(), fake(tmp_path)
    c = Certifier(clean_steps=1, report=reports)
    c.on_train_begin(args, at(0), None)
    c.on_save(args, at(10), None)
    assert reports.steps("rejected") == [10] and "scheduler" in reports.seen[0][2]["reason"]


def test_rotation_keeps_newest_certified_pending_and_best(
    clean: tuple[Path, Reports, MarkerWatch], tmp_path: Path
) -> None:
    src, reports, args = clean[0] / "checkpoint-10", Reports(), fake(tmp_path, limit=1)
    c = Certifier(clean_steps=1, keep_certified=2, report=reports)
    c.on_train_begin(args, at(0), None)
    assert args.save_total_limit is None  # the Trainer's own rotation is off
    best = tmp_path / "checkpoint-2"
    for step in range(1, 7):
        save(c, args, src, step, best=best if step >= 2 else None)
    left = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*"))
    assert left == [2, 4, 5, 6]  # best, the newest two certified, the pending newest
    assert reports.steps("deleted") == [1, 3]
    c.on_train_end(args, at(6), None)
    assert args.save_total_limit == 1


def test_pending_checkpoints_survive_rotation_until_their_window_ends(
    clean: tuple[Path, Reports, MarkerWatch], tmp_path: Path
) -> None:
    src, reports, args = clean[0] / "checkpoint-10", Reports(), fake(tmp_path, limit=1)
    c = Certifier(clean_steps=3, keep_certified=1, report=reports)
    c.on_train_begin(args, at(0), None)
    for step in range(1, 6):  # a save every step, a window of three: three pending at once
        save(c, args, src, step)
    assert reports.steps("certified") == [1, 2] and reports.steps("deleted") == [1]
    assert sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*")) == [2, 3, 4, 5]


def test_restarting_earlier_revokes_later_certifications(
    clean: tuple[Path, Reports, MarkerWatch], tmp_path: Path
) -> None:
    shutil.copytree(clean[0], tmp_path / "out")
    out, reports = tmp_path / "out", Reports()
    c = Certifier(report=reports)
    c.on_train_begin(fake(out), at(10), None)  # rolled back to checkpoint-10
    assert reports.steps("revoked") == [20]
    assert newest_certified(out) == out / "checkpoint-10"


def test_saving_again_over_a_certified_checkpoint_drops_its_marker_until_recertified(
    clean: tuple[Path, Reports, MarkerWatch], tmp_path: Path
) -> None:
    out, reports = tmp_path / "out", Reports()
    shutil.copytree(clean[0], out)
    args, c = fake(out), Certifier(clean_steps=5, report=reports)
    c.on_train_begin(args, at(20), None)
    c.on_save(args, at(20), None)  # new weights written over checkpoint-20
    assert reports.steps("pending") == [20] and not (out / "checkpoint-20" / MARKER).exists()
    assert newest_certified(out) == out / "checkpoint-10"


def damage(out: Path, how: str) -> None:
    ckpt = out / "checkpoint-20"
    if how == "no_trainer_state":
        (ckpt / "trainer_state.json").unlink()
    elif how == "truncated_weights":
        data = (ckpt / "adapter_model.safetensors").read_bytes()
        (ckpt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "truncated_optimizer":
        data = (ckpt / "optimizer.pt").read_bytes()
        (ckpt / "optimizer.pt").write_bytes(data[:-100])
    elif how == "marker_copied_to_uncertified":
        shutil.rmtree(ckpt)
        shutil.copy(out / "checkpoint-10" / MARKER, out / "checkpoint-30" / MARKER)
    elif how == "temp_dir":
        shutil.rmtree(ckpt)
        shutil.copytree(out / "checkpoint-10", out / "tmp-checkpoint-40")


@pytest.mark.parametrize(
    "how",
    [
        "no_trainer_state",
        "truncated_weights",
        "truncated_optimizer",
        "marker_copied_to_uncertified",
        "temp_dir",
    ],
)
def test_newest_certified_never_returns_an_incomplete_checkpoint(
    clean: tuple[Path, Reports, MarkerWatch], tmp_path: Path, how: str
) -> None:
    out = tmp_path / "out"
    shutil.copytree(clean[0], out)
    assert newest_certified(out) == out / "checkpoint-20"
    damage(out, how)
    assert newest_certified(out) == out / "checkpoint-10"


def test_inspection_names_what_is_missing(clean: tuple[Path, Reports, MarkerWatch], tmp_path: Path) -> None:
    ckpt = copy_ckpt(clean[0] / "checkpoint-10", tmp_path, 10)
    assert inspect_checkpoint(ckpt).ok
    (ckpt / "rng_state.pth").unlink()
    assert inspect_checkpoint(ckpt).problems == ["no RNG state (rng_state*.pth)"]
    assert inspect_checkpoint(ckpt, resume_state=False).ok  # what save_only_model writes


def test_marker_is_written_through_atomic_write(
    clean: tuple[Path, Reports, MarkerWatch], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[Path] = []
    real = ck.atomic_write
    monkeypatch.setattr(ck, "atomic_write", lambda path, data: (written.append(path), real(path, data)))
    args, c = fake(tmp_path), Certifier(clean_steps=1)
    c.on_train_begin(args, at(0), None)
    save(c, args, clean[0] / "checkpoint-10", 10)
    c.on_step_begin(args, at(11), None)
    assert written == [tmp_path / "checkpoint-10" / MARKER]


def test_trouble_rules_and_bad_settings() -> None:
    assert breaks_clean_window("nonfinite_grad") and breaks_clean_window("loss_spike")
    assert breaks_clean_window("divergence") and not breaks_clean_window("overfit")
    with pytest.raises(ValueError, match="keep_certified must be a whole number >= 1"):
        Certifier(keep_certified=0)
    with pytest.raises(ValueError, match="clean_steps"):
        Certifier(clean_steps=0)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, bytes, list[int]]]) -> None:
    header, data = {}, b""
    for name, (dtype, raw, shape) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def bf16(xs: list[float]) -> bytes:
    return (np.array(xs, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


def test_finite_check_reads_the_exponent_bits_of_every_float_dtype(tmp_path: Path) -> None:
    tensors = {
        "f16_ok": ("F16", np.array([1, -2, 65504], "<f2").tobytes(), [3]),
        "f16_inf": ("F16", np.array([1, np.inf], "<f2").tobytes(), [2]),
        "bf16_ok": ("BF16", bf16([1.0, -3.0e38, 1e-30]), [3]),
        "bf16_nan": ("BF16", bf16([1.0, np.nan]), [2]),
        "f64_ok": ("F64", np.array([1e308, -1e-308], "<f8").tobytes(), [2]),
        "f64_ninf": ("F64", np.array([0.0, -np.inf], "<f8").tobytes(), [2]),
        "i32_max": ("I32", np.array([0x7F800000], "<i4").tobytes(), [1]),  # not a float: not judged
    }
    write_safetensors(tmp_path / "model.safetensors", tensors)
    found = ck.Inspection()
    ck._check_finite(read_safetensors(tmp_path / "model.safetensors"), found)
    assert sorted(n.split(":")[1] for n in found.nonfinite) == ["bf16_nan", "f16_inf", "f64_ninf"]
    assert found.tensors == 6
