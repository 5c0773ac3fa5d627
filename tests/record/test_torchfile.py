"""The torch-free reader of torch.save files: faithful on real files, inert on hostile ones."""

from __future__ import annotations

import io
import mmap
import os
import pickle
import pickletools
import stat
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainmedic.record import torchfile
from trainmedic.record._pickle_scan import _ARGS, _UNKNOWN
from trainmedic.record.errors import ReadError, UnsafePickleError
from trainmedic.record.torchfile import load_torch_file

DLM_STATE = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "dlm_stores"
    / "healthy"
    / "adapter"
    / "versions"
    / "v0001"
    / "training_state.pt"
)


# --- building files ---------------------------------------------------------------------------


def write_archive(
    path: Path,
    data_pkl: bytes,
    records: dict[str, bytes] | None = None,
    byteorder: bytes | None = b"little",
    prefix: str = "archive",
) -> Path:
    """A zip with torch's layout around a hand-made data.pkl."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl)
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, blob in (records or {}).items():
            zf.writestr(f"{prefix}/data/{key}", blob)
        zf.writestr(f"{prefix}/version", b"3\n")
    return path


def rezip(src: Path, dst: Path, *, drop: str = "", compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            if info.filename != drop:
                zout.writestr(info.filename, zin.read(info), compress_type=compression)
    return dst


class Op:
    """Raw protocol-2 opcodes, to write exactly the pickle a test needs."""

    @staticmethod
    def text(value: str) -> bytes:
        raw = value.encode()
        return b"X" + struct.pack("<I", len(raw)) + raw

    @staticmethod
    def int(value: int) -> bytes:
        if -(2**31) <= value < 2**31:
            return b"J" + struct.pack("<i", value)
        raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(raw)]) + raw

    @staticmethod
    def tuple(*items: bytes) -> bytes:
        return b"(" + b"".join(items) + b"t"

    @staticmethod
    def glob(module: str, name: str) -> bytes:
        return f"c{module}\n{name}\n".encode()

    @classmethod
    def storage(cls, numel: int, key: str = "0", kind: str = "FloatStorage") -> bytes:
        fields = (
            cls.text("storage"),
            cls.glob("torch", kind),
            cls.text(key),
            cls.text("cpu"),
            cls.int(numel),
        )
        return cls.tuple(*fields) + b"Q"

    @classmethod
    def tensor(cls, storage: bytes, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> bytes:
        hooks = cls.glob("collections", "OrderedDict") + b")R"
        args = cls.tuple(
            storage,
            cls.int(offset),
            cls.tuple(*map(cls.int, size)),
            cls.tuple(*map(cls.int, stride)),
            b"\x89",
            hooks,
        )
        return cls.glob("torch._utils", "_rebuild_tensor_v2") + args + b"R"

    @staticmethod
    def program(body: bytes) -> bytes:
        return b"\x80\x02" + body + b"."


def float_records(n: int = 4) -> dict[str, bytes]:
    return {"0": np.arange(n, dtype="<f4").tobytes()}


# --- comparing with torch ---------------------------------------------------------------------


def assert_same(ours: Any, theirs: Any, where: str = "obj") -> None:
    torch = pytest.importorskip("torch")
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, np.ndarray), where
        expected = theirs.detach().resolve_neg().resolve_conj()
        if expected.dtype == torch.bfloat16:
            expected = expected.float()
        expected_np = expected.numpy()
        assert ours.dtype == expected_np.dtype, where
        assert ours.shape == expected_np.shape, where
        np.testing.assert_array_equal(ours, expected_np, err_msg=where)
    elif isinstance(theirs, torch.Size):
        assert ours == tuple(theirs), where
    elif isinstance(theirs, torch.dtype | torch.device):
        assert ours == str(theirs), where
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs), where
        assert list(ours) == list(theirs), where
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{where}[{key!r}]")
    elif isinstance(theirs, list | tuple):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert type(ours) is type(theirs) and ours == theirs, where


def roundtrip(tmp_path: Path, obj: Any, name: str = "obj.pt") -> tuple[Any, Any]:
    torch = pytest.importorskip("torch")
    path = tmp_path / name
    torch.save(obj, path)
    return load_torch_file(path), torch.load(path, weights_only=True)


def backed_by_mmap(array: np.ndarray) -> bool:
    base: Any = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap)


def adamw_state(torch: Any, shapes: list[tuple[int, int]], groups: int = 1) -> dict[str, Any]:
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    split = len(params) // groups
    param_groups = [{"params": params[i * split : (i + 1) * split]} for i in range(groups)]
    opt = torch.optim.AdamW(param_groups, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt.state_dict()


# --- round trips ------------------------------------------------------------------------------


DTYPES = [
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
    "complex64",
    "uint16",
    "uint32",
    "uint64",
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_supported_dtype_matches_torch_load(tmp_path: Path, dtype: str) -> None:
    torch = pytest.importorskip("torch")
    values = torch.arange(-3, 9).reshape(3, 4)
    tensor = (values > 2) if dtype == "bool" else values.abs().to(getattr(torch, dtype))
    ours, theirs = roundtrip(tmp_path, {"t": tensor, "scalar": tensor[1, 2].clone()})
    assert_same(ours, theirs)
    assert ours["scalar"].shape == ()


def test_bfloat16_widens_to_float32_exactly(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    tensor = torch.tensor([1.0, -2.5, 3.140625, 1e-20, float("inf")], dtype=torch.bfloat16)
    ours, _ = roundtrip(tmp_path, tensor)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, tensor.float().numpy())


def test_views_sharing_a_storage_keep_offsets_strides_and_share_memory(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    base = torch.arange(24.0).reshape(4, 6)
    views = {
        "base": base,
        "rows": base[1:3],
        "every_other": base[:, ::2],
        "transposed": base.t(),
        "row": base[2],
        "element": base[3, 5],
        "expanded": torch.arange(3.0).expand(4, 3),
        "empty": base[:0],
        "negated": torch.ones(3)._neg_view(),
    }
    ours, theirs = roundtrip(tmp_path, views)
    assert_same(ours, theirs)
    assert np.shares_memory(ours["base"], ours["every_other"])
    assert np.shares_memory(ours["rows"], ours["transposed"])
    assert ours["transposed"].strides == (4, 24)
    assert ours["element"].shape == () and float(ours["element"]) == 23.0


def test_containers_and_scalars_match_torch_load(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    tagged = torch.ones(2)
    tagged.note = "python attribute"  # saved through _rebuild_from_type_v2
    obj = {
        "ordered": OrderedDict([("b", 1), ("a", [1.5, None, True])]),
        "nested": {"x": ({"y": (1, 2)}, [3])},
        "big": 2**100,
        "negative": -7,
        "bytes": b"\x00\xffabc",
        "text": "naïve",
        "size": torch.Size([2, 3]),
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "grad": torch.zeros(3, requires_grad=True),
        "tagged": tagged,
        "complex": 1 + 2j,
    }
    ours, theirs = roundtrip(tmp_path, obj)
    assert_same(ours, theirs)
    # torch.load(weights_only=True) itself refuses these; compare with what was saved.
    plain = {"set": {1, 2}, "frozen": frozenset({"a"}), "empty_bytes": b"", "bytearray": bytearray(b"ab")}
    torch.save(plain, tmp_path / "plain.pt")
    assert load_torch_file(tmp_path / "plain.pt") == plain


def test_dlm_like_training_state_matches_torch_load(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    state = {
        "global_step": 150,
        "epoch": 1.0,
        "best_val_loss": 0.319,
        "use_qlora": False,
        "optimizer_state_dict": adamw_state(torch, [(8, 64), (64, 8), (8, 64), (32, 8)]),
        "scheduler_state_dict": {"last_epoch": 150, "_last_lr": [0.0]},
        "scaler_state_dict": None,
        "torch_rng_state": torch.get_rng_state(),
        "pinned_versions": OrderedDict(torch="2.13.0"),
    }
    ours, theirs = roundtrip(tmp_path, state, "training_state.pt")
    assert_same(ours, theirs)
    moments = ours["optimizer_state_dict"]["state"][3]
    assert (
        moments["step"].shape == () and moments["step"].dtype == np.float32 and float(moments["step"]) == 1.0
    )
    assert ours["torch_rng_state"].dtype == np.uint8 and ours["torch_rng_state"].size > 5000


def test_hf_optimizer_file_with_two_param_groups_matches_torch_load(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    state = adamw_state(torch, [(16, 4), (4, 16), (16,), (4,)], groups=2)
    ours, theirs = roundtrip(tmp_path, state, "optimizer.pt")
    assert_same(ours, theirs)
    assert sorted(ours["state"]) == [0, 1, 2, 3]
    assert [g["params"] for g in ours["param_groups"]] == [[0, 1], [2, 3]]
    assert set(ours["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_stored_storages_are_memory_mapped_not_copied(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    ours, _ = roundtrip(tmp_path, {"a": torch.randn(64, 64), "b": torch.arange(10)[2:]})
    assert backed_by_mmap(ours["a"]) and backed_by_mmap(ours["b"])
    assert not ours["a"].flags.writeable


def test_compressed_records_are_read_and_match(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    tensor = torch.randn(32, 8)
    torch.save({"t": tensor, "v": tensor[:, 1]}, tmp_path / "plain.pt")
    deflated = rezip(tmp_path / "plain.pt", tmp_path / "deflated.pt", compression=zipfile.ZIP_DEFLATED)
    ours = load_torch_file(deflated)
    np.testing.assert_array_equal(ours["t"], tensor.numpy())
    np.testing.assert_array_equal(ours["v"], tensor[:, 1].numpy())
    assert not backed_by_mmap(ours["t"])


@pytest.mark.parametrize("protocol", range(6))
def test_plain_pickles_of_every_protocol_load_like_pickle(tmp_path: Path, protocol: int) -> None:
    obj = {"a": [1, 2.5, None, True], "b": b"x" * 70_000, "c": ("s", {3, 4}), "d": frozenset({1}), "e": 2j}
    obj["shared"] = [obj["a"], obj["a"]]  # memo references
    path = write_archive(tmp_path / f"p{protocol}.pt", pickle.dumps(obj, protocol=protocol))
    assert load_torch_file(path) == pickle.loads(pickle.dumps(obj, protocol=protocol))


def test_real_dlm_training_state_loads() -> None:
    if not DLM_STATE.is_file():
        pytest.skip(f"{DLM_STATE} not present")
    state = load_torch_file(DLM_STATE)
    assert type(state["global_step"]) is int and state["global_step"] == 150
    moments = state["optimizer_state_dict"]["state"]
    assert len(moments) == 48
    for entry in moments.values():
        assert isinstance(entry["exp_avg_sq"], np.ndarray) and entry["exp_avg_sq"].dtype == np.float32
        assert entry["exp_avg_sq"].shape == entry["exp_avg"].shape and (entry["exp_avg_sq"] >= 0).all()
        assert backed_by_mmap(entry["exp_avg_sq"])


def test_loading_never_imports_torch(tmp_path: Path) -> None:
    target = DLM_STATE
    if not target.is_file():
        target = write_archive(
            tmp_path / "t.pt", Op.program(Op.tensor(Op.storage(4), (4,), (1,))), float_records()
        )
    code = (
        "import sys; from trainmedic.record.torchfile import load_torch_file; "
        f"load_torch_file({str(target)!r}); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr


# --- hostile pickles --------------------------------------------------------------------------


class _Reduce:
    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (pickle that would create `marker`, the global it must be refused for)."""
    touch = f"touch {marker}"
    write = f"open({str(marker)!r}, 'w').close()"
    return {
        "global_os_system": (
            Op.program(Op.glob("posix", "system") + Op.text(touch) + b"\x85R"),
            "posix.system",
        ),
        "global_named_os": (Op.program(Op.glob("os", "system") + Op.text(touch) + b"\x85R"), "os.system"),
        "stack_global": (
            b"\x80\x04" + b"\x8c\x02os" + b"\x8c\x06system" + b"\x93" + Op.text(touch) + b"\x85R.",
            "os.system",
        ),
        "inst": (f"(S'{touch}'\nios\nsystem\n.".encode(), "os.system"),
        "obj": (f"(cos\nsystem\nS'{touch}'\no.".encode(), "os.system"),
        "exec": (pickle.dumps(_Reduce(exec, write), protocol=2), "builtins.exec"),
        "eval": (pickle.dumps(_Reduce(eval, write), protocol=4), "builtins.eval"),
        "popen_py2_name": (
            pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(marker)]), protocol=2),
            "subprocess.Popen",
        ),
        "popen": (
            pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(marker)]), protocol=4),
            "subprocess.Popen",
        ),
        "nested_in_state_dict": (
            pickle.dumps(
                {"global_step": 1, "optimizer_state_dict": OrderedDict(state={0: _Reduce(os.system, touch)})},
                protocol=2,
            ),
            "posix.system",
        ),
        "inside_tensor_args": (
            Op.program(
                Op.glob("torch._utils", "_rebuild_tensor_v2")
                + Op.tuple(Op.glob("posix", "system") + Op.text(touch) + b"\x85R")
                + b"R"
            ),
            "posix.system",
        ),
        "numpy_reconstruct": (pickle.dumps(np.zeros(3), protocol=2), "numpy._core.multiarray._reconstruct"),
        "old_numpy_reconstruct": (
            Op.program(Op.glob("numpy.core.multiarray", "_reconstruct") + b")R"),
            "numpy.core.multiarray._reconstruct",
        ),
    }


