"""Read a safetensors file's header, and map its tensors on demand, without torch.

The format is an 8-byte little-endian header length `N`, `N` bytes of JSON (tensor name ->
dtype, shape, byte offsets into the data section; plus optional `__metadata__`), then the data.
Every field is validated against the file's real size before anything is mapped, so a hostile
header cannot make the reader allocate what it declares: sizes are checked, not trusted.
"""

from __future__ import annotations

import errno
import math
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from trainmedic.record.errors import ReadError
from trainmedic.run import AdapterWeights, TensorInfo

# A real header is a few KB (a 70B model's is ~1 MB); refuse absurd lengths before reading them.
HEADER_CAP = 100 * 1024 * 1024
CONFIG_CAP = 16 * 1024 * 1024

_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened to float32 on access
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    # 8-bit floats numpy cannot represent: exposed as their raw bytes (uint8).
    "F8_E4M3": np.dtype("u1"),
    "F8_E5M2": np.dtype("u1"),
    "F8_E8M0": np.dtype("u1"),
}
# Dtypes whose arrays are undecoded bytes: consumers must not treat them as numbers.
RAW_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F8_E8M0"})
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

ADAPTER_CONFIG = "adapter_config.json"


def read_safetensors(
    path: str | os.PathLike[str], *, config_path: str | os.PathLike[str] | None = None
) -> AdapterWeights:
    """Read and validate the header of `path`; tensors are memory-mapped only when accessed.

    Without `config_path`, an `adapter_config.json` beside the file is loaded as the config.
    Raises `ReadError` (naming the file, and the tensor where one is at fault) for anything else.
    """
    source = Path(path)
    fd = _open_regular(source)
    try:
        size = os.fstat(fd).st_size
        header_len, raw = _read_header_bytes(source, fd, size)
    finally:
        os.close(fd)
    data_offset = 8 + header_len
    header, metadata = _parse_header(source, raw, size - data_offset)
    if config_path is not None:
        config: dict[str, Any] | None = read_json_object(Path(config_path), what="adapter config")
    else:
        beside = source.parent / ADAPTER_CONFIG
        config = read_json_object(beside, what="adapter config") if os.path.lexists(beside) else None
    return AdapterWeights(
        source=source,
        header=header,
        arrays=LazyTensors(source, header, data_offset, size),
        config=config,
        metadata=metadata,
    )


