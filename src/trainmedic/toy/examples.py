"""Write the bundled example runs: one healthy, two broken, all in real on-disk formats.

python -m trainmedic.toy.examples OUT_DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from trainmedic.toy.artifacts import write_dlm_store, write_hf_run
from trainmedic.toy.shapes import TINY


def write_examples(out: Path) -> list[Path]:
    """(Re)create the example runs under `out`; only the example directories are replaced."""
    made = []
    for name, writer in (
        ("healthy-hf-run", lambda p: write_hf_run(p, TINY, logged_steps=60, evals=6, seed=1)),
        ("diverged-dlm-store", lambda p: write_dlm_store(p, TINY, logged_steps=40, curve="diverged", seed=2)),
        ("nan-hf-run", lambda p: write_hf_run(p, TINY, logged_steps=40, curve="nan", seed=3)),
    ):
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        writer(target)
        made.append(target)
    return made


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m trainmedic.toy.examples OUT_DIR", file=sys.stderr)
        return 2
    for path in write_examples(Path(args[0])):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
