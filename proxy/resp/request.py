"""Request framer: client bytes -> argv lists, accepting exactly what Redis 7 accepts.

Mirrors Redis's `processMultibulkBuffer`, `processInlineBuffer` and `sdssplitargs`
(networking.c, sds.c), stricter where Redis is loose:

- header integers follow Redis's `string2ll`: `0` or `-?[1-9][0-9]*` within 64 bits,
  nothing else (no `+`, spaces, leading zeros, `-0`); `*n` may be negative (an empty
  command, skipped), `$len` may not;
- every header line and every bulk payload must end in exactly `\\r\\n` (Redis searches
  for `\\r` and skips the next byte unseen, and never checks the bytes after a payload);
- an inline line holding a NUL byte is refused (Redis's `strchr` never finds its end,
  so Redis hangs on it until the 64 KiB limit).

Limits are enforced as soon as a header declares them, before anything is read or
allocated for the value. A command whose encoded size exceeds `max_query_buffer_bytes`
is refused whatever the chunking, so results never depend on how TCP split the stream.
"""

from __future__ import annotations

import re
from functools import lru_cache

MiB = 1024 * 1024

# Redis's PROTO_INLINE_MAX_SIZE: the longest inline line and `*n`/`$len` header line.
HEADER_MAX_BYTES = 64 * 1024
_INT_MAX = 2**31 - 1
_LL_MIN, _LL_MAX = -(2**63), 2**63 - 1

# Header lines up to these values are looked up in a table instead of being parsed:
# one dict probe checks the type byte, the strict integer syntax and the value at once.
_COUNT_CACHE_MAX = 1024
_BULK_CACHE_MAX = 8192

# Splitting the buffer at CRLFs pays off for commands up to about this size (values
# under ~1.5 KiB); the framer tries it for the rest of a chunk after such a command.
_SMALL_COMMAND = 1536

# string2ll's syntax; the 64-bit range is checked after int().
_STRICT_INT = re.compile(rb"0|-?[1-9][0-9]{0,19}").fullmatch
# Bytes that make an inline line need the faithful sdssplitargs port: quotes, NUL, and
# \v \f (isspace() skips them between words but they do not end a word).
_INLINE_SPECIAL = re.compile(rb"[\"'\x00\x0b\x0c]").search


