"""Errors raised by readers: each names the file (and line) so the user knows where to look."""

from __future__ import annotations


class ReadError(Exception):
    """An input file could not be read; `str()` is a one-line message naming the file."""

    def __init__(self, path: object, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.message = message
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class UnsafePickleError(ReadError):
    """A pickle asked for a global outside the allowlist; nothing was executed."""

    def __init__(self, path: object, global_name: str) -> None:
        self.global_name = global_name
        super().__init__(
            path,
            f"refused to load: the pickle references {global_name!r}, which is not an allowed "
            "tensor/container type (nothing was executed)",
        )
