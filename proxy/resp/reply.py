"""Reply framer: finds where each backend reply ends, without decoding or copying it.

The proxy relays backend bytes raw; it only needs the boundaries of top-level frames
(to keep replies in request order and slot local replies in between) and which frames
answer nothing (pub/sub messages, RESP3 pushes). Bulk payloads are skipped by length,
never buffered, so a 512 MiB reply costs the framer nothing but a counter; only a
header line cut by a chunk boundary is held (at most `_MAX_HEADER` bytes).

Classification of a top-level frame:
- `>` push: SUB_CONFIRM if it is a subscribe-family confirmation
  (`[name, channel-or-nil, count]`), else PUSH;
- `*` array while `subscribed` (a RESP2 client in subscribed mode): PUSH if its first
  element is message/pmessage/smessage, SUB_CONFIRM if it is a confirmation, else REPLY;
- anything else: REPLY.
`subscribed` is read when a frame's first byte is scanned. If it must change between
two frames of one chunk (the first confirmation of a SUBSCRIBE, the last one of an
UNSUBSCRIBE), feed that chunk frame by frame with `max_frames=1` and `start=`, setting
the flag in between; `feed()` stops at any frame boundary on request.
"""

from __future__ import annotations

from typing import NamedTuple

from proxy.resp.request import ProtocolError

REPLY = 0  # answers the oldest pending request
PUSH = 1  # out of band: answers nothing
SUB_CONFIRM = 2  # a subscribe-family confirmation: one of a SUBSCRIBE-family request's

SUB_NAMES = frozenset(
    {b"subscribe", b"unsubscribe", b"psubscribe", b"punsubscribe", b"ssubscribe", b"sunsubscribe"}
)
MESSAGE_NAMES = frozenset({b"message", b"pmessage", b"smessage"})


class SubConfirm(NamedTuple):
    """The fields of a subscribe-family confirmation."""

    name: bytes  # b"subscribe", b"unsubscribe", ... exactly as Redis sent it
    channel: bytes | None  # None for Redis's nil channel (UNSUBSCRIBE with none left)
    count: int  # subscriptions the client still holds, as Redis reports it


# (end_offset, kind, SubConfirm for SUB_CONFIRM else None); end_offset indexes the
# chunk passed to feed(), just past the frame's last byte.
Event = tuple[int, int, SubConfirm | None]


class ReplyProtocolError(ProtocolError):
    """The backend sent something that is not RESP2/RESP3: the stream is unusable."""


# Longest header or integer line worth holding: `$`/`*`/`:` lines carry a 64-bit integer.
_MAX_HEADER = 64
_NAME_MAX = 16  # longer first elements cannot be a pub/sub name: not captured

_BULKS = frozenset(b"$=!")  # length-prefixed bodies
_AGGREGATES = frozenset(b"*>~%|")
_SIMPLE = frozenset(b"+-:_,#(")  # one line, content irrelevant to framing
_NOT_CAPTURED = object()  # an element that cannot belong to a confirmation
# `$len` lines looked up rather than parsed (the common case: short bulk replies).
_BULK_LEN = {b"$%d" % i: i for i in range(-1, 8192)}


def _header_int(buf: bytes, pos: int, e: int) -> int:
    """The integer of the header line buf[pos:e] (after its type byte)."""
    if e - pos > _MAX_HEADER:
        raise ReplyProtocolError("reply header line too long")
    return int(buf[pos + 1 : e])


