"""The safetensors reader: exact arrays, lazy mapping, and a clear ReadError for every bad input."""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import trainmedic.record.safetensors as st_module
from trainmedic.record.errors import ReadError
from trainmedic.record.safetensors import HEADER_CAP, LazyTensors, read_safetensors

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
REAL_ADAPTER = SHARED / "dlm_stores/healthy/adapter/versions/v0001/adapter_model.safetensors"


def write_raw(path: Path, header: Any, data: bytes = b"", *, declared: int | None = None) -> Path:
    """A safetensors file built by hand, so it can be wrong in any way a test needs."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if declared is None else declared
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def entry(dtype: str, shape: Any, start: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def to_bf16_bytes(values: np.ndarray) -> bytes:
    """float32 values whose low 16 bits are zero are exactly representable in bfloat16."""
    bits = np.asarray(values, dtype="<f4").view("<u4")
    return (bits >> 16).astype("<u2").tobytes()


def test_every_numeric_dtype_reads_like_safetensors_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "f64": rng.normal(size=(3, 4)),
        "f32": rng.normal(size=(5,)).astype(np.float32),
        "f16": rng.normal(size=(2, 3, 2)).astype(np.float16),
        "i64": rng.integers(-(2**40), 2**40, size=(4,)),
        "i32": rng.integers(-1000, 1000, size=(2, 2)).astype(np.int32),
        "i16": np.array([-3, 7], dtype=np.int16),
        "i8": np.array([[-128, 127]], dtype=np.int8),
        "u8": np.arange(6, dtype=np.uint8).reshape(2, 3),
        "flag": np.array([True, False, True]),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"format": "np"})
    expected = load_file(str(path))

    weights = read_safetensors(path)

    assert set(weights.arrays) == set(expected)
    for name, want in expected.items():
        got = weights.arrays[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape == weights.header[name].shape, name
        np.testing.assert_array_equal(got, want)
    assert weights.header["f16"].dtype == "F16"
    assert weights.header["flag"].dtype == "BOOL"
    assert weights.metadata == {"format": "np"}
    assert weights.config is None


def test_bf16_is_widened_to_float32_exactly(tmp_path: Path) -> None:
    values = np.array([[1.0, -2.5, 3.140625], [0.0, 65536.0, -1.5e-3]], dtype=np.float32)
    values = (values.view("<u4") & 0xFFFF0000).view("<f4")  # exactly representable in bf16
    path = write_raw(
        tmp_path / "bf16.safetensors", {"w": entry("BF16", [2, 3], 0, 12)}, to_bf16_bytes(values)
    )

    got = read_safetensors(path).arrays["w"]

    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values)


def test_bf16_and_f16_match_torch_written_files(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import save_file as save_torch

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "bf": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "half": torch.randn(3, 4, generator=gen).to(torch.float16),
    }
    path = tmp_path / "torch.safetensors"
    save_torch(tensors, str(path))

    weights = read_safetensors(path)

    np.testing.assert_array_equal(weights.arrays["bf"], tensors["bf"].float().numpy())
    np.testing.assert_array_equal(weights.arrays["half"], tensors["half"].numpy())
    with safe_open(str(path), framework="np") as handle:
        np.testing.assert_array_equal(weights.arrays["half"], handle.get_tensor("half"))
    assert weights.header["bf"].dtype == "BF16"


def test_eight_bit_floats_are_kept_as_raw_bytes(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / "f8.safetensors", {"q": entry("F8_E4M3", [2, 2], 0, 4)}, bytes([1, 2, 3, 0x7F])
    )

    weights = read_safetensors(path)

    assert weights.header["q"].dtype == "F8_E4M3"
    np.testing.assert_array_equal(weights.arrays["q"], np.array([[1, 2], [3, 0x7F]], dtype=np.uint8))


def test_tensors_are_memory_mapped_only_when_accessed(tmp_path: Path) -> None:
    big = 1 << 30  # a 1 GiB tensor in a sparse file: reading it up front would be obvious
    header = {"big": entry("F32", [big // 4], 0, big), "small": entry("F32", [2], big, big + 8)}
    path = write_raw(tmp_path / "sparse.safetensors", header)
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size + big + 8)

    t0 = time.perf_counter()
    weights = read_safetensors(path)
    small = weights.arrays["small"]
    elapsed = time.perf_counter() - t0

    assert elapsed < 1.0
    np.testing.assert_array_equal(small, np.zeros(2, dtype=np.float32))
    base: Any = weights.arrays["big"]
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    assert isinstance(base, mmap.mmap)
    assert isinstance(weights.arrays, LazyTensors)
    assert len(weights.arrays) == 2 and list(weights.arrays) == ["big", "small"]
    with pytest.raises(KeyError):
        weights.arrays["missing"]


def test_file_truncated_after_reading_the_header_is_a_read_error_on_access(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"w": np.ones((4, 4), dtype=np.float32)}, str(path))
    weights = read_safetensors(path)
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size - 8)

    with pytest.raises(ReadError, match="shrank") as info:
        weights.arrays["w"]
    assert str(path) in str(info.value)


def test_adapter_config_beside_the_file_is_loaded(tmp_path: Path) -> None:
    save_file({"w": np.ones(2, dtype=np.float32)}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))

    weights = read_safetensors(tmp_path / "adapter_model.safetensors")

    assert weights.config == {"r": 8, "lora_alpha": 16}


def test_explicit_config_path_wins_over_the_neighbour(tmp_path: Path) -> None:
    save_file({"w": np.ones(2, dtype=np.float32)}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text("{broken")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"r": 4}))

    weights = read_safetensors(tmp_path / "adapter_model.safetensors", config_path=other)

    assert weights.config == {"r": 4}


@pytest.mark.parametrize(
    ("text", "why"),
    [("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object"), ("", "not valid JSON")],
)
def test_bad_adapter_config_is_a_read_error_naming_the_config(tmp_path: Path, text: str, why: str) -> None:
    save_file({"w": np.ones(2, dtype=np.float32)}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(text)

    with pytest.raises(ReadError, match=why) as info:
        read_safetensors(tmp_path / "adapter_model.safetensors")
    assert info.value.path == str(tmp_path / "adapter_config.json")


GOOD = entry("F32", [2], 0, 8)
BAD_HEADERS: list[tuple[str, Any, bytes, str]] = [
    ("not-json", b"{this is not json", b"", "not valid JSON"),
    ("not-utf8", b'{"\xff\xfe": 1}', b"", "not valid JSON"),
    ("array", [1, 2, 3], b"", "must be a JSON object, got an array"),
    ("string", "hello", b"", "must be a JSON object, got a string"),
    ("entry-not-object", {"w": 3}, b"", "tensor 'w': header entry must be an object"),
    ("unknown-dtype", {"w": entry("Q7", [2], 0, 8)}, bytes(8), "tensor 'w': unsupported dtype 'Q7'"),
    ("dtype-missing", {"w": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), "unsupported dtype None"),
    ("negative-dim", {"w": entry("F32", [-2], 0, 8)}, bytes(8), "tensor 'w': shape must be a list"),
    ("float-dim", {"w": entry("F32", [2.0], 0, 8)}, bytes(8), "tensor 'w': shape must be a list"),
    ("bool-dim", {"w": entry("F32", [True, 2], 0, 8)}, bytes(8), "tensor 'w': shape must be a list"),
    ("shape-string", {"w": entry("F32", "2", 0, 8)}, bytes(8), "tensor 'w': shape must be a list"),
    (
        "one-offset",
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}},
        bytes(8),
        "data_offsets must be",
    ),
    ("reversed", {"w": entry("F32", [0], 8, 0)}, bytes(8), "end 0 is before start 8"),
    ("past-data", {"w": entry("F32", [4], 0, 16)}, bytes(8), "run past the data section (8 bytes)"),
    ("size-mismatch", {"w": entry("F32", [3], 0, 8)}, bytes(16), "needs 12 bytes but data_offsets span 8"),
    ("huge-shape", {"w": entry("F32", [2**40, 2**40, 2**40], 0, 8)}, bytes(8), "larger than the whole data"),
    ("metadata-array", {"__metadata__": [1], "w": GOOD}, bytes(8), "__metadata__ must be an object"),
    ("metadata-number", {"__metadata__": {"step": 3}, "w": GOOD}, bytes(8), "__metadata__['step'] must be"),
]


@pytest.mark.parametrize(
    ("header", "data", "why"), [c[1:] for c in BAD_HEADERS], ids=[c[0] for c in BAD_HEADERS]
)
def test_malformed_header_is_a_read_error_naming_the_file(
    tmp_path: Path, header: Any, data: bytes, why: str
) -> None:
    path = write_raw(tmp_path / "bad.safetensors", header, data)

    with pytest.raises(ReadError) as info:
        read_safetensors(path)

    assert why in str(info.value)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "empty file (0 bytes)"),
        (b"\x05\x00\x00", "3 bytes, too short"),
        (struct.pack("<Q", 100) + b"{}", "declared header length 100 bytes exceeds the file (10 bytes)"),
        (struct.pack("<Q", 2**64 - 1) + b"{}", "exceeds the file"),
    ],
    ids=["empty", "short", "header-past-end", "header-length-max"],
)
def test_truncated_file_is_a_read_error(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "t.safetensors"
    path.write_bytes(content)

    with pytest.raises(ReadError) as info:
        read_safetensors(path)

    assert why in str(info.value) and str(path) in str(info.value)


def test_header_over_the_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "cap.safetensors", b"{", declared=HEADER_CAP + 1)
    with path.open("r+b") as fh:
        fh.truncate(HEADER_CAP + 64)  # sparse: the declared length fits in the file

    t0 = time.perf_counter()
    with pytest.raises(ReadError, match="limit") as info:
        read_safetensors(path)
    assert time.perf_counter() - t0 < 0.5
    assert str(path) in str(info.value)


def test_directory_is_a_read_error(tmp_path: Path) -> None:
    with pytest.raises(ReadError, match="is a directory") as info:
        read_safetensors(tmp_path)
    assert info.value.path == str(tmp_path)


def test_symlink_loop_is_a_read_error(tmp_path: Path) -> None:
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(tmp_path / "other")
    (tmp_path / "other").symlink_to(loop)

    with pytest.raises(ReadError, match="symbolic link loop") as info:
        read_safetensors(loop)
    assert str(loop) in str(info.value)


def test_missing_file_is_a_read_error_with_the_os_reason(tmp_path: Path) -> None:
    with pytest.raises(ReadError, match="No such file") as info:
        read_safetensors(tmp_path / "absent.safetensors")
    assert "absent.safetensors" in str(info.value)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)

    with pytest.raises(ReadError, match="not a regular file") as info:
        read_safetensors(fifo)
    assert str(fifo) in str(info.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_a_read_error_with_the_os_reason(tmp_path: Path) -> None:
    path = tmp_path / "locked.safetensors"
    save_file({"w": np.ones(2, dtype=np.float32)}, str(path))
    path.chmod(0)
    try:
        with pytest.raises(ReadError, match="Permission denied") as info:
            read_safetensors(path)
        assert str(path) in str(info.value)
    finally:
        path.chmod(0o644)


def test_os_refusal_to_open_is_a_read_error_with_the_os_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "locked.safetensors"
    save_file({"w": np.ones(2, dtype=np.float32)}, str(path))

    def refuse(*args: Any, **kwargs: Any) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(st_module.os, "open", refuse)
    with pytest.raises(ReadError, match="cannot open: Permission denied") as info:
        read_safetensors(path)
    assert str(path) in str(info.value)


def test_io_error_while_reading_is_a_read_error_with_the_os_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"w": np.ones(2, dtype=np.float32)}, str(path))

    def fail(*args: Any, **kwargs: Any) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(st_module.os, "pread", fail)
    with pytest.raises(ReadError, match="cannot read: Input/output error") as info:
        read_safetensors(path)
    assert str(path) in str(info.value)


def test_reader_does_not_import_torch() -> None:
    code = (
        "import sys, trainmedic.record.safetensors, trainmedic.probes.adapter_weights\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not REAL_ADAPTER.exists(), reason="shared dlm stores not present")
def test_real_dlm_adapter_reads_all_48_tensors_like_safetensors() -> None:
    weights = read_safetensors(REAL_ADAPTER)
    expected = load_file(str(REAL_ADAPTER))

    assert len(weights.header) == 48
    assert weights.config is not None and weights.config["r"] == 8
    for name, want in expected.items():
        np.testing.assert_array_equal(weights.arrays[name], want)
