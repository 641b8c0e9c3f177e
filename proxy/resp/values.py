"""RESP values the proxy answers itself, and Redis's own integer parsing.

SELECT, HELLO and CLIENT GETNAME are answered by the proxy (the client's db, protocol and
name are kept per client), so their replies and errors must be Redis's to the byte.
"""

from __future__ import annotations

from typing import Any

_LLONG_MIN, _LLONG_MAX = -(2**63), 2**63 - 1
_DIGITS = frozenset(b"0123456789")


def string2ll(text: bytes) -> int | None:
    """Redis's `string2ll`: a signed 64-bit decimal with no sign but '-', no spaces and no
    leading zeros ("0" itself excepted); None where Redis says "not an integer"."""
    if not text or len(text) > 20:
        return None
    if text == b"0":
        return 0
    digits = text[1:] if text[:1] == b"-" else text
    if not digits or digits[0] == 0x30 or not set(digits) <= _DIGITS:
        return None
    value = int(text)
    return value if _LLONG_MIN <= value <= _LLONG_MAX else None


def encode_nil(proto: int) -> bytes:
    return b"_\r\n" if proto == 3 else b"$-1\r\n"


def _encode(value: Any, proto: int) -> bytes:
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, str):
        return _encode(value.encode(), proto)
    if value is None:
        return encode_nil(proto)
    return b"*%d\r\n" % len(value) + b"".join(_encode(item, proto) for item in value)


def _encode_map(pairs: list[tuple[Any, Any]], proto: int, inner: bool = False) -> bytes:
    head = b"%%%d\r\n" % len(pairs) if proto == 3 else b"*%d\r\n" % (2 * len(pairs))
    return head + b"".join(_encode(key, proto) + _encode_value(key, value, proto)
                           for key, value in pairs)


def _encode_value(key: Any, value: Any, proto: int) -> bytes:
    if key == b"modules" and isinstance(value, list):
        # Each module is a map (name, ver, path, args) in RESP3, a flat array in RESP2.
        return b"*%d\r\n" % len(value) + b"".join(
            _encode_map(list(zip(module[::2], module[1::2], strict=False)), proto)
            if isinstance(module, list) else _encode(module, proto) for module in value)
    return _encode(value, proto)


def encode_hello(info: list[Any], proto: int, client_id: int) -> bytes:
    """HELLO's reply for a client: the backend's server fields (from its own HELLO, in
    RESP2 form), with the client's protocol and id."""
    pairs = []
    for key, value in zip(info[::2], info[1::2], strict=False):
        if key == b"proto":
            value = proto
        elif key == b"id":
            value = client_id
        pairs.append((key, value))
    return _encode_map(pairs, proto)