PAYLOADS = list(_payloads(Path("/x")))


@pytest.mark.parametrize("name", PAYLOADS)
def test_hostile_pickle_is_refused_naming_the_global_and_runs_nothing(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    payload, global_name = _payloads(marker)[name]
    path = write_archive(tmp_path / "training_state.pt", payload)
    with pytest.raises(UnsafePickleError) as caught:
        load_torch_file(path)
    assert caught.value.global_name == global_name
    assert global_name in str(caught.value) and str(path) in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "name", ["global_os_system", "stack_global", "inst", "obj", "exec", "nested_in_state_dict"]
)
def test_hostile_payloads_are_live_under_plain_pickle(tmp_path: Path, name: str) -> None:
    # Control: the same bytes do run code when unpickled normally, so the refusal above matters.
    marker = tmp_path / "control"
    pickle.loads(_payloads(marker)[name][0])
    assert marker.exists()


def test_build_opcode_cannot_change_how_later_files_load(tmp_path: Path) -> None:
    # BUILD with (None, {"__defaults__": ([7],)}) would make a plain function's default (7,).
    slot_state = b"N}" + Op.text("__defaults__") + b"(]" + Op.int(7) + b"ats\x86b"
    with pytest.raises(ReadError):
        load_torch_file(write_archive(tmp_path / "a.pt", Op.program(Op.glob("torch", "Size") + slot_state)))
    marker_state = b"}" + Op.text("x") + b"Nsb"
    with pytest.raises(ReadError):
        load_torch_file(
            write_archive(tmp_path / "b.pt", Op.program(Op.glob("torch", "FloatStorage") + marker_state))
        )
    size = Op.program(Op.glob("torch", "Size") + b")R")
    assert load_torch_file(write_archive(tmp_path / "c.pt", size)) == ()
    tensor = Op.program(Op.tensor(Op.storage(4), (4,), (1,)))
    np.testing.assert_array_equal(
        load_torch_file(write_archive(tmp_path / "d.pt", tensor, float_records())), [0, 1, 2, 3]
    )


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (Op.glob("_codecs", "encode") + Op.text("x") + Op.text("rot13") + b"\x86R", "_codecs.encode"),
        (Op.glob("builtins", "bytes") + Op.int(10**12) + b"\x85R", "bytes(int)"),
        (Op.glob("torch", "Size") + Op.storage(4) + b"\x85R", "torch.Size(ndarray)"),
        (Op.glob("collections", "OrderedDict") + Op.storage(4) + b"\x85R", "OrderedDict(ndarray)"),
        (Op.glob("torch._utils", "_rebuild_parameter") + Op.text("x") + b"\x85R", "Parameter(str)"),
    ],
)
def test_allowed_globals_refuse_arguments_torch_never_writes(
    tmp_path: Path, body: bytes, needle: str
) -> None:
    path = write_archive(tmp_path / "odd.pt", Op.program(body), float_records())
    with pytest.raises(ReadError, match=r"refused unexpected call") as caught:
        load_torch_file(path)
    assert needle in str(caught.value)


