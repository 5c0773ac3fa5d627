"""End-to-end behaviour of `trainmedic check` and `trainmedic report` through the CLI."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trainmedic.cli import app

pytest.importorskip("torch")
pytest.importorskip("safetensors")

from trainmedic.toy.artifacts import write_dlm_store, write_hf_run
from trainmedic.toy.shapes import TINY

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "healthy": write_hf_run(root / "healthy", TINY, logged_steps=60, evals=6, seed=1),
        "diverged": write_dlm_store(root / "diverged", TINY, logged_steps=40, curve="diverged", seed=2),
        "nan": write_hf_run(root / "nan", TINY, logged_steps=40, curve="nan", seed=3),
    }


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_healthy_run_passes_the_gate(runs: dict[str, Path]) -> None:
    code, out = invoke("check", str(runs["healthy"]))
    assert code == 0, out
    assert "HF output dir" in out
    assert "checkpoint-600" in out


@pytest.mark.parametrize("name", ["diverged", "nan"])
def test_broken_runs_fail_the_gate(runs: dict[str, Path], name: str) -> None:
    code, out = invoke("check", str(runs[name]))
    assert code == 1, out
    assert "fail" in out.lower()


def test_missing_path_is_a_usage_error(tmp_path: Path) -> None:
    code, out = invoke("check", str(tmp_path / "nope"))
    assert code == 2
    assert "no such file or directory" in out


def test_symlink_loop_path_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    code, out = invoke("check", str(tmp_path / "a"))
    assert code == 2
    assert "symlink" in out


def test_empty_directory_is_nothing_to_check_and_does_not_pass_quietly(tmp_path: Path) -> None:
    code, out = invoke("check", str(tmp_path))
    assert code == 1
    assert "no training artifacts found" in out
    assert "nothing to check" in out
    assert "gate fails" in out


def test_fail_on_warn_is_stricter_than_fail_on_error(runs: dict[str, Path]) -> None:
    code_error, _ = invoke("check", str(runs["diverged"]), "--fail-on", "error")
    code_fail, _ = invoke("check", str(runs["diverged"]), "--fail-on", "fail")
    assert (code_error, code_fail) == (0, 1)


def test_json_report_is_strict_and_rerenders(runs: dict[str, Path], tmp_path: Path) -> None:
    out_json = tmp_path / "r.json"
    code, _ = invoke("check", str(runs["nan"]), str(runs["healthy"]), "--json", str(out_json))
    assert code == 1

    def refuse(token: str) -> None:
        raise AssertionError(f"non-strict JSON literal {token}")

    data = json.loads(out_json.read_text(), parse_constant=refuse)
    assert data["schema_version"] == 1
    assert len(data["runs"]) == 2
    for fmt, marker in (("markdown", "|"), ("html", "<svg"), ("junit", "<testsuites")):
        code, out = invoke("report", str(out_json), "--format", fmt)
        assert code == 0, out
        assert marker in out


def test_all_report_files_are_written(runs: dict[str, Path], tmp_path: Path) -> None:
    targets = {flag: tmp_path / f"r.{flag}" for flag in ("json", "markdown", "junit", "html")}
    args = [a for flag, p in targets.items() for a in (f"--{flag}", str(p))]
    invoke("check", str(runs["healthy"]), *args)
    for path in targets.values():
        assert path.stat().st_size > 100


def test_report_on_garbage_json_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, out = invoke("report", str(bad), "--format", "markdown")
    assert code == 2
    assert "bad.json" in out


def test_bad_spec_field_is_a_usage_error_naming_the_field(runs: dict[str, Path], tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("probes:\n  training_drift:\n    min_stepz: 3\n")
    code, out = invoke("check", str(runs["healthy"]), "--spec", str(spec))
    assert code == 2
    assert "training_drift.min_stepz" in out


def test_spec_only_limits_the_probes(runs: dict[str, Path], tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("only: [nonfinite]\n")
    out_json = tmp_path / "r.json"
    invoke("check", str(runs["healthy"]), "--spec", str(spec), "--json", str(out_json))
    names = [f["name"] for f in json.loads(out_json.read_text())["runs"][0]["findings"]]
    assert names == ["nonfinite"]


def _malicious_pt(path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"global_step": 10, "x": Payload()}, protocol=2))
        zf.writestr("archive/byteorder", "little")


def test_malicious_training_state_is_refused_and_never_executed(tmp_path: Path) -> None:
    store = write_dlm_store(tmp_path / "evil", TINY, logged_steps=20, seed=5)
    marker = tmp_path / "pwned"
    _malicious_pt(store / "adapter/versions/v0001/training_state.pt", marker)
    code, out = invoke("check", str(store))
    assert code == 1
    assert "system" in out
    assert not marker.exists()


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared/ data not beside the repo")
def test_full_check_never_imports_torch() -> None:
    code = (
        "import sys; from pathlib import Path; from trainmedic.check import check_path; "
        "from trainmedic.spec import default_spec; "
        f"r = check_path(Path({str(SHARED / 'dlm_stores' / 'healthy')!r}), default_spec()); "
        "assert r.checked_anything, r; "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "assert 'transformers' not in sys.modules; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared/ data not beside the repo")
def test_real_dlm_stores_pass(tmp_path: Path) -> None:
    for store in ("healthy", "retrain_two_versions"):
        code, out = invoke("check", str(SHARED / "dlm_stores" / store))
        assert code == 0, out
        assert "dlm store" in out


@pytest.mark.parametrize("option", ["--json", "--markdown", "--junit", "--html"])
def test_a_report_path_under_a_file_names_the_file_that_is_not_a_directory(
    runs: dict[str, Path], tmp_path: Path, option: str
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    code, out = invoke("check", str(runs["healthy"]), option, str(notes / "x.json"))
    assert code == 2
    assert f"{notes} is a file, not a directory" in " ".join(out.split())
    assert notes.read_text() == "mine"


def test_a_report_path_that_is_a_directory_is_refused_before_checking(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    code, out = invoke("check", str(runs["healthy"]), "--json", str(tmp_path))
    assert code == 2
    assert "is a directory; give a file name" in " ".join(out.split())


def test_a_directory_with_nothing_recognised_is_described_in_plain_words(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    code, out = invoke("check", str(tmp_path))
    flat = " ".join(out.split())
    assert code == 1
    assert "in this unknown" not in flat and "in this empty" not in flat
    assert "no live record from trainmedic's watcher here" in flat
    assert "no finite training loss logged" in flat


def test_trainmedics_own_report_and_postmortem_are_named_not_read_as_trainer_states(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    assert invoke("check", str(runs["healthy"]), "--json", str(report))[0] == 0
    postmortem = tmp_path / "trainmedic-postmortem.json"
    postmortem.write_text(json.dumps({"schema_version": 1, "writer": "trainmedic", "status": "completed"}))
    for path, words in (
        (report, "a trainmedic check report, not a training run (show it: trainmedic report report.json)"),
        (postmortem, "trainmedic's postmortem of a watched run"),
    ):
        code, out = invoke("check", str(path))
        flat = " ".join(out.split())
        assert code == 1 and words in flat, flat
        assert "ERROR" not in out and "not a trainer state" not in flat, flat
