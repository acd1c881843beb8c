"""The subset of msgpack that wire protocol v1 uses, in pure Python, for the plugin's hot path.

Importing the msgpack library costs the frozen plugin ~7 ms on every enrolled pod (``msgpack.ext`` imports
``datetime``, ``collections`` and ``math``; ``_cmsgpack`` is a shared-library load), more than encoding one
request and decoding one reply in pure Python ever takes (~20 us). So the plugin speaks the protocol with this
module, and the agent keeps the library. Supported: nil, bool, int (-2**63 .. 2**64-1), str (UTF-8), array,
map with str keys; exactly as ``msgpack.packb(obj, use_bin_type=True)`` encodes them (the smallest encoding
of each value) and as ``msgpack.unpackb(data, raw=False, strict_map_key=True)`` decodes them. Anything else
(float, bin, ext, non-str map keys, truncated or trailing bytes, invalid UTF-8, nesting deeper than
``MAX_DEPTH``) raises ``MsgpackError``. ``tests/test_minipack.py`` proves both directions against the library
with hypothesis.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_DEPTH = 100  # the protocol nests 3 deep; the bound keeps a hostile frame from exhausting the stack


class MsgpackError(ValueError):
    """A value this codec cannot encode, or bytes it cannot decode (the message says which and why)."""


# -- encoding ---------------------------------------------------------------------------------------------------


def packb(obj: Any) -> bytes:
    out = bytearray()
    _pack(obj, out, 0)
    return bytes(out)


def _pack(obj: Any, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise MsgpackError(f"nesting deeper than {MAX_DEPTH}")
    if obj is None:
        out.append(0xC0)
    elif obj is True:
        out.append(0xC3)
    elif obj is False:
        out.append(0xC2)
    elif isinstance(obj, int):
        _pack_int(obj, out)
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
        _pack_header(len(data), out, 0xA0, 31, (0xD9, 0xDA, 0xDB))
        out += data
    elif isinstance(obj, list | tuple):
        _pack_header(len(obj), out, 0x90, 15, (None, 0xDC, 0xDD))
        for item in obj:
            _pack(item, out, depth + 1)
    elif isinstance(obj, dict):
        _pack_header(len(obj), out, 0x80, 15, (None, 0xDE, 0xDF))
        for key, value in obj.items():
            if not isinstance(key, str):
                raise MsgpackError(f"map keys must be strings, not {type(key).__name__}")
            _pack(key, out, depth + 1)
            _pack(value, out, depth + 1)
    else:
        raise MsgpackError(f"cannot encode a value of type {type(obj).__name__}")


def _pack_int(value: int, out: bytearray) -> None:
    if 0 <= value < 0x80:
        out.append(value)
    elif -32 <= value < 0:
        out.append(value & 0xFF)
    elif value >= 0:
        for marker, size in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
            if value < 1 << (8 * size):
                out.append(marker)
                out += value.to_bytes(size, "big")
                return
        raise MsgpackError(f"integer {value} does not fit in 64 bits")
    else:
        for marker, size in ((0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)):
            if value >= -(1 << (8 * size - 1)):
                out.append(marker)
                out += value.to_bytes(size, "big", signed=True)
                return
        raise MsgpackError(f"integer {value} does not fit in 64 bits")


def _pack_header(length: int, out: bytearray, fix: int, fix_max: int, markers: tuple[int | None, int, int]) -> None:
    """Length prefix of a str/array/map: the fix form, else 8-bit (str only), 16-bit or 32-bit."""
    if length <= fix_max:
        out.append(fix | length)
        return
    for marker, size in zip(markers, (1, 2, 4), strict=True):
        if marker is not None and length < 1 << (8 * size):
            out.append(marker)
            out += length.to_bytes(size, "big")
            return
    raise MsgpackError(f"length {length} does not fit in 32 bits")


# -- decoding ---------------------------------------------------------------------------------------------------

_UINT = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_SINT = {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
_STR = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_ARRAY = {0xDC: 2, 0xDD: 4}
_MAP = {0xDE: 2, 0xDF: 4}


def unpackb(data: bytes) -> Any:
    """Decode exactly one value that fills ``data``."""
    value, end = _unpack(data, 0, 0)
    if end != len(data):
        raise MsgpackError(f"{len(data) - end} bytes of extra data after the value")
    return value


def _take(data: bytes, pos: int, size: int) -> int:
    end = pos + size
    if end > len(data):
        raise MsgpackError("truncated input")
    return end


def _unpack(data: bytes, pos: int, depth: int) -> tuple[Any, int]:
    if depth > MAX_DEPTH:
        raise MsgpackError(f"nesting deeper than {MAX_DEPTH}")
    if pos >= len(data):
        raise MsgpackError("truncated input")
    byte = data[pos]
    pos += 1
    if byte <= 0x7F:
        return byte, pos
    if byte >= 0xE0:
        return byte - 0x100, pos
    if 0xA0 <= byte <= 0xBF:
        return _str(data, pos, byte & 0x1F)
    if 0x90 <= byte <= 0x9F:
        return _array(data, pos, byte & 0x0F, depth)
    if 0x80 <= byte <= 0x8F:
        return _map(data, pos, byte & 0x0F, depth)
    if byte == 0xC0:
        return None, pos
    if byte == 0xC2:
        return False, pos
    if byte == 0xC3:
        return True, pos
    size = _UINT.get(byte)
    if size:
        end = _take(data, pos, size)
        return int.from_bytes(data[pos:end], "big"), end
    size = _SINT.get(byte)
    if size:
        end = _take(data, pos, size)
        return int.from_bytes(data[pos:end], "big", signed=True), end
    for table, read in ((_STR, _str), (_ARRAY, _array), (_MAP, _map)):
        size = table.get(byte)
        if size:
            end = _take(data, pos, size)
            return read(data, end, int.from_bytes(data[pos:end], "big"), depth)
    raise MsgpackError(f"unsupported msgpack type byte 0x{byte:02x} (wire protocol v1 uses nil, bool, int, str, "
                       "array and map only)")


def _str(data: bytes, pos: int, length: int, depth: int = 0) -> tuple[str, int]:
    end = _take(data, pos, length)
    try:
        return data[pos:end].decode("utf-8"), end
    except UnicodeDecodeError as exc:
        raise MsgpackError(f"string is not valid UTF-8: {exc.reason}") from None


def _array(data: bytes, pos: int, length: int, depth: int) -> tuple[list[Any], int]:
    _take(data, pos, length)  # every element takes at least one byte: refuse impossible lengths at once
    items = []
    for _ in range(length):
        item, pos = _unpack(data, pos, depth + 1)
        items.append(item)
    return items, pos


def _map(data: bytes, pos: int, length: int, depth: int) -> tuple[dict[str, Any], int]:
    _take(data, pos, 2 * length)
    result: dict[str, Any] = {}
    for _ in range(length):
        key, pos = _unpack(data, pos, depth + 1)
        if not isinstance(key, str):
            raise MsgpackError(f"map keys must be strings, not {type(key).__name__}")
        result[key], pos = _unpack(data, pos, depth + 1)
    return result, pos
