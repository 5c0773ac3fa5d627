"""An unpickler for torch.save's data.pkl that can only build containers and numpy arrays.

`find_class` answers from an allowlist with our own replacements, never the real torch objects:
the tensor-rebuild records become numpy views over the archive's storages, storage and dtype
globals become inert markers, `torch.Size` becomes a tuple. Every other global is refused
before anything runs, so a crafted file cannot execute code through REDUCE/INST/OBJ.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from trainmedic.record.errors import ReadError, UnsafePickleError

# Bytes of one storage record, exactly `nbytes` long (memory-mapped or copied by the caller).
StorageLoader = Callable[[str, int], np.ndarray]

# torch dtype name -> little-endian numpy layout of its bytes; None: a known dtype we cannot decode.
_DTYPES: dict[str, str | None] = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "<u2",  # no numpy bfloat16: widened to float32 on load
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint8": "u1",
    "bool": "?",
    "complex128": "<c16",
    "complex64": "<c8",
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
    **dict.fromkeys(
        (
            "complex32",
            "float8_e4m3fn",
            "float8_e4m3fnuz",
            "float8_e5m2",
            "float8_e5m2fnuz",
            "float8_e8m0fnu",
            "float4_e2m1fn_x2",
            "qint8",
            "qint32",
            "quint8",
            "quint4x2",
            "quint2x4",
        )
    ),
}
_ITEMSIZE = {name: np.dtype(layout).itemsize for name, layout in _DTYPES.items() if layout}
_STORAGE_CLASSES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "UntypedStorage": "uint8",
}
# A view may address more elements than its storage holds only by repeating them (stride 0,
# as `expand` saves); beyond this many elements that is a decompression bomb for consumers.
_MAX_REPEATED_ELEMENTS = 1 << 28
_MAX_DIMS = 64


class _Marker(str):
    """An inert stand-in for a torch global: a str (plain if it reaches the caller), and with no
    `__dict__`, so a BUILD opcode cannot alter the shared instances."""

    __slots__ = ()


_TENSOR_CLASSES = (
    "torch.Tensor",
    "torch._tensor.Tensor",
    "torch.nn.parameter.Parameter",
    "torch.nn.Parameter",
)
_TENSOR_TYPES = {_Marker(n): n for n in _TENSOR_CLASSES}
# marker -> torch dtype name it stands for (storage classes and dtypes alike)
_MARKER_DTYPES: dict[_Marker, str] = {_Marker(f"torch.{n}"): n for n in _DTYPES}
_STORAGE_TYPES: dict[_Marker, str] = {_Marker(f"torch.{c}"): n for c, n in _STORAGE_CLASSES.items()}
_STORAGE_TYPES[_Marker("torch.storage.UntypedStorage")] = "uint8"
_MARKERS = {str(m): m for m in (*_TENSOR_TYPES, *_MARKER_DTYPES, *_STORAGE_TYPES)}


class _Refused(Exception):
    """A replacement callable got arguments torch never writes; reported as a ReadError."""


class SafeUnpickler(pickle.Unpickler):
    """Unpickles one data.pkl; storage bytes come from `load_storage(key, nbytes)`.

    Replacement callables are bound methods (a BUILD opcode cannot set attributes on them), and
    none of them iterates over an array, so a crafted REDUCE cannot blow a storage up into
    millions of Python objects.
    """

    def __init__(self, data: bytes, path: str, load_storage: StorageLoader) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path
        self._load_storage = load_storage
        # id(storage array) -> (record key, byte count, the array itself so the id stays valid)
        self._storages: dict[int, tuple[str, int, np.ndarray]] = {}
        self._typed: dict[tuple[str, str], np.ndarray] = {}
        self._rebuilders = (self._rebuild_tensor, self._rebuild_tensor_v2, self._rebuild_tensor_v3)
        self._globals: dict[str, Any] = {
            **_MARKERS,
            **{f"torch._utils.{f.__name__}": f for f in self._rebuilders},
            "torch._tensor._rebuild_from_type_v2": self._rebuild_from_type_v2,
            "torch._utils._rebuild_parameter": self._parameter,
            "torch._utils._rebuild_parameter_with_state": self._parameter,
            "collections.OrderedDict": self._ordered_dict,
            "torch.Size": self._size,
            "torch.device": self._device,
            "_codecs.encode": self._encode,
        }
        builtin = {"set": self._set, "frozenset": self._frozenset, "complex": self._complex}
        builtin |= {"bytes": self._bytes, "bytearray": self._bytearray}
        self._globals.update({f"builtins.{name}": f for name, f in builtin.items()})

    def load_checked(self) -> Any:
        """`load()`, with every failure the (possibly hostile) stream provokes as a ReadError."""
        try:
            return self.load()
        except ReadError:
            raise
        except _Refused as exc:
            raise self._error(f"refused unexpected call {exc}") from None
        except RecursionError:
            raise self._error("objects are nested too deeply") from None
        except MemoryError:
            raise self._error("needs more memory than is available") from None
        except Exception as exc:
            raise ReadError(self._path, f"data.pkl is corrupt: {type(exc).__name__}: {exc}") from None

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles use Python 2 names (`__builtin__.set`); read them as Python 3 would.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        found = self._globals.get(full)
        if found is None:
            raise UnsafePickleError(self._path, full)
        return found

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and _text(pid[0]) == "storage"):
            raise self._error(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        dtype_name = _lookup(_STORAGE_TYPES, storage_type)
        if dtype_name is None:
            raise self._error(f"unsupported storage type {storage_type!r:.60}")
        key = _text(key)
        if key is None or type(numel) is not int or numel < 0:
            raise self._error(f"bad storage record ({key!r:.40}, numel={numel!r:.40})")
        nbytes = numel * _ITEMSIZE[dtype_name]
        array = self._typed_storage(key, nbytes, dtype_name)
        self._storages[id(array)] = (key, nbytes, array)
        return array

    def _typed_storage(self, key: str, nbytes: int, dtype_name: str) -> np.ndarray:
        layout = _DTYPES[dtype_name]
        if layout is None:
            raise self._error(f"torch.{dtype_name} tensors are not supported")
        raw = self._load_storage(key, nbytes)  # checks the record holds nbytes
        item = _ITEMSIZE[dtype_name]
        # Whole records are typed once per dtype, so a pickle naming one record many times with
        # different sizes cannot make us convert (bf16) or map it over and over.
        whole = self._typed.get((key, dtype_name))
        if whole is None:
            whole = raw[: raw.size - raw.size % item].view(layout)
            if dtype_name == "bfloat16":  # bf16 is the top half of a float32
                whole = (whole.astype(np.uint32) << 16).view(np.float32)
                whole.flags.writeable = False
            self._typed[(key, dtype_name)] = whole
        return whole[: nbytes // item]

    def _storage(self, storage: Any) -> tuple[str, int, np.ndarray]:
        entry = self._storages.get(id(storage))
        if entry is None or entry[2] is not storage:
            raise self._error(f"a tensor is built from {type(storage).__name__}, not a storage record")
        return entry

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any) -> np.ndarray:
        return self._view(self._storage(storage)[2], offset, size, stride)

    def _rebuild_tensor_v2(self, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> np.ndarray:
        # rest: requires_grad, backward_hooks[, metadata]
        return _apply_metadata(self._rebuild_tensor(storage, offset, size, stride), rest[2:3])

    def _rebuild_tensor_v3(self, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> np.ndarray:
        # rest: requires_grad, backward_hooks, dtype[, metadata]; the storage holds untyped bytes.
        key, nbytes, _ = self._storage(storage)
        dtype_name = _lookup(_MARKER_DTYPES, rest[2] if len(rest) > 2 else None)
        if dtype_name is None:
            raise self._error("_rebuild_tensor_v3 without a torch dtype")
        typed = self._typed_storage(key, nbytes, dtype_name)
        return _apply_metadata(self._view(typed, offset, size, stride), rest[3:4])

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, _state: Any = None) -> Any:
        # A tensor carrying Python attributes; the attributes are dropped.
        if func not in self._rebuilders or _lookup(_TENSOR_TYPES, new_type) is None:
            raise self._error(f"unsupported tensor subclass rebuild ({new_type!r:.60})")
        if not isinstance(args, tuple):
            raise _Refused(f"_rebuild_from_type_v2 args {type(args).__name__}")
        return func(*args)

    def _view(self, storage: np.ndarray, offset: Any, size: Any, stride: Any) -> np.ndarray:
        layout = _layout(offset, size, stride)
        if layout is None:
            raise self._error(
                f"bad tensor layout (offset={offset!r:.30}, size={size!r:.60}, stride={stride!r:.60})"
            )
        count, last = layout
        if count == 0:
            empty = np.empty(size, storage.dtype)
            empty.flags.writeable = False
            return empty
        held = storage.shape[0]
        if last >= held:
            raise self._error(
                f"a tensor of size {list(size)} (offset {offset}, stride {list(stride)}) reaches "
                f"element {last} of a storage holding {held}"
            )
        if count > held and count > _MAX_REPEATED_ELEMENTS:
            raise self._error(f"a tensor of size {list(size)} repeats a storage of {held} elements")
        item = storage.itemsize
        return np.ndarray(size, storage.dtype, storage, offset * item, [s * item for s in stride])

    # Replacements for the few non-tensor globals torch writes; each accepts only what torch does.
    def _parameter(self, data: Any, *_rest: Any) -> np.ndarray:
        if not isinstance(data, np.ndarray):
            raise _Refused(f"Parameter({type(data).__name__})")
        return data

    def _ordered_dict(self, *args: Any) -> OrderedDict[Any, Any]:
        if len(args) > 1 or (args and not isinstance(args[0], list | tuple | dict)):
            raise _Refused(f"OrderedDict({_types(args)})")
        return OrderedDict(*args)

    def _size(self, dims: Any = ()) -> tuple[Any, ...]:
        if not isinstance(dims, list | tuple):
            raise _Refused(f"torch.Size({_types((dims,))})")
        return tuple(dims)

    def _device(self, kind: Any, index: Any = None) -> str:
        if not isinstance(kind, str) or not (index is None or type(index) is int):
            raise _Refused(f"torch.device({_types((kind, index))})")
        return kind if index is None else f"{kind}:{index}"

    def _encode(self, text: Any, encoding: Any = "latin1") -> bytes:
        # Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1'); nothing else is allowed.
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise _Refused(f"_codecs.encode({_types((text, encoding))})")
        return text.encode("latin1")

    def _bytes(self, *args: Any) -> bytes:
        if (args and not isinstance(args[0], bytes | bytearray)) or len(args) > 1:
            raise _Refused(f"bytes({_types(args)})")  # bytes(10**12) would allocate a terabyte
        return bytes(*args)

    def _bytearray(self, *args: Any) -> bytearray:
        if (args and not isinstance(args[0], bytes | bytearray)) or len(args) > 1:
            raise _Refused(f"bytearray({_types(args)})")
        return bytearray(*args)

    def _set(self, *args: Any) -> set[Any]:
        return set(_items(args, "set"))

    def _frozenset(self, *args: Any) -> frozenset[Any]:
        return frozenset(_items(args, "frozenset"))

    def _complex(self, real: Any = 0.0, imag: Any = 0.0) -> complex:
        if type(real) not in (int, float) or type(imag) not in (int, float):
            raise _Refused(f"complex({_types((real, imag))})")
        return complex(real, imag)

    def _error(self, message: str) -> ReadError:
        return ReadError(self._path, f"data.pkl: {message}")


def _lookup(table: Any, value: Any) -> Any:
    # Markers compare equal to plain strings; only our own instances may match.
    return table.get(value) if type(value) is _Marker else None


def _items(args: tuple[Any, ...], name: str) -> Any:
    if not args:
        return ()
    if len(args) > 1 or not isinstance(args[0], list | tuple | set | frozenset):
        raise _Refused(f"{name}({_types(args)})")
    return args[0]


def _types(args: tuple[Any, ...]) -> str:
    return ", ".join(type(a).__name__ for a in args)


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):  # files from Python 2 era torch store ASCII bytes here
        return value.decode("ascii", "replace")
    return None


def _layout(offset: Any, size: Any, stride: Any) -> tuple[int, int] | None:
    """(element count, last element addressed) of a well-formed view, else None."""
    if type(offset) is not int or offset < 0 or not isinstance(size, tuple | list):
        return None
    if not isinstance(stride, tuple | list) or len(size) != len(stride) or len(size) > _MAX_DIMS:
        return None
    count, last = 1, offset
    for n, s in zip(size, stride, strict=True):
        if type(n) is not int or type(s) is not int or n < 0 or s < 0:
            return None
        count *= n
        last += (n - 1) * s
    return count, last


def _apply_metadata(array: np.ndarray, metadata: tuple[Any, ...]) -> np.ndarray:
    # torch records lazily negated/conjugated views as flags instead of rewriting the data.
    flags = metadata[0] if metadata else None
    if not flags:
        return array
    if not isinstance(flags, dict):
        raise _Refused(f"tensor metadata {type(flags).__name__}")
    if flags.get("neg"):
        array = np.negative(array)
    if flags.get("conj"):
        array = np.conj(array)
    array.flags.writeable = False
    return array
