"""Slow, whole-buffer reference parsers the framers are fuzzed against.

Written from the framers' documented contracts (proxy/resp/request.py and reply.py
docstrings, Redis's networking.c), not from their code: one pass over the complete
input, no chunk state, no fast paths, no caches. Where the two disagree on some input,
one of them is wrong about the contract.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from proxy.resp.request import HEADER_MAX_BYTES, _sdssplitargs

_INT_MAX = 2**31 - 1
_STRICT = re.compile(rb"0|-?[1-9][0-9]*")


@dataclass
class Limits:
    max_bulk_bytes: int = 512 * 1024 * 1024
    max_query_buffer_bytes: int = 1024 * 1024 * 1024
    max_args: int = _INT_MAX
    max_inline_bytes: int = HEADER_MAX_BYTES

    def kwargs(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class RequestResult:
    commands: list[list[bytes]] = field(default_factory=list)
    inline: list[bool] = field(default_factory=list)  # per command: framed from an inline line
    skipped_empty: bool = False  # an empty command or blank line was skipped
    # "ok": every byte consumed; "incomplete": a partial command from `pending` on;
    # "error": `message`, a limit when `limit`.
    status: str = "ok"
    message: str = ""
    limit: bool = False
    pending: int = 0  # where the partial command starts (status "incomplete")
    consumed: int = 0  # end of the last complete command or skipped item


class _Incomplete(Exception):
    pass


class _Error(Exception):
    def __init__(self, message: str, limit: bool = False):
        super().__init__(message)
        self.limit = limit


def _int(text: bytes) -> int | None:
    """Redis string2ll: `0` or `-?[1-9][0-9]*` within 64 bits."""
    if not _STRICT.fullmatch(text):
        return None
    value = int(text)
    return value if -(2**63) <= value < 2**63 else None


def _header(data: bytes, pos: int, big: str) -> tuple[bytes, int]:
    """The header line at pos (without CRLF) and where the next item starts.

    A line ends at its first CR, which must be followed by LF; no CR in the first
    64 KiB + 1 bytes is `big`.
    """
    cr = data.find(b"\r", pos)
    if cr < 0 or cr - pos > HEADER_MAX_BYTES:
        if (cr < 0 and len(data) - pos > HEADER_MAX_BYTES) or cr - pos > HEADER_MAX_BYTES:
            raise _Error(big)
        raise _Incomplete
    if cr + 1 == len(data):
        raise _Incomplete
    if data[cr + 1] != 0x0A:
        return b"\r", -1  # malformed: the caller names it
    return data[pos + 1 : cr], cr + 2


def _multibulk(data: bytes, pos: int, lim: Limits) -> tuple[list[bytes] | None, int]:
    line, nxt = _header(data, pos, "too big mbulk count string")
    count = _int(line) if nxt >= 0 else None
    if count is None or count > _INT_MAX:
        raise _Error("invalid multibulk length")
    if count > lim.max_args:
        raise _Error("invalid multibulk length", limit=True)
    if count <= 0:
        return None, nxt
    argv: list[bytes] = []
    p = nxt
    for _ in range(count):
        if p >= len(data):
            raise _Incomplete
        line, nxt = _header(data, p, "too big bulk count string")
        if data[p] != 0x24:
            raise _Error(f"expected '$', got '{chr(data[p])}'")
        blen = _int(line) if nxt >= 0 else None
        if blen is None or blen < 0:
            raise _Error("invalid bulk length")
        if blen > lim.max_bulk_bytes:
            raise _Error("invalid bulk length", limit=True)
        end = nxt + blen
        if end + 2 - pos > lim.max_query_buffer_bytes:
            raise _Error("query buffer limit exceeded", limit=True)
        if len(data) < end + 2:
            raise _Incomplete
        if data[end : end + 2] != b"\r\n":
            raise _Error("expected '\\r\\n' after bulk payload")
        argv.append(data[nxt:end])
        p = end + 2
    return argv, p


def _inline(data: bytes, pos: int, lim: Limits) -> tuple[list[bytes], int]:
    e = data.find(b"\n", pos)
    if e < 0:
        if len(data) - pos > lim.max_inline_bytes:
            raise _Error("too big inline request")
        raise _Incomplete
    if e - pos > lim.max_inline_bytes:
        raise _Error("too big inline request")
    line = data[pos:e]
    if line.endswith(b"\r"):
        line = line[:-1]
    if b"\x00" in line:
        raise _Error("NUL byte in inline request")
    try:
        argv = _sdssplitargs(line)
    except Exception as exc:  # the port raises the framer's ProtocolError
        raise _Error(str(exc)) from None
    if len(argv) > lim.max_args:
        raise _Error("too many arguments in inline request", limit=True)
    return argv, e + 1


def frame_requests(data: bytes, lim: Limits) -> RequestResult:
    """Every command in data, as Redis 7 (stricter where the framer documents it) reads it."""
    res = RequestResult()
    pos = 0
    while pos < len(data):
        try:
            if data[pos] == 0x2A:
                argv, nxt = _multibulk(data, pos, lim)
                inline = False
            else:
                argv, nxt = _inline(data, pos, lim)
                inline = True
        except _Incomplete:
            res.status, res.pending = "incomplete", pos
            return res
        except _Error as exc:
            res.status, res.message, res.limit = "error", str(exc), exc.limit
            return res
        if argv:
            res.commands.append(argv)
            res.inline.append(inline)
        else:
            res.skipped_empty = True
        pos = res.consumed = nxt
    return res


# ---------------------------------------------------------------- replies

SUB_NAMES = {b"subscribe", b"unsubscribe", b"psubscribe", b"punsubscribe", b"ssubscribe",
             b"sunsubscribe"}
MESSAGE_NAMES = {b"message", b"pmessage", b"smessage"}
_SIMPLE = b"+-:_,#("
_BULKS = b"$=!"
_AGGREGATES = b"*>~%|"
MAX_HEADER = 64  # the reply framer's longest header line (a 64-bit integer fits)


class ReplyError(Exception):
    pass


@dataclass
class ReplyResult:
    frames: list[tuple[int, int, tuple | None]] = field(default_factory=list)
    status: str = "ok"  # ok | incomplete | error
    message: str = ""
    pending: int = 0  # start of the incomplete item (status "incomplete")


@dataclass
class _Item:
    type: int
    end: int
    content: bytes | None = None  # a bulk's payload or a simple line's text
    count: int = 0  # an aggregate's declared count


def _reply_int(text: bytes) -> int:
    # Lengths are read with Python's int(), as the framer does (it accepts `+5`, ` 5`,
    # `1_0`; Redis never sends those).
    try:
        return int(text)
    except ValueError as exc:
        raise ReplyError(f"malformed reply header: {exc}") from None


class _Replies:
    def __init__(self, data: bytes):
        self.data = data
        self.stuck = 0  # where the input ran out

    def line(self, pos: int) -> tuple[bytes, int]:
        e = self.data.find(b"\r\n", pos)
        if e < 0:
            self.stuck = pos
            raise _Incomplete
        return self.data[pos:e], e + 2

    def value(self, pos: int, top: bool, subscribed: bool,
              elems: list[_Item] | None = None) -> tuple[int, int, tuple | None]:
        """Parse one value at pos (attributes before it included); (end, kind, confirm)."""
        data = self.data
        if pos >= len(data):
            self.stuck = pos
            raise _Incomplete
        t = data[pos]
        if t not in _SIMPLE + _BULKS + _AGGREGATES:
            raise ReplyError(f"unexpected reply type byte {bytes([t])!r}")
        line, nxt = self.line(pos)
        if t in _SIMPLE:
            if elems is not None:
                elems.append(_Item(t, nxt, line[1:]))
            return nxt, 0, None
        if len(line) > MAX_HEADER:
            raise ReplyError("reply header line too long")
        n = _reply_int(line[1:])
        if t in _BULKS:
            if n == -1:
                if elems is not None:
                    elems.append(_Item(t, nxt, None, -1))
                return nxt, 0, None
            if n < 0:
                raise ReplyError(f"invalid bulk length {n}")
            end = nxt + n + 2
            if end > len(data):
                self.stuck = pos
                raise _Incomplete
            if data[end - 2 : end] != b"\r\n":
                raise ReplyError("bulk payload not followed by CRLF")
            if elems is not None:
                elems.append(_Item(t, end, data[nxt : end - 2]))
            return end, 0, None
        # an aggregate
        if t == 0x7C:  # attribute: n pairs, then the value it annotates
            if n < 0:
                raise ReplyError(f"invalid attribute length {n}")
            if elems is not None:
                elems.append(_Item(t, nxt, None, n))  # spoils a confirmation
            p = nxt
            for _ in range(2 * n):
                p = self.value(p, False, subscribed)[0]
            return self.value(p, top, subscribed, elems)
        if n < -1:
            raise ReplyError(f"invalid aggregate length {n}")
        classify = top and (t == 0x3E or (t == 0x2A and subscribed))
        if elems is not None:
            elems.append(_Item(t, nxt, None, n))
        mine: list[_Item] | None = [] if classify else None
        p = nxt
        for _ in range(max(n, 0) * (2 if t == 0x25 else 1)):
            p = self.value(p, False, subscribed, mine)[0]
            if mine is not None and len(mine) == 3:
                _count(mine)  # read (and judged) as soon as it arrives
        if not classify:
            return p, 0, None
        assert mine is not None
        return (p, *_classify(t, n, mine))


def _classify(t: int, count: int, elems: list[_Item]) -> tuple[int, tuple | None]:
    """REPLY 0, PUSH 1, SUB_CONFIRM 2: a confirmation is [name, channel-or-nil, :count].

    The count is read whenever the first two elements look like a confirmation's (then a
    malformed one is an error), whatever the frame's length.
    """
    name = _name(elems)
    value = _count(elems)
    if value is not None and count == 3:
        nil = elems[1].type == 0x5F or elems[1].count == -1
        return 2, (name, None if nil else elems[1].content, value)
    if t == 0x3E:
        return 1, None
    if name in MESSAGE_NAMES:
        return 1, None
    return 0, None


def _name(elems: list[_Item]) -> bytes | None:
    first = elems[0] if elems else None
    return first.content if first is not None and first.type in _BULKS else None


def _count(elems: list[_Item]) -> int | None:
    """The count of what looks like a confirmation: a subscribe-family name, a channel
    (bulk or null), then `:n`; None when it does not look like one."""
    if _name(elems) not in SUB_NAMES or len(elems) < 3:
        return None
    chan, num = elems[1], elems[2]
    if not (chan.type in _BULKS or chan.type == 0x5F) or num.type != 0x3A:
        return None
    if len(num.content or b"") + 1 > MAX_HEADER:
        raise ReplyError("reply header line too long")
    return _reply_int(num.content or b"")


def frame_replies(data: bytes, subscribed: bool) -> ReplyResult:
    """Every complete top-level frame in data: (end, kind, (name, channel, count) or None)."""
    res = ReplyResult()
    parser = _Replies(data)
    pos = 0
    while pos < len(data):
        try:
            end, kind, confirm = parser.value(pos, True, subscribed)
        except _Incomplete:
            res.status, res.pending = "incomplete", parser.stuck
            return res
        except ReplyError as exc:
            res.status, res.message = "error", str(exc)
            return res
        res.frames.append((end, kind, confirm))
        pos = end
    return res
