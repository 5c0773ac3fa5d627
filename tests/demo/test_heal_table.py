"""The demo's heal comparison stays whole on a narrow terminal and in a file (80 columns)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

pytest.importorskip("torch")

from trainmedic.demo.heal_step import COMPARED, Measured, comparison_table

MEASURED = {
    "original": Measured(5.288123, 9.043456, None),
    "nll round": Measured(4.728901, 7.767012, 0.768812),
    "kl_rev round": Measured(4.736345, 8.046678, 0.221834),
}


@pytest.mark.parametrize("width", [50, 80, 120])
def test_no_number_is_cut_and_the_labels_fold(width: int) -> None:
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None).print(comparison_table(MEASURED))
    text = buffer.getvalue()
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= width, text
    for name in MEASURED:
        assert name in text, text
    for value in ("5.288", "9.043", "4.729", "7.767", "0.7688", "4.736", "8.047", "0.2218"):
        assert value in text, (value, text)
    words = " ".join(text.split())
    for label, _, _ in COMPARED if width >= 80 else ():  # narrower, a long word may fold too
        assert all(word in words for word in label.split()), (label, text)
