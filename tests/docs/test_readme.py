"""The README's code runs as written: every ```python block in a fresh interpreter (once more after
a submodule of the package was imported first), and the YAML spec it shows loads.

A block needs the objects its text assumes (a `trainer`, the files a loop names); `CONTEXTS` builds
those before the block runs, keyed by a line of the block. A block the table does not know fails
the test, so a new snippet cannot go untested.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

TRAINER = """
from trainmedic.toy.base import toy_base
from trainmedic.toy.training import toy_trainer
trainer = toy_trainer("out", base=toy_base(), steps=12, batch_size=4, seq_len=32)
"""
# the prelude imports nothing from trainmedic.watcher: the block's own import must find `watch`
CONTEXTS = {
    "result = watch(trainer)": TRAINER,
    "heal_round(": "",  # the files it names are laid out in its working directory by the test
}


def blocks(language: str) -> list[tuple[int, str]]:
    text = README.read_text(encoding="utf-8")
    return [
        (text[: m.start()].count("\n") + 1, m.group(2))
        for m in FENCE.finditer(text)
        if m.group(1) == language
    ]


def context_of(code: str) -> str:
    known = [key for key in CONTEXTS if key in code]
    assert known, f"a README python block this test does not know; add its context:\n{code}"
    return CONTEXTS[known[0]]


def _heal_files(where: Path) -> None:
    """What the three-round recipe names: a base model directory and three kept files."""
    from trainmedic.toy.base import toy_base

    (where / "base-model").symlink_to(toy_base(), target_is_directory=True)
    shipped = Path(__import__("trainmedic.heal", fromlist=["x"]).__file__).parent / "examples" / "kept.jsonl"
    lines = [ln for ln in shipped.read_text(encoding="utf-8").splitlines() if ln.strip()]
    for k in range(3):
        (where / f"kept-{k + 1}.jsonl").write_text("\n".join(lines[k * 8 : (k + 1) * 8]) + "\n")


def test_the_readme_has_the_blocks_this_test_knows() -> None:
    code = [c for _, c in blocks("python")]
    for key in CONTEXTS:
        assert any(key in c for c in code), f"no README block holds {key!r} any more"


AFTER_SUBMODULE = "import trainmedic.watcher.config\n"


def _cases() -> list[Any]:
    """Each block in a fresh interpreter; the watch block also after a submodule was imported
    (which once bound the submodule to `trainmedic.watch`)."""
    cases = []
    for line, code in blocks("python"):
        cases.append(pytest.param(line, "", id=f"README.md:{line}"))
        if "from trainmedic import watch" in code:
            cases.append(pytest.param(line, AFTER_SUBMODULE, id=f"README.md:{line}-after-submodule"))
    return cases


@pytest.mark.parametrize(("line", "first"), _cases())
def test_each_python_block_runs_as_written(line: int, first: str, tmp_path: Path, groups: Any) -> None:
    pytest.importorskip("torch")
    code = dict(blocks("python"))[line]
    prelude = context_of(code)
    if "heal_round(" in code:
        _heal_files(tmp_path)
    script = tmp_path / "snippet.py"
    # the block is compiled under its own README line numbers, exactly as written
    script.write_text(
        f"{first}{prelude}\nexec(compile({code!r}, {f'README.md:{line}'!r}, 'exec'))\n",
        encoding="utf-8",
    )
    done = groups.run([sys.executable, str(script)], cwd=tmp_path)
    assert done.returncode == 0, f"README.md:{line}\n{code}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    if "result = watch(trainer)" in code:
        assert re.search(r"^completed after 12 steps", done.stdout, re.M), done.stdout
        # a plain script sees what the watcher did and where its records are, on stderr
        assert "[trainmedic] preflight ok" in done.stderr, done.stderr[-3000:]
        assert "run log " in done.stderr and "trainmedic-postmortem.json" in done.stderr, done.stderr[-3000:]
    if "heal_round(" in code:
        assert (tmp_path / "round-1" / "adapter_config.json").is_file(), done.stdout + done.stderr[-2000:]
        summary = json.loads((tmp_path / "round-1" / "trainmedic-heal.json").read_text())
        assert summary["config"]["divergence"] == "kl_rev" and summary["history"] == []


@pytest.mark.parametrize("line", [n for n, _ in blocks("yaml")])
def test_each_yaml_spec_in_the_readme_loads(line: int, tmp_path: Path) -> None:
    from trainmedic.spec import load_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text(dict(blocks("yaml"))[line], encoding="utf-8")
    loaded = load_spec(spec)
    assert loaded is not None
