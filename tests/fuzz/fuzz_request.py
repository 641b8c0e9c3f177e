"""Request framer harness: RequestFramer against the reference parser and hiredis.

Input: byte 0 picks small or default limits (bit 0) and a chunking seed (the rest);
with small limits bytes 1-4 set them; the rest is the client's byte stream.

Properties, for every input:
- only ProtocolError (LimitExceeded is one) is raised, and it carries the commands
  framed before it;
- the commands, and the error, equal the reference parser's on the whole stream; on an
  incomplete stream `buffered` is exactly the partial command's bytes;
- feeding the stream in chunks (any cut points, and byte by byte for short streams) gives
  the same commands and the same error as one feed;
- limits hold: no command over max_args, no argument over max_bulk_bytes, no multibulk
  command whose encoding is over max_query_buffer_bytes;
- `verbatim` is only claimed for a chunk that is exactly the re-encoded commands;
- hiredis reads the same commands from the same bytes when they are all multibulk.
"""

from __future__ import annotations

import hiredis

from proxy.resp.request import LimitExceeded, ProtocolError, RequestFramer, encode_command
from tests.fuzz.common import chunks
from tests.fuzz.reference import Limits, frame_requests


def decode(data: bytes) -> tuple[Limits, int, bytes]:
    if not data:
        return Limits(), 0, b""
    head = data[0]
    if head & 1 and len(data) >= 5:
        lim = Limits(max_bulk_bytes=1 + data[1] % 40, max_query_buffer_bytes=8 + 2 * data[2],
                     max_args=1 + data[3] % 8, max_inline_bytes=1 + data[4] % 80)
        return lim, head >> 1, data[5:]
    return Limits(), head >> 1, data[1:]


Outcome = tuple[list[list[bytes]], tuple[bool, str] | None, int]


def feed_all(framer: RequestFramer, parts: list[bytes]) -> Outcome:
    """(commands, (is_limit, message) or None, buffered) after feeding every part."""
    commands: list[list[bytes]] = []
    for part in parts:
        try:
            got = framer.feed(part)
        except ProtocolError as exc:
            commands += exc.commands
            return commands, (isinstance(exc, LimitExceeded), str(exc)), -1
        if framer.verbatim:
            assert got and b"".join(encode_command(a) for a in got) == part, \
                "verbatim claimed for bytes that are not the canonical commands"
        commands += got
    return commands, None, framer.buffered


def check(data: bytes) -> None:
    lim, seed, stream = decode(data)
    ref = frame_requests(stream, lim)
    whole = feed_all(RequestFramer(**lim.kwargs()), [stream])
    commands, error, buffered = whole

    # Against the reference.
    assert commands == ref.commands[: len(commands)], "commands differ from the reference"
    if ref.status == "error":
        assert commands == ref.commands
        assert error == (ref.limit, ref.message), f"error {error} != reference {ref.message!r}"
    elif ref.status == "ok":
        assert error is None, f"framer refused what the reference accepts: {error}"
        assert commands == ref.commands and buffered == 0
    else:  # incomplete: the framer waits with the partial command, or judged it early
        assert commands == ref.commands
        if error is None:
            assert buffered == len(stream) - ref.pending, "buffered is not the partial command"
        else:
            assert _judged_early(error[1], stream, ref.pending, lim), error

    # Limits.
    for argv, inline in zip(commands, ref.inline, strict=False):
        assert len(argv) <= lim.max_args
        if not inline:
            assert all(len(a) <= lim.max_bulk_bytes for a in argv)
            assert len(encode_command(argv)) <= lim.max_query_buffer_bytes

    # Chunking never changes the outcome.
    parts = list(chunks(stream, seed))
    assert feed_all(RequestFramer(**lim.kwargs()), parts)[:2] == whole[:2], "split differs"
    if len(stream) <= 300:
        one = [stream[i : i + 1] for i in range(len(stream))]
        assert feed_all(RequestFramer(**lim.kwargs()), one)[:2] == whole[:2], "bytewise differs"

    # hiredis, a reply parser, reads multibulk requests as arrays of bulk strings.
    if commands and not any(ref.inline) and not ref.skipped_empty:
        reader = hiredis.Reader()
        reader.feed(stream[: ref.consumed])
        theirs = []
        while (item := reader.gets()) is not False:
            theirs.append(item)
        assert theirs == commands, "hiredis reads other commands"


def _judged_early(message: str, stream: bytes, pending: int, lim: Limits) -> bool:
    """A partial command refused before it is complete: only where no continuation
    could make it valid (a too-long line, a CR not followed by LF)."""
    rest = stream[pending:]
    if message == "too big inline request":
        return len(rest) > lim.max_inline_bytes
    if message.startswith("too big"):
        return len(rest) > 64 * 1024
    # A header line with a CR followed by something other than LF.
    return any(rest[i] == 13 and rest[i + 1] != 10 for i in range(len(rest) - 1))