class LazyTensors(Mapping[str, np.ndarray]):
    """Tensors of one safetensors file, keyed like its header, mapped when first asked for.

    The data section is memory-mapped once (read-only); each tensor is a view into it, so only
    the pages actually touched are read. BF16 is widened to float32 (a copy) since numpy has no
    bfloat16; `raw()` gives the stored bits without the copy.
    """

    def __init__(self, source: Path, header: dict[str, TensorInfo], data_offset: int, size: int) -> None:
        self._source = source
        self._header = header
        self._data_offset = data_offset
        self._size = size
        self._data: np.ndarray | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        raw = self.raw(name)
        if self._header[name].dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._header)

    def __len__(self) -> int:
        return len(self._header)

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored: BF16 as uint16 bit patterns, 8-bit floats as uint8 bytes."""
        info = self._header[name]
        dtype = _DTYPES[info.dtype]
        count = math.prod(info.shape)
        if count == 0:
            return np.zeros(info.shape, dtype=dtype)
        flat = self._section()[info.start : info.end]
        return flat.view(dtype).reshape(info.shape)

    def _section(self) -> np.ndarray:
        if self._data is None:
            try:
                if os.path.getsize(self._source) < self._size:
                    raise ReadError(self._source, "file shrank after its header was read")
                mapped = np.memmap(
                    self._source, dtype=np.uint8, mode="r", offset=self._data_offset,
                    shape=(self._size - self._data_offset,),
                )  # fmt: skip
                # A plain ndarray view (its base keeps the map alive) slices without memmap's overhead.
                self._data = mapped.view(np.ndarray)
            except OSError as exc:
                raise ReadError(self._source, f"cannot map the tensor data: {_os_reason(exc)}") from None
            except ValueError as exc:
                raise ReadError(self._source, f"cannot map the tensor data: {exc}") from None
        return self._data


def read_json_object(path: Path, *, what: str) -> dict[str, Any]:
    """A small JSON file holding one object (e.g. adapter_config.json), or ReadError naming it."""
    fd = _open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > CONFIG_CAP:
            raise ReadError(path, f"{what} is {size} bytes; refusing more than {CONFIG_CAP}")
        data = _read_exact(path, fd, 0, size)
    finally:
        os.close(fd)
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ReadError(path, f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ReadError(path, f"{what} must be a JSON object, got {_json_type(obj)}")
    return obj


def _open_regular(path: Path) -> int:
    """Open for reading without blocking (a FIFO would hang a plain open) and insist on a file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ReadError(path, "symbolic link loop (too many levels of symbolic links)") from None
        if exc.errno == errno.EISDIR or path.is_dir():
            raise ReadError(path, "is a directory, not a file") from None
        raise ReadError(path, f"cannot open: {_os_reason(exc)}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise ReadError(path, f"cannot stat: {_os_reason(exc)}") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ReadError(path, f"is {kind}, not a file")
    return fd


def _read_exact(path: Path, fd: int, offset: int, n: int) -> bytes:
    try:
        data = os.pread(fd, n, offset)
    except OSError as exc:
        raise ReadError(path, f"cannot read: {_os_reason(exc)}") from None
    if len(data) != n:
        raise ReadError(path, f"file ended early: read {len(data)} of {n} bytes at offset {offset}")
    return data


def _read_header_bytes(path: Path, fd: int, size: int) -> tuple[int, bytes]:
    if size == 0:
        raise ReadError(path, "empty file (0 bytes): not a safetensors file")
    if size < 8:
        raise ReadError(path, f"file is {size} bytes, too short for the 8-byte safetensors header length")
    n = int.from_bytes(_read_exact(path, fd, 0, 8), "little")
    if n > size - 8:
        raise ReadError(
            path,
            f"declared header length {n} bytes exceeds the file ({size} bytes): truncated or not safetensors",
        )
    if n > HEADER_CAP:
        raise ReadError(path, f"declared header length {n} bytes exceeds the {HEADER_CAP}-byte limit")
    return n, _read_exact(path, fd, 8, n)


def _parse_header(path: Path, raw: bytes, data_len: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ReadError(path, f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ReadError(path, f"safetensors header must be a JSON object, got {_json_type(obj)}")
    metadata = _parse_metadata(path, obj.pop("__metadata__", None))
    header = {name: _parse_entry(path, name, entry, data_len) for name, entry in obj.items()}
    return header, metadata


def _parse_metadata(path: Path, meta: Any) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ReadError(path, f"__metadata__ must be an object of strings, got {_json_type(meta)}")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise ReadError(path, f"__metadata__[{key!r}] must be a string, got {_json_type(value)}")
    return meta


def _parse_entry(path: Path, name: str, entry: Any, data_len: int) -> TensorInfo:
    def bad(why: str) -> ReadError:
        return ReadError(path, f"tensor {name!r}: {why}")

    if not isinstance(entry, dict):
        raise bad(f"header entry must be an object, got {_json_type(entry)}")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        known = ", ".join(_DTYPES)
        raise bad(f"unsupported dtype {dtype!r} (known: {known})")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"shape must be a list of non-negative integers, got {_short(shape)}")
    offsets = entry.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise bad(f"data_offsets must be [start, end] of non-negative integers, got {_short(offsets)}")
    start, end = offsets
    if end < start:
        raise bad(f"data_offsets end {end} is before start {start}")
    if end > data_len:
        raise bad(f"data_offsets [{start}, {end}] run past the data section ({data_len} bytes)")
    nbytes = _nbytes(shape, _DTYPES[dtype].itemsize, limit=data_len)
    if nbytes is None:
        raise bad(
            f"shape {_short(shape)} of {dtype} is larger than the whole data section ({data_len} bytes)"
        )
    if nbytes != end - start:
        raise bad(
            f"shape {_short(shape)} of {dtype} needs {nbytes} bytes but data_offsets span {end - start}"
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), start=start, end=end)


def _nbytes(shape: list[int], itemsize: int, *, limit: int) -> int | None:
    """Byte size of `shape`, or None once it exceeds `limit` (a hostile shape stays cheap)."""
    if 0 in shape:
        return 0
    total = itemsize
    for dim in shape:
        total *= dim
        if total > limit:
            return None
    return total


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _json_type(x: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(x), "a number"
    )


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
