"""Reply framer harness: ReplyFramer against the reference parser and hiredis.

Input: byte 0 is the `subscribed` flag (bit 0) and a chunking seed (the rest); the rest
is the backend's byte stream.

Properties, for every input:
- only ReplyProtocolError is raised;
- the frames (end offsets, kinds, subscribe confirmations) and the error equal the
  reference parser's;
- feeding in chunks, and frame by frame with `max_frames=1`/`start=`, gives the same
  frames and error as one feed; `at_boundary` is true exactly after the last frame;
- hiredis agrees on every boundary: each frame, given to a fresh hiredis reader, is one
  whole reply, and what follows the last frame is no complete reply (skipped where
  hiredis cannot judge: attributes `|` and blob errors `!`, which it does not support,
  nesting deeper than it allows, and scalar contents it validates but the framer
  deliberately never reads).
"""

from __future__ import annotations

import hiredis

from proxy.resp.reply import ReplyFramer, ReplyProtocolError
from tests.fuzz.common import chunks
from tests.fuzz.reference import MAX_HEADER, frame_replies

Frames = list[tuple[int, int, tuple | None]]


def _events(events: list, offset: int) -> Frames:
    return [(offset + end, kind, tuple(c) if c is not None else None)
            for end, kind, c in events]


def feed_all(parts: list[bytes], subscribed: bool, one_by_one: bool = False
             ) -> tuple[Frames, str | None, bool]:
    """(frames, error message or None, at_boundary) after feeding every part."""
    framer = ReplyFramer()
    framer.subscribed = subscribed
    frames: Frames = []
    offset = 0
    try:
        for part in parts:
            if one_by_one:
                got = framer.feed(part, max_frames=1)
                while got:
                    frames += _events(got, offset)
                    if got[-1][0] >= len(part):
                        break
                    got = framer.feed(part, start=got[-1][0], max_frames=1)
            else:
                frames += _events(framer.feed(part), offset)
            offset += len(part)
    except ReplyProtocolError as exc:
        return frames, str(exc), False
    return frames, None, framer.at_boundary


def check(data: bytes) -> None:
    subscribed = bool(data[:1] and data[0] & 1)
    seed = data[0] >> 1 if data else 0
    stream = data[1:]
    ref = frame_replies(stream, subscribed)
    frames, error, boundary = whole = feed_all([stream], subscribed)

    # On an error, feed() drops the frames it completed in that call (the stream is
    # unusable from there on): they are a prefix of the reference's.
    assert frames == ref.frames[: len(frames)], "frames differ from the reference"
    if ref.status == "error":
        assert error == ref.message, f"error {error!r} != reference {ref.message!r}"
    elif ref.status == "ok":
        assert error is None, f"framer refused what the reference accepts: {error}"
        assert frames == ref.frames and boundary
    else:
        if error is None:
            assert frames == ref.frames
            assert not boundary, "at_boundary inside a partial frame"
        else:
            assert _judged_early(error, stream, ref.pending), error

    parts = list(chunks(stream, seed))
    _same(feed_all(parts, subscribed), whole, ref.frames, "split differs")
    _same(feed_all([stream], subscribed, one_by_one=True), whole, ref.frames,
          "max_frames=1 differs")
    if len(stream) <= 200:
        one = [stream[i : i + 1] for i in range(len(stream))]
        _same(feed_all(one, subscribed), whole, ref.frames, "bytewise differs")

    if b"|" not in stream and b"!" not in stream:
        _hiredis_agrees(stream, [end for end, _, _ in frames], error)


def _same(got: tuple[Frames, str | None, bool], whole: tuple[Frames, str | None, bool],
          ref: Frames, what: str) -> None:
    if whole[1] is None:
        assert got == whole, what
    else:  # the same error; the frames returned before it depend on the chunking
        assert got[1] == whole[1] and got[0] == ref[: len(got[0])], what


def _judged_early(message: str, stream: bytes, pending: int) -> bool:
    """A partial item refused early: a header line already too long for any length,
    or a type byte that is none of RESP's."""
    rest = stream[pending:]
    if message == "reply header line too long":
        return b"\r\n" not in rest and len(rest) > MAX_HEADER + 1
    if message == "bulk payload not followed by CRLF":  # the bytes where CRLF belongs are here
        head, _, body = rest.partition(b"\r\n")
        tail = body[int(head[1:]) :][:2]
        return tail != b"\r\n"[: len(tail)]
    return message.startswith("unexpected reply type byte")


def _hiredis_agrees(stream: bytes, ends: list[int], error: str | None) -> None:
    start = 0
    for end in ends:
        reader = hiredis.Reader()
        reader.feed(stream[start:end])
        try:
            assert reader.gets() is not False, f"hiredis: frame {start}:{end} is incomplete"
            assert reader.gets() is False and not reader.has_data(), \
                f"hiredis: frame {start}:{end} holds more than one reply"
        except hiredis.ProtocolError:
            return  # content hiredis validates and the framer does not read: no verdict
        start = end
    if error is None:
        reader = hiredis.Reader()
        reader.feed(stream[start:])
        try:
            assert reader.gets() is False, "hiredis finds a reply the framer does not"
        except hiredis.ProtocolError:
            pass
