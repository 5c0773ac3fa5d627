"""Offline text for the toy model: the docstrings of the Python standard library on this machine.

Every machine that runs trainmedic has them, they are real English prose about code, and they
come with a name (the function or class they document), which the fine-tuning data sets use.
The same interpreter always yields the same corpus; different Python versions differ a little.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

MIN_CHARS = 80  # shorter docstrings ("Return self.") are mostly boilerplate
MAX_CHARS = 4_000_000
HELDOUT_PERCENT = 5
# Test suites and vendored packages are not prose about the stdlib; they would swamp the rest.
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})

Split = Literal["train", "heldout"]
Kind = Literal["module", "class", "function"]


@dataclass(frozen=True)
class Doc:
    """One docstring and what it documents."""

    module: str  # dotted module path relative to the stdlib root, e.g. "json.decoder"
    name: str  # the function/class name, or the module name for a module docstring
    kind: Kind
    text: str  # whitespace-normalised

    @property
    def split(self) -> Split:
        """Held-out by a hash of the text, so the split survives any change of order or cap."""
        digest = hashlib.sha256(self.text.encode("utf-8")).digest()
        return "heldout" if int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT else "train"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(root).parts))


def _docs_in(path: Path, module: str) -> list[Doc]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old stdlib sources
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    out = []
    kind: Kind
    for node in ast.walk(tree):
        if isinstance(node, ast.Module):
            name, kind = module.rsplit(".", 1)[-1], "module"
        elif isinstance(node, ast.ClassDef):
            name, kind = node.name, "class"
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            name, kind = node.name, "function"
        else:
            continue
        raw = ast.get_docstring(node, clean=True)
        if raw:
            out.append(Doc(module, name, kind, " ".join(raw.split())))
    return out


@cache
def stdlib_docs(root: Path | None = None, max_chars: int = MAX_CHARS) -> tuple[Doc, ...]:
    """Unique docstrings of at least MIN_CHARS, in sorted file order, up to `max_chars` in total."""
    root = stdlib_root() if root is None else root
    seen: set[str] = set()
    docs: list[Doc] = []
    total = 0
    for path in _source_files(root):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for doc in _docs_in(path, module):
            if len(doc.text) < MIN_CHARS or doc.text in seen:
                continue
            if total + len(doc.text) > max_chars:
                return tuple(docs)
            seen.add(doc.text)
            docs.append(doc)
            total += len(doc.text)
    return tuple(docs)


def corpus_docs(split: Split = "train") -> list[Doc]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    docs = stdlib_docs()
    if not docs:
        raise RuntimeError(f"no docstrings found in the Python sources under {stdlib_root()}")
    return [d for d in docs if d.split == split]


def corpus_texts(split: Split = "train") -> list[str]:
    """The docstring texts of one split (about 95 % train, 5 % held out)."""
    return [d.text for d in corpus_docs(split)]
