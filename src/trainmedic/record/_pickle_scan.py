"""A pre-flight walk over a pickle's opcodes, run before the C unpickler sees the bytes.

The C unpickler trusts two things a hostile file controls: a LONG_BINPUT/PUT memo index sizes
(and zero-fills) its memo array, so 7 bytes can demand gigabytes; and counted strings/bytes are
allocated at their declared length before reading. This walk refuses both (and any opcode the
pickle protocol does not define) in one pass, without building anything.
"""

from __future__ import annotations

from trainmedic.record.errors import ReadError

# Arguments of each opcode: >= 0 is a fixed byte count; negative values name a special layout.
_UNKNOWN, _LEN1, _LEN4, _LEN8, _LINE, _LINE2, _STOP, _PUT1, _PUT4, _PUT_LINE, _MEMOIZE = range(-1, -12, -1)

_ARGS = [_UNKNOWN] * 256
for _op in b"()012N]}aedlsutRboQ\x81\x85\x86\x87\x88\x89\x8f\x90\x91\x92\x93\x97\x98":
    _ARGS[_op] = 0
# BININT1/2/4, BINFLOAT, BINGET, LONG_BINGET, PROTO, EXT1/2/4, FRAME
for _fixed, _n in ((b"Kh\x80\x82", 1), (b"M\x83", 2), (b"Jj\x84", 4), (b"G\x95", 8)):
    for _op in _fixed:
        _ARGS[_op] = _n
for _op in b"\x8aU\x8cC":  # LONG1, SHORT_BINSTRING, SHORT_BINUNICODE, SHORT_BINBYTES
    _ARGS[_op] = _LEN1
for _op in b"\x8bTXB":  # LONG4, BINSTRING, BINUNICODE, BINBYTES
    _ARGS[_op] = _LEN4
for _op in b"\x8d\x8e\x96":  # BINUNICODE8, BINBYTES8, BYTEARRAY8
    _ARGS[_op] = _LEN8
for _op in b"ILFSVgP":  # text INT, LONG, FLOAT, STRING, UNICODE, GET, PERSID
    _ARGS[_op] = _LINE
for _op in b"ci":  # GLOBAL, INST: "module\nname\n"
    _ARGS[_op] = _LINE2
_ARGS[ord(".")] = _STOP
_ARGS[ord("q")] = _PUT1
_ARGS[ord("r")] = _PUT4
_ARGS[ord("p")] = _PUT_LINE
_ARGS[0x94] = _MEMOIZE

# Picklers number memo slots 0, 1, 2, ...; an index far past the number of stores seen is hostile.
_MEMO_SLACK = 256


def check_pickle(data: bytes, path: str, member: str = "data.pkl") -> None:
    """Raise ReadError unless `data` is a well-formed opcode stream that ends with STOP."""
    args = _ARGS
    n = len(data)
    i = 0
    stores = 0
    while i < n:
        kind = args[data[i]]
        i += 1
        if kind >= 0:
            i += kind
        elif kind in (_PUT1, _MEMOIZE):
            stores += 1
            i += 1 if kind == _PUT1 else 0
        elif kind == _PUT4:
            index = int.from_bytes(data[i : i + 4], "little")
            if index > stores + _MEMO_SLACK:
                raise _memo_error(path, member, index, i - 1)
            stores += 1
            i += 4
        elif kind == _LEN1:
            i += 1 + (data[i] if i < n else 0)
        elif kind == _LEN4:
            i += 4 + int.from_bytes(data[i : i + 4], "little")
        elif kind == _LEN8:
            i += 8 + int.from_bytes(data[i : i + 8], "little")
        elif kind in (_LINE, _LINE2, _PUT_LINE):
            end = data.find(b"\n", i)
            if kind == _LINE2 and end >= 0:
                end = data.find(b"\n", end + 1)
            if end < 0:
                break
            if kind == _PUT_LINE:
                _check_text_put(data, i, end, stores, path, member)
                stores += 1
            i = end + 1
        elif kind == _STOP:
            return
        else:
            raise ReadError(
                path, f"{member} is corrupt: unknown pickle opcode 0x{data[i - 1]:02x} at byte {i - 1}"
            )
    raise ReadError(path, f"{member} is truncated: the pickle stream ends without its STOP opcode")


def _check_text_put(data: bytes, start: int, end: int, stores: int, path: str, member: str) -> None:
    text = data[start:end]
    if not text.isdigit() or len(text) > 12:
        raise ReadError(path, f"{member} is corrupt: bad PUT index {text[:20]!r} at byte {start - 1}")
    if int(text) > stores + _MEMO_SLACK:
        raise _memo_error(path, member, int(text), start - 1)


def _memo_error(path: str, member: str, index: int, at: int) -> ReadError:
    return ReadError(
        path,
        f"{member} is corrupt or hostile: memo index {index} at byte {at} is far beyond the "
        "objects stored so far (refused before allocating)",
    )