def test_older_rebuild_records_load(tmp_path: Path) -> None:
    # _rebuild_tensor (torch < 1.0) and _rebuild_parameter_with_state (Parameter subclasses).
    v1 = Op.glob("torch._utils", "_rebuild_tensor") + Op.tuple(
        Op.storage(4), Op.int(1), Op.tuple(Op.int(3)), Op.tuple(Op.int(1))
    )
    param = Op.glob("torch._utils", "_rebuild_parameter_with_state") + Op.tuple(
        Op.tensor(Op.storage(4), (2, 2), (1, 2)), b"\x88", b"N", b"}"
    )
    path = write_archive(tmp_path / "old.pt", Op.program(Op.tuple(v1 + b"R", param + b"R")), float_records())
    old, parameter = load_torch_file(path)
    np.testing.assert_array_equal(old, [1, 2, 3])
    np.testing.assert_array_equal(parameter, [[0, 2], [1, 3]])


def test_tensor_built_from_something_other_than_a_storage_is_refused(tmp_path: Path) -> None:
    fake = Op.glob("torch._utils", "_rebuild_tensor_v2") + Op.tuple(
        b"]", Op.int(0), Op.tuple(Op.int(2)), Op.tuple(Op.int(1)), b"\x89", b"N"
    )
    with pytest.raises(ReadError, match="not a storage record"):
        load_torch_file(write_archive(tmp_path / "fake.pt", Op.program(fake + b"R")))


