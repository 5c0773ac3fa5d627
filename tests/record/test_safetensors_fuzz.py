"""Fuzzing the safetensors reader: whatever the bytes, the only exception that escapes is ReadError."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from trainmedic.record.errors import ReadError
from trainmedic.record.safetensors import read_safetensors

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_RNG = np.random.default_rng(0)
VALID = save(
    {
        "model.layers.0.q_proj.lora_A.weight": _RNG.normal(size=(2, 6)).astype(np.float32),
        "model.layers.0.q_proj.lora_B.weight": _RNG.normal(size=(5, 2)).astype(np.float16),
        "ids": np.arange(3, dtype=np.int64),
    },
    metadata={"format": "pt"},
)


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "fuzz.safetensors"


def read_all(path: Path, content: bytes) -> None:
    """Read the file and touch every tensor; a ReadError is an accepted answer."""
    path.write_bytes(content)
    try:
        weights = read_safetensors(path)
        for name, info in weights.header.items():
            arr = weights.arrays[name]
            assert arr.shape == info.shape
            assert arr.nbytes <= 2 * len(content)  # BF16 doubles; nothing else outgrows the file
    except ReadError as exc:
        assert str(path) in str(exc)


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_only_raise_read_error(fuzz_file: Path, content: bytes) -> None:
    read_all(fuzz_file, content)


@FUZZ
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=2**64 - 1))
def test_random_header_length_and_body_only_raise_read_error(
    fuzz_file: Path, body: bytes, declared: int
) -> None:
    read_all(fuzz_file, struct.pack("<Q", declared) + body)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(VALID) - 1), st.integers(min_value=0, max_value=255)
        ),
        min_size=1,
        max_size=8,
    ),
    st.integers(min_value=0, max_value=len(VALID)),
)
def test_mutated_valid_file_only_raises_read_error(
    fuzz_file: Path, edits: list[tuple[int, int]], keep: int
) -> None:
    content = bytearray(VALID)
    for pos, value in edits:
        content[pos] = value
    read_all(fuzz_file, bytes(content[: max(keep, 1)]))


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "BOOL", "F8_E5M2", "X9"]) | JSON,
        "shape": st.lists(st.integers(min_value=-2, max_value=2**40), max_size=4) | JSON,
        "data_offsets": st.lists(st.integers(min_value=-2, max_value=80), min_size=0, max_size=3) | JSON,
    }
)


@FUZZ
@given(
    st.dictionaries(st.text(max_size=12), ENTRY | JSON, max_size=5),
    st.one_of(st.none(), JSON),
    st.binary(min_size=0, max_size=64),
)
def test_structured_random_headers_only_raise_read_error(
    fuzz_file: Path, entries: dict[str, Any], metadata: Any, data: bytes
) -> None:
    header: dict[str, Any] = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    body = json.dumps(header, allow_nan=True).encode()
    read_all(fuzz_file, struct.pack("<Q", len(body)) + body + data)
