"""cni_plugin.minipack (the plugin's pure-Python msgpack subset) is byte-compatible with the msgpack library the
agent uses, in both directions, over every value wire protocol v1 allows; and anything else is a clean
``MsgpackError`` (a ``WireError`` through ``cni_plugin.wire``), never another exception."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cni_plugin import minipack, wire

INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1

# Integers of every width and at every boundary of the encodings (fixint, 8/16/32/64 bit, signed and not).
_EDGES = sorted({b + d for e in (5, 7, 8, 15, 16, 31, 32, 63, 64) for b in (2**e, -(2**e)) for d in (-1, 0, 1)})
ints = st.one_of(
    st.integers(INT64_MIN, UINT64_MAX),
    st.integers(-40, 300),
    st.sampled_from([v for v in _EDGES if INT64_MIN <= v <= UINT64_MAX]),
)
# Unicode of every plane (surrogates excluded: no UTF-8 encoding exists), lengths across fixstr and str8/16.
texts = st.one_of(st.text(max_size=40), st.text(min_size=28, max_size=300))
scalars = st.one_of(st.none(), st.booleans(), ints, texts)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.lists(inner, min_size=15, max_size=18),  # across fixarray / array16
        st.dictionaries(st.text(max_size=12), inner, max_size=6),
        st.dictionaries(st.text(max_size=6), inner, min_size=15, max_size=18),  # across fixmap / map16
    ),
    max_leaves=30,
)
# Past 2**16 bytes or entries (str16 -> str32, array16 -> array32, map16 -> map32), built by repetition:
# hypothesis itself draws at most a few thousand elements.
huge = st.one_of(
    st.tuples(st.text(min_size=1, max_size=3), st.integers(2**16 // 4 - 4, 2**16 + 4)).map(lambda t: t[0] * t[1]),
    st.integers(2**16 - 2, 2**16 + 2).map(lambda n: [None] * n),
    st.integers(2**16 - 2, 2**16 + 2).map(lambda n: {str(i): i for i in range(n)}),
)
top_values = st.one_of(values, values.map(lambda v: [v]), huge)


def lib_packb(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def lib_unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=True)


def same(a: Any, b: Any) -> bool:
    """Equal with types: ``True == 1`` and ``[] == ()`` do not count (tuples are sent as arrays -> lists)."""
    if isinstance(a, tuple):
        a = list(a)
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@settings(max_examples=400, deadline=None)
@given(top_values)
@example({"v": 1, "op": "add", "ips": ["10.0.0.1/24", "fd00::1/64"], "pod": {"name": "ü-🐍"}, "deadline_ms": 5000})
@example([2**64 - 1, -(2**63), 127, 128, -32, -33, 255, 256, 65535, 65536, 2**32 - 1, 2**32, -129, -32769])
def test_ours_encodes_exactly_like_the_library(value: Any) -> None:
    ours = minipack.packb(value)
    assert ours == lib_packb(value)
    assert same(value, lib_unpackb(ours))


@settings(max_examples=400, deadline=None)
@given(top_values)
def test_ours_decodes_what_the_library_encodes(value: Any) -> None:
    assert same(value, minipack.unpackb(lib_packb(value)))


@settings(deadline=None)
@given(st.dictionaries(st.text(max_size=10), values, max_size=5))
def test_frames_round_trip_between_plugin_and_agent_codecs(message: dict[str, Any]) -> None:
    frame = wire.encode_frame(message)  # plugin side
    assert frame == wire.encode_frame(message, lib_packb)  # agent side
    body = frame[wire.HEADER.size:]
    assert wire.frame_length(frame[: wire.HEADER.size]) == len(body)
    assert same(wire.decode_body(body), wire.decode_body(body, lib_unpackb))


@settings(max_examples=600, deadline=None)
@given(st.one_of(
    st.binary(max_size=64),
    values.map(lambda v: lib_packb(v)).flatmap(  # valid encodings, then cut or corrupted
        lambda data: st.one_of(
            st.integers(0, max(0, len(data) - 1)).map(lambda n: data[:n]),
            st.tuples(st.integers(0, max(0, len(data) - 1)), st.integers(0, 255)).map(
                lambda t: data[: t[0]] + bytes([t[1]]) + data[t[0] + 1:]),
            st.binary(min_size=1, max_size=4).map(lambda extra: data + extra),
        )
    ),
))
@example(b"\xc1")  # never used
@example(b"\xca\x00\x00\x00\x00")  # float32: not in the protocol
@example(b"\xc4\x01a")  # bin8
@example(b"\xd4\x01\x00")  # fixext
@example(b"\x81\x01\x02")  # int map key
@example(b"\xa2\xff\xfe")  # invalid UTF-8
@example(b"\xdd\xff\xff\xff\xff")  # array32 announcing 4 billion elements
@example(b"\x91" * 200 + b"\xc0")  # nesting deeper than MAX_DEPTH
def test_malformed_or_foreign_input_is_a_clean_error(data: bytes) -> None:
    try:
        ours = minipack.unpackb(data)
    except minipack.MsgpackError:
        with pytest.raises(wire.WireError, match="malformed msgpack body"):
            wire.decode_body(data)
        return
    # whatever we accept, the library accepts with the same meaning
    assert same(ours, lib_unpackb(data))


@pytest.mark.parametrize("value", [1.5, b"bytes", {1: "int key"}, 2**64, -(2**63) - 1, object(), {"a": {1, 2}}])
def test_values_outside_the_protocol_are_refused_when_encoding(value: Any) -> None:
    with pytest.raises(minipack.MsgpackError):
        minipack.packb(value)


def test_nesting_bound_applies_to_encoding_too() -> None:
    deep: Any = None
    for _ in range(minipack.MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(minipack.MsgpackError, match="nesting"):
        minipack.packb(deep)
