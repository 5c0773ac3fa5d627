"""Read `torch.save` files (training_state.pt, optimizer.pt) without torch and without running them.

A torch file is a zip archive: `<prefix>/data.pkl` (a pickle) plus one `<prefix>/data/<key>`
record per storage. Unpickling it normally runs whatever code the file names, so the pickle
goes through an allowlist (`_pickle_safe`) and tensors come back as numpy arrays over the
records: memory-mapped when stored uncompressed (torch's default), so nothing is copied.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import sys
import zipfile
import zlib
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

from trainmedic.record._pickle_safe import SafeUnpickler
from trainmedic.record._pickle_scan import check_pickle
from trainmedic.record.errors import ReadError

MAX_PICKLE_BYTES = 256 << 20
# Compressed records have to be inflated into memory; past this total we refuse.
MAX_INFLATED_BYTES = 2 << 30

_MAX_DEFLATE_RATIO = 1032  # deflate cannot expand data more than this
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickled torch magic number
_LEGACY_HINT = "legacy torch format is not supported; re-save with torch>=1.6 (torch.save's zip format)"
_LOCAL_HEADER = struct.Struct("<4s2xHH16xHH")  # signature, flags, method, name length, extra length
# What malformed archives raise from zipfile, zlib, bz2, lzma, struct and the OS.
_ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
    OSError,
    EOFError,
    ValueError,
    NotImplementedError,
    RuntimeError,
    OverflowError,
    KeyError,
    IndexError,
    MemoryError,
)


def load_torch_file(path: str | os.PathLike[str]) -> Any:
    """The object a torch.save file holds, with every tensor as a read-only numpy array.

    Containers come back as dict/OrderedDict/list/tuple/set; `torch.Size` as a tuple, a dtype
    or device as a string. Raises ReadError (UnsafePickleError for a refused global) and
    nothing else; nothing named by the file is imported or called.
    """
    name = os.fspath(path)
    try:
        with _Archive(name) as archive:
            data = archive.read_pickle()
            check_pickle(data, name, archive.prefix + "/data.pkl")
            return SafeUnpickler(data, name, archive.storage).load_checked()
    except ReadError:
        raise
    except _ARCHIVE_ERRORS as exc:
        raise ReadError(name, f"cannot read torch file: {_describe(exc)}") from exc


class _Archive:
    """One open torch zip: its central directory, plus an mmap of the whole file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = _open_regular(path)
        self._inflated = 0
        self._records: dict[str, np.ndarray] = {}
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            if self.size == 0:
                raise ReadError(path, "empty file (0 bytes), not a torch file")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ, **_MMAP_OPTIONS)
            self._zip = self._open_zip()
            self.prefix = self._find_prefix()
            self._check_byteorder()
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        # The map stays open while arrays returned to the caller still point into it.
        self._file.close()

    def read_pickle(self) -> bytes:
        member = f"{self.prefix}/data.pkl"
        info = self._zip.NameToInfo[member]
        if info.file_size > MAX_PICKLE_BYTES:
            raise ReadError(
                self.path, f"{member} declares {info.file_size} bytes, over the {MAX_PICKLE_BYTES} byte limit"
            )
        return bytes(self._read(info, info.file_size))

    def storage(self, key: str, nbytes: int) -> np.ndarray:
        """Storage record `key` whole, as read-only uint8, once it is known to hold `nbytes`."""
        member = f"{self.prefix}/data/{key}"
        info = self._zip.NameToInfo.get(member)
        if info is None:
            raise ReadError(self.path, f"missing storage record {member!r} (data.pkl refers to it)")
        if nbytes > info.file_size:
            raise ReadError(
                self.path,
                f"{self.prefix}/data.pkl declares {nbytes} bytes for storage {key!r} but {member} holds "
                f"{info.file_size}",
            )
        record = self._records.get(key)
        if record is None:
            record = self._records[key] = self._read(info, info.file_size)
        return record

    def _read(self, info: zipfile.ZipInfo, nbytes: int) -> np.ndarray:
        start = self._data_offset(info)
        if nbytes == 0:
            return np.frombuffer(b"", np.uint8)
        if info.compress_type == zipfile.ZIP_STORED:
            return np.frombuffer(self._map, np.uint8, nbytes, start)
        if info.compress_type != zipfile.ZIP_DEFLATED:  # torch's own reader knows no other
            raise ReadError(
                self.path, f"{info.filename}: unsupported zip compression method {info.compress_type}"
            )
        if info.file_size > info.compress_size * _MAX_DEFLATE_RATIO + 64:
            raise ReadError(
                self.path,
                f"{info.filename} declares {info.file_size} bytes from {info.compress_size} compressed "
                "bytes, more than deflate can produce: corrupt",
            )
        self._inflated += nbytes
        if self._inflated > MAX_INFLATED_BYTES:
            raise ReadError(
                self.path,
                f"compressed records would inflate past {MAX_INFLATED_BYTES} bytes; "
                "re-save without compression (torch.save's default)",
            )
        with self._zip.open(info) as stream:
            data = stream.read(nbytes)
        if len(data) != nbytes:
            raise ReadError(self.path, f"{info.filename} is truncated ({len(data)} of {nbytes} bytes)")
        return np.frombuffer(data, np.uint8)

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a record's bytes start: after its local header, whose extra field torch uses as
        alignment padding and the central directory does not repeat."""
        at = info.header_offset
        if at < 0 or at + _LOCAL_HEADER.size > self.size:
            raise ReadError(self.path, f"{info.filename}: local zip header lies outside the file")
        signature, flags, method, name_len, extra_len = _LOCAL_HEADER.unpack_from(self._map, at)
        start = at + _LOCAL_HEADER.size + name_len + extra_len
        name = self._map[at + _LOCAL_HEADER.size : at + _LOCAL_HEADER.size + name_len]
        expected = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
        if signature != b"PK\x03\x04" or name != expected or method != info.compress_type:
            raise ReadError(self.path, f"{info.filename}: local zip header does not match the zip directory")
        if flags & 0x1:
            raise ReadError(self.path, f"{info.filename} is encrypted")
        stored = info.compress_type == zipfile.ZIP_STORED
        if stored and info.compress_size != info.file_size:
            raise ReadError(self.path, f"{info.filename}: stored record with mismatched sizes")
        if start + info.compress_size > self.size:
            raise ReadError(
                self.path,
                f"{info.filename} declares {info.compress_size} bytes at offset {start}, past the end "
                f"of the file ({self.size} bytes): truncated or corrupt",
            )
        return start

    def _open_zip(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self._file)
        except zipfile.BadZipFile as exc:
            head = self._map[:512]
            if head.startswith(_LEGACY_MAGIC) or head[257:262] == b"ustar":
                raise ReadError(self.path, _LEGACY_HINT) from None
            if head.startswith(b"PK"):
                raise ReadError(self.path, f"truncated or corrupt zip archive ({exc})") from None
            raise ReadError(
                self.path, "not a torch file: expected the zip archive torch.save writes"
            ) from None

    def _find_prefix(self) -> str:
        # torch names the top folder after the file it first saved to; take whichever holds data.pkl.
        for info in self._zip.infolist():
            folder, _, leaf = info.filename.partition("/")
            if leaf == "data.pkl" and folder:
                return folder
        raise ReadError(self.path, "zip archive has no <name>/data.pkl: not a torch.save file")

    def _check_byteorder(self) -> None:
        info = self._zip.NameToInfo.get(f"{self.prefix}/byteorder")
        if info is None:  # files from before torch 1.10 have none and are little-endian
            return
        order = bytes(self._read(info, min(info.file_size, 16))).strip()
        if order == b"big":
            raise ReadError(
                self.path, "written on a big-endian machine; only little-endian torch files are supported"
            )
        if order != b"little":
            raise ReadError(self.path, f"unknown byteorder record {order[:16]!r}")


# On Python >= 3.13 the map need not hold a second file descriptor while arrays use it.
_MMAP_OPTIONS: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def _open_regular(path: str) -> BinaryIO:
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise ReadError(path, "is a directory, expected a torch .pt file")
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            raise ReadError(path, "is not a regular file")
        return open(path, "rb")
    except OSError as exc:
        raise ReadError(path, f"cannot open: {exc.strerror or exc}") from None


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, zipfile.BadZipFile | OSError) else f"{type(exc).__name__}: {text}"