class ProtocolError(Exception):
    """Malformed request; str(exc) is the text after "-ERR Protocol error: ".

    `commands` holds the complete commands that preceded the error in the same
    `feed()` call (Redis would have executed them before failing); the framer is dead
    afterwards.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.commands: list[list[bytes]] = []


class LimitExceeded(ProtocolError):
    """A configured limit (bulk length, argument count, query buffer) was hit."""


def _string2ll(s: bytes) -> int | None:
    if _STRICT_INT(s) is None:
        return None
    v = int(s)
    return v if _LL_MIN <= v <= _LL_MAX else None


@lru_cache(maxsize=16)
def _count_table(max_args: int) -> dict[bytes, int]:
    return {b"*%d" % i: i for i in range(min(_COUNT_CACHE_MAX, max_args) + 1)}


@lru_cache(maxsize=16)
def _bulk_table(max_bulk: int) -> dict[bytes, int]:
    return {b"$%d" % i: i for i in range(min(_BULK_CACHE_MAX, max_bulk) + 1)}


# ---------------------------------------------------------------- inline commands

_ISSPACE = frozenset(b" \t\n\v\f\r")  # C isspace() in the C locale
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}
_UNQUOTED_END = frozenset(b" \n\r\t")


def split_inline(line: bytes) -> list[bytes]:
    """Split one inline request line (no trailing newline) like Redis's sdssplitargs.

    Raises ProtocolError("unbalanced quotes in request") where sdssplitargs fails.
    The line must not contain NUL (the caller refuses those).
    """
    if _INLINE_SPECIAL(line) is None:
        return line.split()  # same separators as sdssplitargs when no quote, \v, \f
    return _sdssplitargs(line)


def _sdssplitargs(line: bytes) -> list[bytes]:
    # A line-by-line port; `at(k)` returns 0 past the end like the C string's NUL.
    n = len(line)

    def at(k: int) -> int:
        return line[k] if k < n else 0

    out: list[bytes] = []
    i = 0
    while True:
        while i < n and line[i] in _ISSPACE:
            i += 1
        if i >= n:
            return out
        cur = bytearray()
        inq = insq = done = False
        while not done:
            c = at(i)
            if inq:
                if c == 0x5C and at(i + 1) == 0x78 and at(i + 2) in _HEX and at(i + 3) in _HEX:
                    cur.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == 0x5C and at(i + 1):
                    i += 1
                    cur.append(_ESCAPES.get(line[i], line[i]))
                elif c == 0x22:
                    # A closing quote must be followed by a space or nothing at all.
                    if at(i + 1) and at(i + 1) not in _ISSPACE:
                        raise ProtocolError("unbalanced quotes in request")
                    done = True
                elif c == 0:
                    raise ProtocolError("unbalanced quotes in request")
                else:
                    cur.append(c)
            elif insq:
                if c == 0x5C and at(i + 1) == 0x27:
                    i += 1
                    cur.append(0x27)
                elif c == 0x27:
                    if at(i + 1) and at(i + 1) not in _ISSPACE:
                        raise ProtocolError("unbalanced quotes in request")
                    done = True
                elif c == 0:
                    raise ProtocolError("unbalanced quotes in request")
                else:
                    cur.append(c)
            elif c == 0 or c in _UNQUOTED_END:
                done = True
            elif c == 0x22:
                inq = True
            elif c == 0x27:
                insq = True
            else:
                cur.append(c)
            if at(i):
                i += 1
        out.append(bytes(cur))


# ---------------------------------------------------------------- the framer


class RequestFramer:
    """Resumable request framer for one client connection.

    State between `feed()` calls: the partial command's argv so far, how many arguments
    are still expected, the length of a bulk whose header was read but whose payload
    has not fully arrived, and the unconsumed tail (a partial header/inline line, or a
    partial payload). A payload arriving in many chunks is appended, never re-scanned.
    """

    __slots__ = (
        "_max_bulk",
        "_max_query",
        "_max_args",
        "_max_inline",
        "_count_hdr",
        "_bulk_hdr",
        "_tail",
        "_scan",
        "_argv",
        "_left",
        "_bulk",
        "_carried",
        "_error",
        "_plain",
        "verbatim",
    )

    def __init__(
        self,
        *,
        max_bulk_bytes: int = 512 * MiB,
        max_query_buffer_bytes: int = 1024 * MiB,
        max_args: int = _INT_MAX,
        max_inline_bytes: int = HEADER_MAX_BYTES,
    ) -> None:
        for name, value in (
            ("max_bulk_bytes", max_bulk_bytes),
            ("max_query_buffer_bytes", max_query_buffer_bytes),
            ("max_args", max_args),
            ("max_inline_bytes", max_inline_bytes),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self._max_bulk = max_bulk_bytes
        self._max_query = max_query_buffer_bytes
        self._max_args = min(max_args, _INT_MAX)
        self._max_inline = max_inline_bytes
        self._count_hdr = _count_table(self._max_args)
        self._bulk_hdr = _bulk_table(max_bulk_bytes)
        self._tail = bytearray()  # unconsumed bytes: a partial line or a partial payload
        self._scan = 0  # how far _tail was already searched for a line end
        self._argv: list[bytes] | None = None  # the partial multibulk command
        self._left = 0  # arguments it still expects
        self._bulk = -1  # declared length of the payload being waited for, or -1
        self._carried = 0  # encoded bytes of the partial command already consumed
        self._error: ProtocolError | None = None
        self._plain = True  # no inline or empty command seen in this feed() so far
        # After feed(): the data was exactly the commands returned, each in canonical form
        # (`encode_command(argv)`), nothing held from before or kept for later. The header
        # syntax is strict (string2ll), so a multibulk command accepted here is canonical;
        # only inline and empty (`*0`, `*-1`) commands and chunk boundaries break this.
        self.verbatim = False

    @property
    def buffered(self) -> int:
        """Bytes held for the partial command (its parsed arguments and unparsed tail)."""
        return len(self._tail) + self._carried

    def feed(self, data: bytes) -> list[list[bytes]]:
        """Append data; return every complete command (argv) now available.

        Raises ProtocolError (or LimitExceeded) on malformed or oversized input, with
        the commands completed earlier in this call in `exc.commands`. The framer is
        dead afterwards: every later call raises the same error.
        """
        if self._error is not None:
            raise type(self._error)(str(self._error))
        out: list[list[bytes]] = []
        self.verbatim = False
        clean = not self._tail and self._argv is None
        self._plain = True
        try:
            tail = self._tail
            if tail:
                tail += data
                if not self._tail_ready():
                    return out
                if self._bulk >= 0:
                    buf = self._take_payload(out)
                else:
                    buf = bytes(tail)
                    tail.clear()
            elif self._bulk >= 0 and len(data) < self._bulk + 2:
                tail += data  # a payload is still arriving: just append
                return out
            else:
                buf = data
            self._run(buf, out)
        except ProtocolError as exc:
            self._error = exc
            exc.commands = out
            raise
        self.verbatim = bool(out) and clean and self._plain and not self._tail \
            and self._argv is None
        return out

    # -- slow paths around the tail

    def _tail_ready(self) -> bool:
        """Whether the tail now holds enough to make progress (raises on limits)."""
        tail = self._tail
        if self._bulk >= 0:
            return len(tail) >= self._bulk + 2
        if self._argv is not None or tail[0] == 0x2A:  # a `$len` or `*n` header line
            scan = max(self._scan - 1, 0)
            if tail.find(b"\r\n", scan) >= 0:
                return True
            self._check_open_header(tail, 0, scan)
        else:  # an inline line
            if tail.find(b"\n", self._scan) >= 0:
                return True
            if len(tail) > self._max_inline:
                raise ProtocolError("too big inline request")
        self._scan = len(tail)
        return False

    def _take_payload(self, out: list[list[bytes]]) -> bytes:
        """The awaited payload is complete in the tail: append it, return what follows."""
        tail = self._tail
        blen = self._bulk
        if tail[blen] != 13 or tail[blen + 1] != 10:
            raise ProtocolError("expected '\\r\\n' after bulk payload")
        with memoryview(tail) as mv:
            arg = bytes(mv[:blen])  # one copy, even for a 512 MiB value
            rest = bytes(mv[blen + 2 :])
        tail.clear()
        argv = self._argv
        assert argv is not None
        argv.append(arg)
        self._bulk = -1
        self._left -= 1
        self._carried += blen + 2
        if not self._left:
            out.append(argv)
            self._argv = None
            self._carried = 0
        return rest

    def _check_open_header(self, buf: bytes | bytearray, pos: int, scan: int) -> None:
        """Refuse a header line at pos that has no CRLF yet but can already be judged.

        Like Redis: a line whose first 64 KiB + 1 bytes hold no CR is too big. Stricter:
        a CR followed by anything but LF ends the line as malformed.
        """
        cr = buf.find(b"\r", scan, pos + HEADER_MAX_BYTES + 1)
        if cr < 0:
            if len(buf) - pos > HEADER_MAX_BYTES:
                if self._argv is not None:
                    raise ProtocolError("too big bulk count string")
                raise ProtocolError("too big mbulk count string")
        elif cr + 1 < len(buf):
            raise self._malformed_header(buf, pos)

    def _malformed_header(self, buf: bytes | bytearray, pos: int) -> ProtocolError:
        if self._argv is None:
            return ProtocolError("invalid multibulk length")
        if buf[pos] != 0x24:
            return ProtocolError(f"expected '$', got '{chr(buf[pos])}'")
        return ProtocolError("invalid bulk length")

    def _save(self, buf: bytes, pos: int) -> None:
        with memoryview(buf) as mv:
            self._tail += mv[pos:]
        self._scan = len(self._tail)

    # -- the parser

    def _run(self, buf: bytes, out: list[list[bytes]]) -> None:
        """Parse buf from its start, resuming the saved partial command if any."""
        n = len(buf)
        pos = 0
        if self._argv is not None:
            pos = self._resume(buf, out)
            if pos < 0:
                return
        # A small read (one command, or a short pipeline) is split at once: cheaper than
        # walking its first command by index.
        split_tried = False
        small = n - pos <= _SMALL_COMMAND
        while pos < n:
            # After a small command, split the rest once and check lengths token by
            # token: pipelined small commands. Big values are walked by index, never
            # copied and scanned by split.
            if small and not split_tried and buf[pos] == 0x2A and n - pos <= self._max_query:
                split_tried = True
                pos = self._run_split(buf, pos, out)
                if pos < 0:
                    return
            else:
                q = self._one(buf, pos, out)
                if q < 0:
                    return
                small = q - pos <= _SMALL_COMMAND
                pos = q

    def _run_split(self, buf: bytes, pos: int, out: list[list[bytes]]) -> int:
        """Fast path: frame the commands from pos on a split of the buffer at CRLFs.

        A command is taken from the tokens only if every `$len` token is a cached
        header equal to the length of the token after it; then the exact parser would
        have found the same CRLFs and payloads. Anything else (a payload holding CRLF, a
        big or malformed header, an inline line, the incomplete last command) goes to
        the exact parser for one command, and the token walk resumes after it.
        Returns the next position, or -1 when the tail was saved.
        """
        toks = (buf[pos:] if pos else buf).split(b"\r\n")
        nt = len(toks) - 1  # toks[nt] is whatever follows the last CRLF
        n = len(buf)
        ch = self._count_hdr.get
        bh = self._bulk_hdr.get
        append = out.append
        i = 0
        off = pos  # byte offset of toks[i] in buf, brought up to date at each exit
        while True:
            i0 = i
            while i < nt:
                argc = ch(toks[i])
                if argc == 2:
                    j = i + 5
                    if j > nt:
                        break
                    h1, a1, h2, a2 = toks[i + 1 : j]
                    if bh(h1) != len(a1) or bh(h2) != len(a2):
                        break
                    append([a1, a2])
                elif argc == 3:
                    j = i + 7
                    if j > nt:
                        break
                    h1, a1, h2, a2, h3, a3 = toks[i + 1 : j]
                    if bh(h1) != len(a1) or bh(h2) != len(a2) or bh(h3) != len(a3):
                        break
                    append([a1, a2, a3])
                else:
                    if argc is None:
                        break
                    j = i + 1 + 2 * argc
                    if j > nt:
                        break
                    ok = True
                    for k in range(i + 1, j, 2):
                        if bh(toks[k]) != len(toks[k + 1]):
                            ok = False
                            break
                    if not ok:
                        break
                    if argc:
                        append(toks[i + 2 : j : 2])
                    else:
                        self._plain = False
                i = j
            # Bring off up to toks[i], counting from whichever side has fewer tokens.
            if i - i0 <= nt - i:
                off += sum(map(len, toks[i0:i])) + 2 * (i - i0)
            else:
                off = n - sum(map(len, toks[i:])) - 2 * (nt - i)
            if off >= n:
                return n
            q = self._one(buf, off, out)
            if q < 0:
                return q
            while off < q:
                off += len(toks[i]) + 2
                i += 1
            if off != q:  # q is not at a CRLF (after an LF-only inline line)
                return q

    def _one(self, buf: bytes, pos: int, out: list[list[bytes]]) -> int:
        """Frame the one command at pos; return the next position, -1 if incomplete."""
        if buf[pos] != 0x2A:  # not '*': an inline command
            return self._inline(buf, pos, out)
        e = buf.find(b"\r\n", pos)
        if e < 0:
            self._wait_header(buf, pos, None, 0, pos)
            return -1
        argc = self._count_hdr.get(buf[pos:e])
        if argc is None:
            argc = self._parse_count(buf, pos, e)
        if argc <= 0:
            self._plain = False
            return e + 2  # Redis skips empty and negative-count commands
        return self._args(buf, e + 2, [], argc, pos, out)

    def _resume(self, buf: bytes, out: list[list[bytes]]) -> int:
        """Continue the multibulk command an earlier chunk boundary cut."""
        argv = self._argv
        assert argv is not None
        argc = self._left
        start = -self._carried  # the command began this many bytes before buf
        self._argv = None
        self._carried = 0
        pos = 0
        blen = self._bulk
        if blen >= 0:  # feed() made sure the whole payload is here
            self._bulk = -1
            if buf[blen] != 13 or buf[blen + 1] != 10:
                raise ProtocolError("expected '\\r\\n' after bulk payload")
            argv.append(buf[:blen])
            pos = blen + 2
            argc -= 1
        return self._args(buf, pos, argv, argc, start, out)

    def _args(
        self,
        buf: bytes,
        pos: int,
        argv: list[bytes],
        argc: int,
        start: int,
        out: list[list[bytes]],
    ) -> int:
        """Read argc more `$len` arguments into argv; next position, or -1 if incomplete."""
        bulk_hdr = self._bulk_hdr
        bound = start + self._max_query  # no argument may end past this (query limit)
        n = len(buf)
        if bound > n:
            bound = n
        while argc:
            e = buf.find(b"\r\n", pos)
            if e < 0:
                self._wait_header(buf, pos, argv, argc, start)
                return -1
            blen = bulk_hdr.get(buf[pos:e])
            if blen is None:
                blen = self._parse_bulk_len(buf, pos, e)
            p = e + 2
            end = p + blen
            if end + 2 > bound:
                self._wait_payload(buf, p, blen, argv, argc, start)
                return -1
            if buf[end] != 13 or buf[end + 1] != 10:
                raise ProtocolError("expected '\\r\\n' after bulk payload")
            argv.append(buf[p:end])
            pos = end + 2
            argc -= 1
        out.append(argv)
        return pos

    def _parse_count(self, buf: bytes, pos: int, e: int) -> int:
        if e - pos > HEADER_MAX_BYTES and buf.find(b"\r", pos, pos + HEADER_MAX_BYTES + 1) < 0:
            raise ProtocolError("too big mbulk count string")
        count = _string2ll(buf[pos + 1 : e])
        if count is None or count > _INT_MAX:
            raise ProtocolError("invalid multibulk length")
        if count > self._max_args:
            raise LimitExceeded("invalid multibulk length")
        return count

    def _parse_bulk_len(self, buf: bytes, pos: int, e: int) -> int:
        if e - pos > HEADER_MAX_BYTES and buf.find(b"\r", pos, pos + HEADER_MAX_BYTES + 1) < 0:
            raise ProtocolError("too big bulk count string")
        if buf[pos] != 0x24:
            raise ProtocolError(f"expected '$', got '{chr(buf[pos])}'")
        blen = _string2ll(buf[pos + 1 : e])
        if blen is None or blen < 0:
            raise ProtocolError("invalid bulk length")
        if blen > self._max_bulk:
            raise LimitExceeded("invalid bulk length")
        return blen

    def _wait_header(
        self, buf: bytes, pos: int, argv: list[bytes] | None, argc: int, start: int
    ) -> None:
        """No CRLF after pos: judge what can be judged already, keep the rest."""
        self._argv = argv
        self._check_open_header(buf, pos, pos)
        self._left = argc
        self._carried = pos - start if argv is not None else 0
        self._save(buf, pos)

    def _wait_payload(
        self, buf: bytes, p: int, blen: int, argv: list[bytes], argc: int, start: int
    ) -> None:
        """The payload at p is incomplete, or the command outgrows the query limit."""
        if p + blen + 2 - start > self._max_query:
            raise LimitExceeded("query buffer limit exceeded")
        self._argv = argv
        self._left = argc
        self._bulk = blen
        self._carried = p - start
        self._save(buf, p)

    def _inline(self, buf: bytes, pos: int, out: list[list[bytes]]) -> int:
        """Frame one inline command at pos; return the next position, -1 if incomplete."""
        self._plain = False
        e = buf.find(b"\n", pos)
        if e < 0:
            if len(buf) - pos > self._max_inline:
                raise ProtocolError("too big inline request")
            self._save(buf, pos)
            return -1
        if e - pos > self._max_inline:
            raise ProtocolError("too big inline request")
        line = buf[pos:e]
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\x00" in line:
            raise ProtocolError("NUL byte in inline request")
        argv = split_inline(line)
        if argv:  # blank lines are skipped, like Redis
            if len(argv) > self._max_args:
                raise LimitExceeded("too many arguments in inline request")
            out.append(argv)
        return e + 1


def encode_command(argv: list[bytes]) -> bytes:
    """Canonical RESP multibulk for argv: `*N\\r\\n` then `$len\\r\\narg\\r\\n` each."""
    # Each cached prefix is `\r\n$len\r\n`: it closes the previous line, so the
    # pieces join into one bytes object in a single copy.
    parts = [b"*%d" % len(argv)]
    prefix = _BULK_PREFIX
    for arg in argv:
        n = len(arg)
        parts.append(prefix[n] if n < _PREFIX_CACHE else b"\r\n$%d\r\n" % n)
        parts.append(arg)
    parts.append(b"\r\n")
    return b"".join(parts)


_PREFIX_CACHE = 4096
_BULK_PREFIX = [b"\r\n$%d\r\n" % i for i in range(_PREFIX_CACHE)]