# --- malformed and hostile archives -----------------------------------------------------------


@pytest.fixture
def valid_file(tmp_path: Path) -> Path:
    body = Op.tensor(Op.storage(4), (2, 2), (2, 1))
    return write_archive(
        tmp_path / "valid.pt", Op.program(b"}" + Op.text("w") + body + b"s"), float_records()
    )


def test_handmade_valid_file_loads(valid_file: Path) -> None:
    np.testing.assert_array_equal(load_torch_file(valid_file)["w"], [[0, 1], [2, 3]])


def test_empty_file_is_a_read_error(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ReadError, match=r"empty\.pt: empty file"):
        load_torch_file(tmp_path / "empty.pt")


@pytest.mark.parametrize("keep", [1, 4, 30, 100, 0.5, -22, -1])
def test_truncated_file_is_a_read_error(valid_file: Path, tmp_path: Path, keep: float) -> None:
    blob = valid_file.read_bytes()
    cut = int(len(blob) * keep) if isinstance(keep, float) else keep % len(blob)
    target = tmp_path / "cut.pt"
    target.write_bytes(blob[:cut])
    with pytest.raises(ReadError) as caught:
        load_torch_file(target)
    assert str(target) in str(caught.value)


def test_not_a_zip_is_a_read_error(tmp_path: Path) -> None:
    (tmp_path / "notes.pt").write_text("hello, not a checkpoint\n")
    with pytest.raises(ReadError, match="not a torch file"):
        load_torch_file(tmp_path / "notes.pt")


