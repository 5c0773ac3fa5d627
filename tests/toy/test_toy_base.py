from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from trainmedic.toy import base as toy_base_module
from trainmedic.toy.base import (
    CACHE_VERSION,
    MARKER,
    build_info,
    cache_root,
    ensure_built,
    toy_base,
)


@pytest.fixture(scope="session")
def base_dir() -> Path:
    return toy_base()


# Runs in a fresh interpreter so HF_HUB_OFFLINE is read at import, as in a user's process; the
# hub endpoint points at a closed port, so any attempt to reach it would fail loudly.
RELOAD_OFFLINE = """
import json, math, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from trainmedic.toy.base import heldout_loss, token_stream
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
stream = token_stream(tok, "heldout")
print(json.dumps({
    "arch": type(model).__name__, "vocab": len(tok), "loss": heldout_loss(model, stream),
    "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
    "kv_heads": model.config.num_key_value_heads, "heads": model.config.num_attention_heads,
}))
"""


def test_base_reloads_offline_and_has_learned_a_real_distribution(base_dir: Path) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "TRANSFORMERS_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD_OFFLINE, str(base_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["arch"] == "LlamaForCausalLM"
    assert got["tied"] and got["heads"] == 4 and got["kv_heads"] == 2
    ln_vocab = math.log(got["vocab"])
    # A uniform guess scores ln(vocab) = 7.6; the pre-trained base is more than 1.5 nats better.
    assert got["loss"] < ln_vocab - 1.5, got
    assert got["loss"] == pytest.approx(build_info(base_dir)["heldout_loss_final"], abs=1e-3)


def test_build_record_describes_the_build(base_dir: Path) -> None:
    info = build_info(base_dir)
    assert info["cache_version"] == CACHE_VERSION
    assert info["steps"] > 0 and info["build_seconds"] > 0
    assert info["heldout_loss_final"] < info["heldout_loss_initial"] - 1.5
    assert set(info["versions"]) >= {"python", "torch", "transformers", "tokenizers"}
    assert base_dir.name == f"toy-base-v{CACHE_VERSION}"


def test_second_call_reuses_the_cache_without_rebuilding(base_dir: Path, monkeypatch) -> None:
    def must_not_build(out: Path) -> dict:
        raise AssertionError("the cached base was rebuilt")

    monkeypatch.setattr(toy_base_module, "pretrain_base", must_not_build)
    before = (base_dir / MARKER).stat().st_mtime_ns
    start = time.perf_counter()
    again = toy_base(base_dir.parent)
    assert time.perf_counter() - start < 1.0
    assert again == base_dir
    assert (base_dir / MARKER).stat().st_mtime_ns == before


def test_cache_root_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRAINMEDIC_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("TRAINMEDIC_CACHE")
    assert cache_root() == Path.home() / ".cache" / "trainmedic"


# ----------------------------------------------------------------- the cache protocol, with a cheap build


class CountingBuild:
    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls = 0
        self.delay = delay
        self.fail = fail

    def __call__(self, out: Path) -> dict:
        self.calls += 1
        (out / "weights.bin").write_bytes(b"complete")
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("build died")
        return {"steps": 1}


def test_half_built_directory_is_rebuilt_not_used(tmp_path: Path) -> None:
    target = tmp_path / "toy-base-v1"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"half")  # no marker: an interrupted or foreign build
    build = CountingBuild()
    assert ensure_built(target, build) == target
    assert build.calls == 1
    assert (target / "weights.bin").read_bytes() == b"complete"
    assert json.loads((target / MARKER).read_text())["cache_version"] == CACHE_VERSION


def test_leftover_temporary_build_is_removed_and_never_used(tmp_path: Path) -> None:
    target = tmp_path / "toy-base-v1"
    stale = tmp_path / ".toy-base-v1.tmp-dead"
    stale.mkdir()
    (stale / "weights.bin").write_bytes(b"half")
    build = CountingBuild()
    ensure_built(target, build)
    assert build.calls == 1
    assert not stale.exists()
    assert (target / "weights.bin").read_bytes() == b"complete"


def test_marker_from_another_cache_version_triggers_a_rebuild(tmp_path: Path) -> None:
    target = tmp_path / "toy-base-v1"
    target.mkdir()
    (target / MARKER).write_text(json.dumps({"cache_version": CACHE_VERSION - 1}))
    build = CountingBuild()
    ensure_built(target, build)
    assert build.calls == 1
    ensure_built(target, build)
    assert build.calls == 1  # complete now: reused


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "toy-base-v1"
    with pytest.raises(RuntimeError, match="build died"):
        ensure_built(target, CountingBuild(fail=True))
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["toy-base-v1.lock"]


def test_concurrent_callers_build_once(tmp_path: Path) -> None:
    target = tmp_path / "toy-base-v1"
    build = CountingBuild(delay=0.3)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_built(target, build))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert build.calls == 1
    assert results == [target] * 3


def test_a_caller_that_waits_for_the_lock_says_who_holds_it(tmp_path: Path) -> None:
    import os
    import socket

    target = tmp_path / "toy-base-v1"
    heard: list[str] = []
    build = CountingBuild(delay=1.2)  # long enough for the second caller to find the lock held
    first = threading.Thread(target=lambda: ensure_built(target, build))
    first.start()
    while not (tmp_path / "toy-base-v1.lock").exists() or not (tmp_path / "toy-base-v1.lock").read_text():
        time.sleep(0.01)
    assert ensure_built(target, build, say=heard.append) == target
    first.join()
    assert build.calls == 1
    assert heard[0].startswith("waiting for toy-base-v1.lock, held by pid ")
    assert f"pid {os.getpid()} on {socket.gethostname()}" in heard[0]
    assert heard[-1].startswith("toy-base-v1.lock released after ")
    assert (tmp_path / "toy-base-v1.lock").read_text() == ""  # nobody holds it now


class _Bigram:
    """The least model `pretrain` can train: an embedding whose rows are next-token logits."""

    def __new__(cls) -> Any:
        import torch

        class Bigram(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.logits = torch.nn.Embedding(8, 8)

            def forward(self, input_ids: Any, labels: Any) -> Any:
                loss = torch.nn.functional.cross_entropy(self.logits(input_ids).view(-1, 8), labels.view(-1))
                return SimpleNamespace(loss=loss)

        return Bigram()


def test_pretraining_reports_its_progress() -> None:
    torch = pytest.importorskip("torch")
    from trainmedic.toy.base import PROGRESS_EVERY, pretrain

    heard: list[str] = []
    stream = torch.randint(0, 8, (400,), generator=torch.Generator().manual_seed(0))
    losses = pretrain(_Bigram(), stream, steps=2 * PROGRESS_EVERY, say=heard.append)
    assert len(losses) == 2 * PROGRESS_EVERY
    assert [h.split(",")[0] for h in heard] == [
        f"pre-training step {PROGRESS_EVERY}/{2 * PROGRESS_EVERY}",
        f"pre-training step {2 * PROGRESS_EVERY}/{2 * PROGRESS_EVERY}",
    ]
    assert all("s left)" in h for h in heard)


def test_loading_a_directory_that_is_not_a_model_names_it(tmp_path: Path) -> None:
    from trainmedic.toy.base import load_base

    with pytest.raises(FileNotFoundError, match=r"no config\.json or tokenizer\.json"):
        load_base(tmp_path)