class ReplyFramer:
    """Resumable framer for one backend connection's reply stream.

    State between chunks: the stack of open aggregates (elements still expected each;
    attributes flagged, since an attribute does not count as its parent's element),
    then at most one of: a bulk body still to skip, a simple line still to skip (and
    whether its last byte so far was CR), or a held partial header line.
    """

    __slots__ = (
        "subscribed",
        "_stack",
        "_attrs",
        "_skip",
        "_in_line",
        "_cr",
        "_held",
        "_top",
        "_top_count",
        "_cap",
        "_cap_left",
        "_capbuf",
    )

    def __init__(self) -> None:
        self.subscribed = False
        self._stack: list[int] = []
        self._attrs: list[bool] = []
        self._skip = 0  # bytes of a bulk body (with its CRLF) still to skip
        self._in_line = False  # inside a simple line cut by a chunk boundary
        self._cr = False  # ... whose last byte so far was CR
        self._held = bytearray()  # a header line cut by a chunk boundary
        # Type byte of the current frame when it needs classifying; 1 for a frame only
        # begun by an attribute (so far).
        self._top = 0
        self._top_count = 0  # its element count
        self._cap: list[object] = []  # its first elements, captured for classifying
        self._cap_left = 0  # how many more of them to capture
        self._capbuf: bytearray | None = None  # a captured bulk cut by a chunk boundary

    @property
    def at_boundary(self) -> bool:
        """True between frames (no partial frame held)."""
        return not (self._stack or self._skip or self._in_line or self._held or self._top)

    def feed(self, data: bytes, start: int = 0, max_frames: int = 0) -> list[Event]:
        """Scan data from `start`; return an event for every frame completing in it.

        With max_frames > 0, stop after that many events; call again with `start` set
        to the last event's end_offset to go on with the same chunk. Raises
        ReplyProtocolError on bytes that are not RESP.
        """
        if start and not self.at_boundary:
            raise ValueError("feed(start=...) only resumes a chunk at a frame boundary")
        events: list[Event] = []
        pos = start
        done = False  # a value ended just before pos
        buf = data
        base = 0  # offset of data in buf
        if self._skip:
            pos = self._skip_body(data, pos)
            if pos < 0:
                return events
            done = True
        elif self._in_line:
            pos = self._skip_line(data, pos)
            if pos < 0:
                return events
            done = True
        elif self._held:
            # Re-scan the held header together with the chunk (held is a few bytes;
            # the chunk is copied once, and only when a header straddled chunks).
            held = self._held
            base = len(held)
            buf = bytes(held) + data
            held.clear()
        n = len(buf)
        stack = self._stack
        attrs = self._attrs
        cap_left = self._cap_left
        top = self._top
        append = events.append
        bulk_len = _BULK_LEN.get
        try:
            while True:
                if done:
                    # A value ended at pos: count it in its aggregate, or end the frame.
                    done = False
                    if stack:
                        r = stack[-1] - 1
                        if r:
                            stack[-1] = r
                        elif _close(stack, attrs):
                            done = True
                        elif not stack and not top:
                            top = 1  # a top-level attribute ended: its value follows
                    else:
                        done = True
                    if done:  # the top-level frame ended at pos
                        done = False
                        if top:
                            append((pos - base, *self._classify(top)))
                            top = cap_left = 0
                        else:
                            append((pos - base, REPLY, None))
                        if max_frames and len(events) >= max_frames:
                            break
                if pos >= n:
                    break
                e = buf.find(b"\r\n", pos)
                if e < 0:
                    cap_left = self._hold(buf, pos, cap_left, len(stack))
                    break
                t = buf[pos]
                if t == 36 or t in _BULKS:
                    ln = bulk_len(buf[pos:e])
                    if ln is None:
                        ln = _header_int(buf, pos, e)
                    p = e + 2
                    if ln >= 0:
                        end = p + ln + 2
                        if end > n:  # the body goes on in later chunks
                            cap_left = self._start_skip(buf, p, ln, cap_left, len(stack))
                            break
                        if buf[end - 2] != 13 or buf[end - 1] != 10:
                            raise ReplyProtocolError("bulk payload not followed by CRLF")
                        if cap_left and len(stack) == 1:
                            cap_left = self._capture_bulk(buf, p, ln, cap_left)
                        pos = end
                    elif ln == -1:
                        if cap_left and len(stack) == 1:
                            cap_left = self._capture(None, cap_left)
                        pos = p
                    else:
                        raise ReplyProtocolError(f"invalid bulk length {ln}")
                elif t in _SIMPLE:
                    if cap_left and len(stack) == 1:
                        cap_left = self._capture_line(buf[pos:e], cap_left)
                    pos = e + 2
                elif t in _AGGREGATES:
                    cnt = _header_int(buf, pos, e)
                    pos = e + 2
                    if not stack:
                        if t != 124 and (t == 62 or (t == 42 and self.subscribed)):
                            top = t  # a frame to classify: capture its first elements
                            self._top_count = cnt
                            self._cap = []
                            cap_left = 3
                    elif cap_left and len(stack) == 1:
                        cap_left = self._capture(_NOT_CAPTURED, cap_left)
                    if cnt > 0:
                        # Maps and attributes hold two values per entry.
                        stack.append(cnt * 2 if t == 37 or t == 124 else cnt)
                        attrs.append(t == 124)
                    elif t == 124:
                        if cnt:
                            raise ReplyProtocolError(f"invalid attribute length {cnt}")
                        if not stack and not top:
                            top = 1  # an empty attribute: the value it annotates follows
                    elif cnt == 0 or cnt == -1:
                        done = True  # empty or null aggregate
                    else:
                        raise ReplyProtocolError(f"invalid aggregate length {cnt}")
                    continue
                else:
                    raise ReplyProtocolError(f"unexpected reply type byte {bytes([t])!r}")
                # A scalar ended at pos.
                if stack or top:
                    done = True
                else:  # the common case: a whole top-level scalar reply
                    append((pos - base, REPLY, None))
                    if max_frames and len(events) >= max_frames:
                        break
        except ValueError as exc:  # int() of a malformed length
            raise ReplyProtocolError(f"malformed reply header: {exc}") from None
        finally:
            self._cap_left = cap_left
            self._top = top
        return events

    # -- partial items at a chunk end

    def _hold(self, buf: bytes, pos: int, cap_left: int, depth: int) -> int:
        """No CRLF after pos: keep what the next chunk needs; return the new cap_left."""
        t = buf[pos]
        counted = cap_left == 1 and depth == 1  # this line may be a confirmation's count
        if t in _SIMPLE and not (t == 58 and counted):  # content not needed: skip to CRLF
            if cap_left and depth == 1:
                cap_left = self._capture(_nil_or_not_captured(t, cap_left), cap_left)
            self._in_line = True
            self._cr = buf[-1] == 13
            return cap_left
        if t not in _BULKS and t not in _AGGREGATES and t != 58:  # 58: a held count line
            raise ReplyProtocolError(f"unexpected reply type byte {bytes([t])!r}")
        if len(buf) - pos > _MAX_HEADER + 1:  # +1: the CR may already be here
            raise ReplyProtocolError("reply header line too long")
        self._held += buf[pos:]
        return cap_left

    def _skip_line(self, data: bytes, pos: int) -> int:
        """Go on skipping a simple line; return the position after it, -1 if not yet."""
        if self._cr and data[pos : pos + 1] == b"\n":
            self._in_line = self._cr = False
            return pos + 1
        e = data.find(b"\r\n", pos)
        if e < 0:
            if len(data) > pos:
                self._cr = data[-1] == 13
            return -1
        self._in_line = self._cr = False
        return e + 2

    def _start_skip(self, buf: bytes, p: int, ln: int, cap_left: int, depth: int) -> int:
        """A bulk body starting at p runs past the chunk: skip it across chunks."""
        if cap_left and depth == 1:
            if cap_left == 2 or (cap_left == 3 and ln <= _NAME_MAX):
                self._capbuf = bytearray()  # collected while skipping
            else:
                cap_left = self._capture(_NOT_CAPTURED, cap_left)
        self._skip = ln + 2
        self._cap_left = cap_left
        self._skip_body(buf, p)
        return self._cap_left

    def _skip_body(self, data: bytes, pos: int) -> int:
        """Skip body bytes; return the position after the body's CRLF, -1 if not yet."""
        k = self._skip  # bytes left, its CRLF included
        avail = len(data) - pos
        # The body's CR and LF sit at k-2 and k-1 from pos; check those present.
        if 0 <= k - 2 < avail and data[pos + k - 2] != 13:
            raise ReplyProtocolError("bulk payload not followed by CRLF")
        if k - 1 < avail and data[pos + k - 1] != 10:
            raise ReplyProtocolError("bulk payload not followed by CRLF")
        capbuf = self._capbuf
        if capbuf is not None and k > 2:
            capbuf += data[pos : pos + min(k - 2, avail)]
        if k > avail:
            self._skip = k - avail
            return -1
        self._skip = 0
        if capbuf is not None:
            self._capbuf = None
            self._cap_left = self._capture(bytes(capbuf), self._cap_left)
        return pos + k

    # -- classification

    def _capture_bulk(self, buf: bytes, p: int, ln: int, cap_left: int) -> int:
        if cap_left == 3 and ln > _NAME_MAX:
            return self._capture(_NOT_CAPTURED, cap_left)
        return self._capture(buf[p : p + ln], cap_left)

    def _capture_line(self, line: bytes, cap_left: int) -> int:
        if line[0] == 58 and cap_left == 1:  # ':' the confirmation's count
            if len(line) > _MAX_HEADER:
                raise ReplyProtocolError("reply header line too long")
            self._cap.append(int(line[1:]))
            return 0
        return self._capture(_nil_or_not_captured(line[0], cap_left), cap_left)

    def _capture(self, value: object, cap_left: int) -> int:
        """Record the next first-level element; return how many more are wanted."""
        self._cap.append(value)
        if cap_left == 3:  # the name: go on only for a confirmation
            return 2 if value in SUB_NAMES else 0
        if cap_left == 2:  # the channel: a bulk string or nil
            return 0 if value is _NOT_CAPTURED else 1
        return 0  # the count comes through _capture_line; anything else spoils it

    def _classify(self, top: int) -> tuple[int, SubConfirm | None]:
        cap = self._cap
        self._cap = []
        if self._top_count == 3 and len(cap) == 3 and type(cap[2]) is int:
            name, channel, count = cap
            return SUB_CONFIRM, SubConfirm(name, channel, count)  # type: ignore[arg-type]
        if top == 62:
            return PUSH, None
        if cap and cap[0] in MESSAGE_NAMES:
            return PUSH, None
        return REPLY, None


def _nil_or_not_captured(t: int, cap_left: int) -> object:
    """A simple line as a captured element: RESP3's null `_` in the channel's place is the
    nil channel (UNSUBSCRIBE with no subscriptions left, as Redis 7 sends it to a RESP3
    client: `>3 $11 unsubscribe _ :0`); any other simple line spoils a confirmation."""
    return None if t == 95 and cap_left == 2 else _NOT_CAPTURED


def _close(stack: list[int], attrs: list[bool]) -> bool:
    """The innermost aggregate got its last element: pop what ended; True if the frame did."""
    while True:
        stack.pop()
        if attrs.pop():
            return False  # an attribute ended: the value it annotates follows
        if not stack:
            return True
        r = stack[-1] - 1
        if r:
            stack[-1] = r
            return False
