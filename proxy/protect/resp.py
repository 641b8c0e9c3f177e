"""A complete reply frame as a small tree, and back to the same bytes.

The transformations of protected values (transform.py) replace bulk strings deep inside
replies (HGETALL's map, XRANGE's nested arrays, MGET's array with nulls). Parsing into a
tree that keeps each node's type byte, and encoding it back, leaves everything but the
replaced values exactly as Redis sent it, in RESP2 and RESP3 alike.
"""

from __future__ import annotations

from typing import Any

BULK = 0x24  # $
ARRAY = 0x2A  # *
MAP = 0x25  # %
SET = 0x7E  # ~
PUSH = 0x3E  # >
ATTRIBUTE = 0x7C  # |
VERBATIM = 0x3D  # =
BLOB_ERROR = 0x21  # !
NULL = 0x5F  # _
_AGGREGATES = frozenset({ARRAY, MAP, SET, PUSH, ATTRIBUTE})
_PAIRED = frozenset({MAP, ATTRIBUTE})


class Node:
    """`kind` is the type byte; `value` is bytes (bulk, verbatim, blob error; None for a
    null bulk or array), a list of nodes (aggregates; a map's keys and values alternate),
    or the raw line after the type byte (simple types)."""

    __slots__ = ("kind", "value")

    def __init__(self, kind: int, value: Any) -> None:
        self.kind = kind
        self.value = value

    @property
    def is_null(self) -> bool:
        return self.kind == NULL or (self.kind in (BULK, ARRAY) and self.value is None)


def parse(frame: bytes) -> Node:
    """The tree of one complete reply frame (ValueError if it is not one)."""
    node, end = _parse(frame, 0)
    if end != len(frame):
        raise ValueError("trailing bytes after the reply")
    return node


def _line(frame: bytes, pos: int) -> tuple[bytes, int]:
    end = frame.index(b"\r\n", pos)
    return frame[pos:end], end + 2


def _parse(frame: bytes, pos: int) -> tuple[Node, int]:
    kind = frame[pos]
    line, pos = _line(frame, pos + 1)
    if kind in (BULK, VERBATIM, BLOB_ERROR):
        size = int(line)
        if size < 0:
            return Node(kind, None), pos
        return Node(kind, frame[pos:pos + size]), pos + size + 2
    if kind in _AGGREGATES:
        count = int(line)
        if count < 0:
            return Node(kind, None), pos
        if kind in _PAIRED:
            count *= 2
        items = []
        for _ in range(count):
            item, pos = _parse(frame, pos)
            items.append(item)
        return Node(kind, items), pos
    return Node(kind, line), pos


def encode(node: Node) -> bytes:
    out: list[bytes] = []
    _encode(node, out)
    return b"".join(out)


def _encode(node: Node, out: list[bytes]) -> None:
    kind, value = node.kind, node.value
    if kind in (BULK, VERBATIM, BLOB_ERROR):
        if value is None:
            out.append(b"%c-1\r\n" % kind)
        else:
            out.append(b"%c%d\r\n%s\r\n" % (kind, len(value), value))
    elif kind in _AGGREGATES:
        if value is None:
            out.append(b"%c-1\r\n" % kind)
            return
        out.append(b"%c%d\r\n" % (kind, len(value) // 2 if kind in _PAIRED else len(value)))
        for item in value:
            _encode(item, out)
    else:
        out.append(b"%c%s\r\n" % (kind, value))


def bulk(value: bytes) -> Node:
    return Node(BULK, value)


def integer(value: int) -> Node:
    return Node(0x3A, str(value).encode())
