"""The one error a heal round raises for bad input, always before any training starts."""

from __future__ import annotations


class HealError(ValueError):
    """Bad input for a heal round; `str()` names the file and line, the flag or the field to fix."""

    def __init__(self, message: str, *, path: object = None, line: int | None = None) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.message = message
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(where + message)