def test_legacy_torch_format_says_to_resave(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.save({"a": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(ReadError, match=r"legacy torch format is not supported; re-save with torch>=1\.6"):
        load_torch_file(tmp_path / "old.pt")


def test_zip_without_data_pkl_is_a_read_error(valid_file: Path, tmp_path: Path) -> None:
    target = rezip(valid_file, tmp_path / "nopkl.pt", drop="archive/data.pkl")
    with pytest.raises(ReadError, match=r"no <name>/data\.pkl"):
        load_torch_file(target)


def test_missing_storage_record_is_a_read_error(valid_file: Path, tmp_path: Path) -> None:
    target = rezip(valid_file, tmp_path / "nodata.pt", drop="archive/data/0")
    with pytest.raises(ReadError, match=r"missing storage record 'archive/data/0'"):
        load_torch_file(target)


def test_corrupt_opcode_stream_is_a_read_error(tmp_path: Path) -> None:
    for i, data in enumerate(
        [b"\x80\x02\xff\xff.", b"\x80\x02a.", b"\x80\x02N", b"\x80\x02(t\x85\x85\x85R."]
    ):
        with pytest.raises(ReadError, match=r"data\.pkl"):
            load_torch_file(write_archive(tmp_path / f"bad{i}.pt", data))


def _refused_quickly(path: Path, match: str) -> None:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ReadError, match=match):
            load_torch_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 2.0
    assert peak < 32 << 20, f"peak {peak} bytes"


def test_huge_declared_numel_is_refused_without_allocating(tmp_path: Path) -> None:
    body = Op.tensor(Op.storage(10**10), (10**10,), (1,))
    path = write_archive(tmp_path / "huge.pt", Op.program(body), float_records())
    _refused_quickly(path, r"declares 40000000000 bytes for storage '0' but archive/data/0 holds 16")


def test_huge_memo_index_is_refused_before_the_unpickler_allocates(tmp_path: Path) -> None:
    path = write_archive(tmp_path / "memo.pt", b"\x80\x02Nr" + struct.pack("<I", 2**25) + b".")
    _refused_quickly(path, "memo index 33554432")


def test_huge_counted_bytes_are_refused_before_the_unpickler_allocates(tmp_path: Path) -> None:
    path = write_archive(tmp_path / "bytes8.pt", b"\x80\x04\x8e" + struct.pack("<Q", 2**31) + b"xx.")
    _refused_quickly(path, "truncated")


@pytest.mark.parametrize(
    ("size", "stride", "offset", "match"),
    [
        ((10**6, 10**6), (10**6, 1), 0, "reaches element"),
        ((2,), (4,), 0, "reaches element 4 of a storage holding 4"),
        ((4,), (1,), 1, "reaches element 4"),
        ((2**20, 2**20), (0, 0), 0, "repeats a storage"),
        ((-1,), (1,), 0, "bad tensor layout"),
        ((2,), (-1,), 1, "bad tensor layout"),
    ],
)
def test_views_outside_their_storage_are_refused(
    tmp_path: Path, size: tuple[int, ...], stride: tuple[int, ...], offset: int, match: str
) -> None:
    path = write_archive(
        tmp_path / "view.pt", Op.program(Op.tensor(Op.storage(4), size, stride, offset)), float_records()
    )
    _refused_quickly(path, match)


def test_unknown_storage_and_dtype_are_named(tmp_path: Path) -> None:
    odd = Op.program(Op.tensor(Op.storage(4, kind="QInt8Storage"), (4,), (1,)))
    with pytest.raises(UnsafePickleError, match=r"torch\.QInt8Storage"):
        load_torch_file(write_archive(tmp_path / "q.pt", odd, float_records()))
    v3 = Op.glob("torch._utils", "_rebuild_tensor_v3") + Op.tuple(
        Op.storage(16, kind="UntypedStorage"),
        Op.int(0),
        Op.tuple(Op.int(4)),
        Op.tuple(Op.int(1)),
        b"\x89",
        b"N",
        Op.glob("torch", "float8_e4m3fn"),
    )
    with pytest.raises(ReadError, match=r"torch\.float8_e4m3fn tensors are not supported"):
        load_torch_file(write_archive(tmp_path / "f8.pt", Op.program(v3 + b"R"), float_records()))


def test_big_endian_file_is_refused(tmp_path: Path) -> None:
    path = write_archive(tmp_path / "be.pt", Op.program(b"N"), byteorder=b"big")
    with pytest.raises(ReadError, match="big-endian"):
        load_torch_file(path)


def test_oversized_data_pkl_is_refused(valid_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchfile, "MAX_PICKLE_BYTES", 16)
    with pytest.raises(ReadError, match="over the 16 byte limit"):
        load_torch_file(valid_file)


def test_record_declared_past_the_end_of_the_file_is_refused(valid_file: Path) -> None:
    blob = bytearray(valid_file.read_bytes())
    at = blob.index(b"PK\x01\x02")  # central directory entries: sizes at +20, name at +46
    while blob[at + 46 : at + 46 + 14] != b"archive/data/0":
        at = blob.index(b"PK\x01\x02", at + 4)
    struct.pack_into("<II", blob, at + 20, 2**31, 2**31)
    valid_file.write_bytes(bytes(blob))
    _refused_quickly(valid_file, "past the end of the file")


def test_compressed_record_claiming_an_impossible_size_is_refused(valid_file: Path, tmp_path: Path) -> None:
    target = rezip(valid_file, tmp_path / "bomb.pt", compression=zipfile.ZIP_DEFLATED)
    blob = bytearray(target.read_bytes())
    at = blob.index(b"PK\x01\x02")
    while blob[at + 46 : at + 46 + 14] != b"archive/data/0":
        at = blob.index(b"PK\x01\x02", at + 4)
    struct.pack_into("<I", blob, at + 24, 2**31)  # uncompressed size
    target.write_bytes(bytes(blob))
    _refused_quickly(target, "more than deflate can produce")


def test_compression_torch_cannot_read_is_refused(valid_file: Path, tmp_path: Path) -> None:
    target = rezip(valid_file, tmp_path / "bz.pt", compression=zipfile.ZIP_BZIP2)
    with pytest.raises(ReadError, match="unsupported zip compression method 12"):
        load_torch_file(target)


def test_directory_is_a_read_error(tmp_path: Path) -> None:
    with pytest.raises(ReadError, match="is a directory"):
        load_torch_file(tmp_path)


def test_symlink_loop_is_a_read_error_with_the_os_reason(tmp_path: Path) -> None:
    loop = tmp_path / "loop.pt"
    loop.symlink_to(tmp_path / "loop.pt")
    with pytest.raises(ReadError, match="symbolic links") as caught:
        load_torch_file(loop)
    assert str(loop) in str(caught.value)


def test_missing_file_and_fifo_are_read_errors(tmp_path: Path) -> None:
    with pytest.raises(ReadError, match="No such file"):
        load_torch_file(tmp_path / "absent.pt")
    os.mkfifo(tmp_path / "pipe.pt")
    with pytest.raises(ReadError, match="not a regular file"):
        load_torch_file(tmp_path / "pipe.pt")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_file_is_a_read_error(valid_file: Path) -> None:
    valid_file.chmod(0)
    try:
        with pytest.raises(ReadError, match="Permission denied"):
            load_torch_file(valid_file)
    finally:
        valid_file.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_pickle_scan_knows_every_protocol_opcode() -> None:
    known = {op.code.encode("latin-1")[0] for op in pickletools.opcodes}
    assert {code for code in range(256) if _ARGS[code] != _UNKNOWN} == known
    for op in pickletools.opcodes:
        if op.arg is not None and op.arg.n > 0:
            assert _ARGS[op.code.encode("latin-1")[0]] in (op.arg.n, -8, -9), op.name


def test_torch_writes_only_what_the_reader_understands(tmp_path: Path) -> None:
    # If a torch upgrade starts writing a new global, this names it.
    torch = pytest.importorskip("torch")
    buffer = io.BytesIO()
    torch.save({"opt": adamw_state(torch, [(4, 4)]), "bf": torch.ones(2, dtype=torch.bfloat16)}, buffer)
    with zipfile.ZipFile(buffer) as zf:
        data = zf.read("archive/data.pkl")
    names = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert names <= {
        "collections OrderedDict",
        "torch._utils _rebuild_tensor_v2",
        "torch FloatStorage",
        "torch BFloat16Storage",
    }
