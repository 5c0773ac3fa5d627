"""Fuzz the torch-file reader: whatever the bytes, it returns a value or raises ReadError."""

from __future__ import annotations

import io
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainmedic.record.errors import ReadError
from trainmedic.record.torchfile import load_torch_file

torch = pytest.importorskip("torch")

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_file() -> bytes:
    base = torch.arange(12.0).reshape(3, 4)
    obj = {
        "global_step": 7,
        "weights": OrderedDict(w=base, view=base[1:, ::2], row=base[2]),
        "half": torch.ones(3, dtype=torch.float16),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "ids": torch.arange(5),
        "u16": torch.arange(3).to(torch.uint16),
        "step": torch.tensor(3.0),
        "flags": torch.tensor([True, False]),
        "misc": (b"\x00\xff", {1, 2}, torch.Size([2]), None, 1.5),
    }
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


VALID = _valid_file()
with zipfile.ZipFile(io.BytesIO(VALID)) as _zf:
    MEMBERS = {info.filename: _zf.read(info) for info in _zf.infolist()}
PICKLE = MEMBERS["archive/data.pkl"]

edits = st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete", "set"]), st.floats(0, 1), st.integers(0, 255)),
    min_size=1,
    max_size=6,
)


def mutate(blob: bytes, operations: list[tuple[str, float, int]]) -> bytes:
    data = bytearray(blob)
    for kind, where, value in operations:
        at = min(int(where * len(data)), max(len(data) - 1, 0))
        if kind == "flip" and data:
            data[at] ^= 1 << (value % 8)
        elif kind == "set" and data:
            data[at] = value
        elif kind == "insert":
            data[at:at] = bytes([value])
        elif kind == "delete":
            del data[at : at + 1 + value % 8]
    return bytes(data)


def load_or_read_error(path: Path) -> None:
    try:
        load_torch_file(path)
    except ReadError as exc:
        assert str(path) in str(exc)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def with_pickle(path: Path, data_pkl: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in MEMBERS.items():
            zf.writestr(name, data_pkl if name == "archive/data.pkl" else blob)
    return path


def test_the_unmutated_fixture_loads(work: Path) -> None:
    (work / "valid.pt").write_bytes(VALID)
    assert load_torch_file(work / "valid.pt")["global_step"] == 7


@SETTINGS
@given(operations=edits, cut=st.one_of(st.none(), st.floats(0, 1)))
def test_mutated_file_bytes_only_raise_read_error(work: Path, operations: list, cut: float | None) -> None:
    blob = mutate(VALID, operations)
    if cut is not None:
        blob = blob[: int(cut * len(blob))]
    (work / "file.pt").write_bytes(blob)
    load_or_read_error(work / "file.pt")


@SETTINGS
@given(operations=edits)
def test_mutated_zip_directory_only_raises_read_error(work: Path, operations: list) -> None:
    directory = VALID.rindex(b"PK\x01\x02") - 2000  # the central directory and the last headers
    blob = VALID[:directory] + mutate(VALID[directory:], operations)
    (work / "dir.pt").write_bytes(blob)
    load_or_read_error(work / "dir.pt")


@SETTINGS
@given(operations=edits)
def test_mutated_pickle_only_raises_read_error(work: Path, operations: list) -> None:
    load_or_read_error(with_pickle(work / "pickle.pt", mutate(PICKLE, operations)))


@SETTINGS
@given(body=st.binary(max_size=200))
def test_arbitrary_pickle_bytes_only_raise_read_error(work: Path, body: bytes) -> None:
    load_or_read_error(with_pickle(work / "random.pt", b"\x80\x02" + body))
