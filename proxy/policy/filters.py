"""Reply filters for the `keyspace` extra: KEYS, SCAN and PUBSUB CHANNELS/SHARDCHANNELS
replies keep only the names a role may know.

A filter takes the complete raw reply and returns the rewritten one. Errors and simple
strings (`+QUEUED` inside MULTI) pass unchanged; a reply of any other shape is replaced
by an error rather than passed on unfiltered.
"""

from __future__ import annotations

from collections.abc import Callable

ReplyFilter = Callable[[bytes], bytes]

UNFILTERABLE = b"-ERR phiproxy: unexpected reply shape for a filtered command\r\n"


class _Malformed(Exception):
    pass


def _read_line(data: bytes, pos: int) -> tuple[bytes, int]:
    end = data.find(b"\r\n", pos)
    if end < 0:
        raise _Malformed
    return data[pos:end], end + 2


def _read_string(data: bytes, pos: int) -> tuple[bytes, int]:
    kind = data[pos:pos + 1]
    line, pos = _read_line(data, pos + 1)
    if kind == b"+":
        return line, pos
    if kind != b"$":
        raise _Malformed
    size = int(line)
    if size < 0 or data[pos + size:pos + size + 2] != b"\r\n":
        raise _Malformed
    return data[pos:pos + size], pos + size + 2


def _read_names(data: bytes, pos: int) -> tuple[list[bytes], int]:
    """An array (`*`, or a RESP3 set `~`) of strings."""
    if data[pos:pos + 1] not in (b"*", b"~"):
        raise _Malformed
    line, pos = _read_line(data, pos + 1)
    count = int(line)
    names = []
    for _ in range(max(count, 0)):
        name, pos = _read_string(data, pos)
        names.append(name)
    return names, pos


def _encode_names(names: list[bytes], kind: bytes = b"*") -> list[bytes]:
    out = [kind, str(len(names)).encode(), b"\r\n"]
    for name in names:
        out += [b"$", str(len(name)).encode(), b"\r\n", name, b"\r\n"]
    return out


def _passthrough(reply: bytes) -> bool:
    return reply[:1] in (b"-", b"+", b"!")  # errors, +QUEUED


def names_filter(visible: Callable[[bytes], object]) -> ReplyFilter:
    """KEYS / PUBSUB CHANNELS: an array of names."""

    def apply(reply: bytes) -> bytes:
        if _passthrough(reply):
            return reply
        try:
            names, end = _read_names(reply, 0)
            if end != len(reply):
                raise _Malformed
        except (_Malformed, ValueError):
            return UNFILTERABLE
        return b"".join(_encode_names([n for n in names if visible(n)], reply[:1]))

    return apply


def scan_filter(visible: Callable[[bytes], object]) -> ReplyFilter:
    """SCAN: [cursor, [names...]]; the cursor is kept, the page may come back short or empty."""

    def apply(reply: bytes) -> bytes:
        if _passthrough(reply):
            return reply
        try:
            line, pos = _read_line(reply, 1)
            if reply[:1] != b"*" or int(line) != 2:
                raise _Malformed
            cursor, pos = _read_string(reply, pos)
            names, end = _read_names(reply, pos)
            if end != len(reply):
                raise _Malformed
        except (_Malformed, ValueError):
            return UNFILTERABLE
        kept = [n for n in names if visible(n)]
        out = [b"*2\r\n$", str(len(cursor)).encode(), b"\r\n", cursor, b"\r\n"]
        return b"".join(out + _encode_names(kept, reply[pos:pos + 1]))

    return apply
