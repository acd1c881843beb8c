"""JSON for the hot path straight from CPython's C accelerator (``_json``).

``import json`` pulls in ``re`` and, through it, ``enum``: about 8 ms of every plugin exec, for nothing the
C scanner/encoder need. Same semantics as ``json.loads``/``json.dumps`` for what the plugin reads and writes
(key order kept, strict strings, NaN/Infinity accepted as Python does). Errors are ``ValueError``.
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_WHITESPACE = " \t\n\r"
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _ScannerContext:
    """The attributes ``_json.make_scanner`` reads from a ``json.JSONDecoder``."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__
    memo: dict[str, str] = {}


_scan_once = _json.make_scanner(_ScannerContext())  # type: ignore[arg-type]  # duck-typed decoder
# markers, default, encoder, indent, key_separator, item_separator, sort_keys, skipkeys, allow_nan
_encode = _json.make_encoder(
    None, None, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True  # type: ignore[arg-type]
)


def loads(data: bytes | str) -> Any:
    text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    if text.startswith("\ufeff"):
        raise ValueError("Unexpected UTF-8 BOM (decode using utf-8-sig)")
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan_once(text, start)
    except StopIteration as exc:
        raise ValueError(f"Expecting value: char {exc.value}") from None
    except SystemError:  # the scanner could not import json.decoder to build its error: let json say it
        import json

        json.loads(text)
        raise
    finally:
        _ScannerContext.memo.clear()
    rest = text[end:]
    if rest.strip(_WHITESPACE):
        raise ValueError(f"Extra data: char {end}")
    return value


def dumps(value: Any) -> str:
    """Compact-ish JSON (``", "``/``": "`` separators, ASCII), like ``json.dumps`` with defaults."""
    if isinstance(value, str):
        return str(_json.encode_basestring_ascii(value))
    return "".join(_encode(value, 0))
