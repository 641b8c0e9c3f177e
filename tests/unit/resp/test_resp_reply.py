"""Reply framer: frame ends for every RESP2/RESP3 type, push classification, resumability."""

from __future__ import annotations

import tracemalloc

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.resp.reply import (
    PUSH,
    REPLY,
    SUB_CONFIRM,
    Event,
    ReplyFramer,
    ReplyProtocolError,
    SubConfirm,
)
from proxy.resp.request import ProtocolError

MiB = 1024 * 1024


def frames(pieces: list[bytes], subscribed: bool = False) -> list[Event]:
    """Events of a stream fed in pieces, offsets made absolute."""
    framer = ReplyFramer()
    framer.subscribed = subscribed
    out: list[Event] = []
    base = 0
    for piece in pieces:
        out.extend((end + base, kind, info) for end, kind, info in framer.feed(piece))
        base += len(piece)
        assert framer.at_boundary == (base == (out[-1][0] if out else 0))
    return out


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def ends(*values: bytes) -> list[int]:
    out, pos = [], 0
    for v in values:
        pos += len(v)
        out.append(pos)
    return out


def bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def arr(*items: bytes, t: bytes = b"*") -> bytes:
    return t + b"%d\r\n" % len(items) + b"".join(items)


# ------------------------------------------------------------------ every type

SINGLE = [
    b"+OK\r\n",
    b"+\r\n",
    b"-ERR unknown command 'FOO'\r\n",
    b":0\r\n",
    b":-9223372036854775808\r\n",
    bulk(b""),
    bulk(b"hello"),
    bulk(b"\r\n$5\r\n*1\r\n"),  # framing bytes inside a payload
    b"$-1\r\n",
    b"*-1\r\n",
    b"*0\r\n",
    arr(bulk(b"a"), b":1\r\n", b"$-1\r\n", arr(b"+x\r\n", arr())),
    b"_\r\n",
    b",3.14\r\n",
    b",-inf\r\n",
    b"#t\r\n",
    b"!21\r\nSYNTAX invalid syntax\r\n",
    b"=15\r\ntxt:Some string\r\n",
    b"(3492890328409238509324850943850943825024385\r\n",
    b"%2\r\n+first\r\n:1\r\n+second\r\n*2\r\n:2\r\n:3\r\n",
    b"%0\r\n",
    b"~3\r\n+a\r\n:1\r\n#f\r\n",
    b">2\r\n+pushed\r\n:1\r\n",
    # An attribute prefixes the value it annotates: both are one frame.
    b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n*2\r\n:2039123\r\n:9543892\r\n",
    b"|0\r\n+OK\r\n",
    b"|1\r\n+a\r\n+b\r\n|1\r\n+c\r\n+d\r\n:1\r\n",  # attributes in a row
    b"*2\r\n|1\r\n+ttl\r\n:3600\r\n$1\r\nv\r\n:2\r\n",  # an attribute inside an array
    b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
]


@pytest.mark.parametrize("value", SINGLE)
def test_each_type_is_one_frame(value: bytes) -> None:
    stream = value + b"+OK\r\n" + value
    expected = [(e, REPLY if value[:1] != b">" else PUSH, None) for e in ends(value)]
    expected.append((len(value) + 5, REPLY, None))
    expected.append((len(stream), expected[0][1], None))
    assert frames([stream]) == expected
    assert frames(bytewise(stream)) == expected


def test_deep_nesting_uses_no_recursion() -> None:
    depth = 50_000
    value = b"*1\r\n" * depth + b":1\r\n"
    assert frames([value]) == [(len(value), REPLY, None)]


def test_many_frames_in_one_chunk() -> None:
    values = [b"+OK\r\n", bulk(b"v" * 64), b":42\r\n", arr(bulk(b"a"), bulk(b"b"))] * 250
    stream = b"".join(values)
    assert frames([stream]) == [(e, REPLY, None) for e in ends(*values)]


def test_partial_frame_yields_nothing_until_complete() -> None:
    framer = ReplyFramer()
    assert framer.feed(b"*2\r\n$3\r\nfoo\r\n") == []
    assert not framer.at_boundary
    assert framer.feed(b":1") == []
    assert framer.feed(b"\r\n+OK\r\n") == [(2, REPLY, None), (7, REPLY, None)]
    assert framer.at_boundary


def test_longest_header_split_before_its_lf() -> None:
    header = b"$" + b"0" * 62 + b"3"  # 64 bytes: the longest header line held
    stream = header + b"\r\nabc\r\n+OK\r\n"
    expected = [(len(stream) - 5, REPLY, None), (len(stream), REPLY, None)]
    assert frames([stream]) == expected
    assert frames([header + b"\r", stream[len(header) + 1 :]]) == expected
    with pytest.raises(ReplyProtocolError, match="too long"):
        frames([b"$" + b"0" * 63 + b"3\r\nabc\r\n"])
    with pytest.raises(ReplyProtocolError, match="too long"):
        frames([b"$" + b"0" * 63 + b"3\r", b"\nabc\r\n"])


# ------------------------------------------------------------------ big values


def test_big_bulk_in_chunks_is_skipped_not_buffered() -> None:
    size = 64 * MiB
    header = b"$%d\r\n" % size
    block = b"x" * (64 * 1024)
    framer = ReplyFramer()
    tracemalloc.start()
    try:
        assert framer.feed(header + block[: len(block) - len(header)]) == []
        for _ in range(size // len(block) - 1):
            assert framer.feed(block) == []
        assert framer.feed(b"x" * len(header) + b"\r") == []
        events = framer.feed(b"\n+OK\r\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert events == [(1, REPLY, None), (6, REPLY, None)]
    assert peak < 1 * MiB  # the payload was never held


def test_big_bulk_inside_an_array_split_anywhere() -> None:
    value = arr(bulk(b"k"), bulk(bytes(range(256)) * 1000), b":7\r\n")
    stream = value + b"+OK\r\n"
    expected = [(len(value), REPLY, None), (len(stream), REPLY, None)]
    for cut in range(0, len(stream), 997):
        assert frames([stream[:cut], stream[cut:]]) == expected
    assert frames(split_at(stream, list(range(0, len(stream), 4096)))) == expected


# ------------------------------------------------------------------ classification

SUB = arr(bulk(b"subscribe"), bulk(b"news"), b":1\r\n")
PSUB = arr(bulk(b"psubscribe"), bulk(b"n*"), b":2\r\n")
SSUB = arr(bulk(b"ssubscribe"), bulk(b"shard"), b":1\r\n")
UNSUB_NIL = arr(bulk(b"unsubscribe"), b"$-1\r\n", b":0\r\n")
MSG = arr(bulk(b"message"), bulk(b"news"), bulk(b"hello"))
PMSG = arr(bulk(b"pmessage"), bulk(b"n*"), bulk(b"news"), bulk(b"hello"))
SMSG = arr(bulk(b"smessage"), bulk(b"shard"), bulk(b"hello"))
PONG = arr(bulk(b"pong"), bulk(b""))


def kinds(pieces: list[bytes], subscribed: bool) -> list[tuple[int, SubConfirm | None]]:
    return [(kind, info) for _, kind, info in frames(pieces, subscribed)]


def test_resp2_subscribed_mode() -> None:
    stream = SUB + PSUB + SSUB + MSG + PMSG + SMSG + PONG + b"-ERR only SUBSCRIBE\r\n" + UNSUB_NIL
    expected = [
        (SUB_CONFIRM, SubConfirm(b"subscribe", b"news", 1)),
        (SUB_CONFIRM, SubConfirm(b"psubscribe", b"n*", 2)),
        (SUB_CONFIRM, SubConfirm(b"ssubscribe", b"shard", 1)),
        (PUSH, None),
        (PUSH, None),
        (PUSH, None),
        (REPLY, None),
        (REPLY, None),
        (SUB_CONFIRM, SubConfirm(b"unsubscribe", None, 0)),
    ]
    assert kinds([stream], subscribed=True) == expected
    assert kinds(bytewise(stream), subscribed=True) == expected


def test_resp2_unsubscribed_arrays_are_replies() -> None:
    # LRANGE of a list that happens to start with "message": an ordinary reply.
    stream = MSG + SUB + PMSG
    assert kinds([stream], subscribed=False) == [(REPLY, None)] * 3


def test_resp3_pushes_whatever_the_flag() -> None:
    push_sub = arr(bulk(b"subscribe"), bulk(b"news"), b":1\r\n", t=b">")
    push_msg = arr(bulk(b"message"), bulk(b"news"), bulk(b"hi"), t=b">")
    invalidate = arr(bulk(b"invalidate"), arr(bulk(b"k")), t=b">")
    attributed = b"|1\r\n+a\r\n+b\r\n" + push_msg
    stream = push_sub + b"+OK\r\n" + push_msg + invalidate + attributed + MSG
    for subscribed in (False, True):
        expected = [
            (SUB_CONFIRM, SubConfirm(b"subscribe", b"news", 1)),
            (REPLY, None),
            (PUSH, None),
            (PUSH, None),
            (PUSH, None),
            (PUSH if subscribed else REPLY, None),
        ]
        assert kinds([stream], subscribed) == expected
        assert kinds(bytewise(stream), subscribed) == expected


@pytest.mark.parametrize(
    "value",
    [
        arr(bulk(b"subscribe"), bulk(b"news")),  # too short
        arr(bulk(b"subscribe"), bulk(b"news"), b":1\r\n", b":2\r\n"),  # too long
        arr(bulk(b"subscribe"), bulk(b"news"), bulk(b"1")),  # count not an integer
        arr(bulk(b"subscribe"), arr(), b":1\r\n"),  # channel not a string
        arr(b"+subscribe\r\n", bulk(b"news"), b":1\r\n"),  # name not a bulk string
        arr(bulk(b"SUBSCRIBE"), bulk(b"news"), b":1\r\n"),  # Redis sends lower case
        arr(bulk(b"pong"), bulk(b"news"), b":1\r\n"),
    ],
)
def test_not_quite_confirmations(value: bytes) -> None:
    assert kinds([value], subscribed=True) == [(REPLY, None)]
    assert kinds([b">" + value[1:]], subscribed=False) == [(PUSH, None)]


def test_confirmation_fields_split_across_chunks() -> None:
    channel = bytes(range(256)) * 40  # a long binary channel name
    value = arr(bulk(b"sunsubscribe"), bulk(channel), b":12345\r\n")
    expected = [(SUB_CONFIRM, SubConfirm(b"sunsubscribe", channel, 12345))]
    for cut in [*range(0, 40), *range(40, len(value), 509)]:
        assert kinds([value[:cut], value[cut:]], subscribed=True) == expected
    assert kinds(bytewise(value), subscribed=True) == expected


def test_resp3_nil_channel_is_a_confirmation() -> None:
    # Found by tests/fuzz: Redis 7 confirms an UNSUBSCRIBE with no subscriptions left to a
    # RESP3 client with RESP3's null `_` as the channel (RESP2: `$-1`). It was classified
    # as a PUSH, so the UNSUBSCRIBE waiting for its confirmation never got one.
    for name in (b"unsubscribe", b"punsubscribe", b"sunsubscribe"):
        value = arr(bulk(name), b"_\r\n", b":0\r\n", t=b">")
        expected = [(SUB_CONFIRM, SubConfirm(name, None, 0))]
        for cut in range(len(value) + 1):
            assert kinds([value[:cut], value[cut:]], subscribed=True) == expected, cut
        assert kinds(bytewise(value), subscribed=False) == expected
    # Null elsewhere is no channel: still not a confirmation.
    assert kinds([arr(b"_\r\n", bulk(b"c"), b":0\r\n", t=b">")], False) == [(PUSH, None)]


def test_bad_type_byte_of_a_held_count_line_is_refused_at_once() -> None:
    # Found by tests/fuzz: the third element of a would-be confirmation, cut before its
    # CRLF, was held whatever its type byte; now refused like any other bad type byte.
    framer = ReplyFramer()
    with pytest.raises(ReplyProtocolError, match="unexpected reply type byte"):
        framer.feed(b">3\r\n" + bulk(b"subscribe") + bulk(b"c") + b"21474836")


def test_flag_is_read_per_frame_with_max_frames() -> None:
    # One chunk: the LRANGE reply before SUBSCRIBE, its confirmation, then a message.
    # The caller steps frame by frame and enters subscribed mode exactly in between.
    chunk = MSG + SUB + MSG
    framer = ReplyFramer()
    got = []
    start = 0
    pending_subscribe_at = 1  # the caller's queue: SUBSCRIBE is the 2nd request
    while start < len(chunk):
        framer.subscribed = len(got) >= pending_subscribe_at
        events = framer.feed(chunk, start=start, max_frames=1)
        assert len(events) == 1
        got.append(events[0][1])
        start = events[0][0]
    assert got == [REPLY, SUB_CONFIRM, PUSH]
    assert framer.feed(chunk, start=len(chunk)) == []


def test_max_frames_stops_and_resumes() -> None:
    values = [b"+a\r\n", b":1\r\n", bulk(b"xyz"), arr(b":1\r\n")]
    stream = b"".join(values)
    framer = ReplyFramer()
    framer.feed(b"|1\r\n+k\r\n+v\r\n")  # a held top-level attribute spans chunks
    first = framer.feed(stream, max_frames=2)
    assert first == [(4, REPLY, None), (8, REPLY, None)]
    assert framer.feed(stream, start=8) == [(17, REPLY, None), (len(stream), REPLY, None)]
    framer = ReplyFramer()
    framer.feed(b"*2\r\n")
    with pytest.raises(ValueError, match="frame boundary"):
        framer.feed(b":1\r\n:2\r\n", start=4)


# ------------------------------------------------------------------ garbage


@pytest.mark.parametrize(
    "data",
    [
        b"?what\r\n",
        b"$abc\r\n",
        b"$-2\r\n",
        b"*-2\r\n",
        b"|-1\r\n",
        b"$3\r\nfooXY",
        b"$3\r\nfoo\n\r",
        b"$3\r\nfooX\n",
        b"$3\r\nfoo\rX",
        b"*1\r\n@\r\n",
        b"$" + b"1" * 100 + b"\r\n",
        b"%1 2\r\n",
    ],
)
def test_garbage_is_a_protocol_error(data: bytes) -> None:
    for pieces in ([data], bytewise(data)):
        framer = ReplyFramer()
        with pytest.raises(ReplyProtocolError):
            for piece in pieces:
                framer.feed(piece)
    assert issubclass(ReplyProtocolError, ProtocolError)


# ------------------------------------------------------------------ properties


def line(prefix: bytes) -> st.SearchStrategy[bytes]:
    text = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
    return text.map(lambda t: prefix + t + b"\r\n")


def blob(prefix: bytes) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=40).map(lambda b: prefix + b"%d\r\n%s\r\n" % (len(b), b))


scalars = st.one_of(
    line(b"+"),
    line(b"-"),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: b":%d\r\n" % i),
    blob(b"$"),
    st.just(b"$-1\r\n"),
    st.just(b"*-1\r\n"),
    st.just(b"_\r\n"),
    st.sampled_from([b",1.5\r\n", b",-inf\r\n", b",nan\r\n"]),
    st.sampled_from([b"#t\r\n", b"#f\r\n"]),
    blob(b"!"),
    st.binary(max_size=20).map(lambda b: b"=%d\r\ntxt:%s\r\n" % (len(b) + 4, b)),
    st.integers(0, 10**40).map(lambda i: b"(%d\r\n" % i),
    st.integers(60, 70000).map(
        lambda n: b"$%d\r\n%s\r\n" % (n, b"\r\n" * (n // 2) + b"x" * (n % 2))
    ),
    st.sampled_from([SUB, PSUB, UNSUB_NIL, MSG, PMSG, PONG]),
)


def aggregates(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    items = st.lists(children, max_size=4)
    pairs = st.lists(st.tuples(children, children), max_size=3)
    flat = lambda ps: b"".join(k + v for k, v in ps)  # noqa: E731
    return st.one_of(
        items.map(lambda xs: b"*%d\r\n" % len(xs) + b"".join(xs)),
        items.map(lambda xs: b"~%d\r\n" % len(xs) + b"".join(xs)),
        items.map(lambda xs: b">%d\r\n" % len(xs) + b"".join(xs)),
        pairs.map(lambda ps: b"%%%d\r\n" % len(ps) + flat(ps)),
        st.tuples(pairs, children).map(lambda pv: b"|%d\r\n" % len(pv[0]) + flat(pv[0]) + pv[1]),
    )


values = st.recursive(scalars, aggregates, max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(
    stream=st.lists(values, min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
    subscribed=st.booleans(),
)
def test_any_split_gives_the_same_frames(
    stream: list[bytes], cuts: list[int], subscribed: bool
) -> None:
    data = b"".join(stream)
    whole = frames([data], subscribed)
    assert [end for end, _, _ in whole] == ends(*stream)
    assert frames(split_at(data, cuts), subscribed) == whole


@settings(max_examples=30, deadline=None)
@given(stream=st.lists(values, min_size=1, max_size=4), subscribed=st.booleans())
def test_byte_by_byte_gives_the_same_frames(stream: list[bytes], subscribed: bool) -> None:
    data = b"".join(stream)
    assert frames(bytewise(data), subscribed) == frames([data], subscribed)


resp2_scalars = st.one_of(line(b"+"), st.integers(-5, 5).map(lambda i: b":%d\r\n" % i), blob(b"$"))
resp2_values = st.recursive(
    resp2_scalars,
    lambda c: st.lists(c, max_size=4).map(lambda xs: b"*%d\r\n" % len(xs) + b"".join(xs)),
    max_leaves=10,
)


@settings(max_examples=100, deadline=None)
@given(stream=st.lists(resp2_values, min_size=1, max_size=10))
def test_hiredis_agrees_on_frame_count(stream: list[bytes]) -> None:
    data = b"".join(stream)
    reader = hiredis.Reader()
    reader.feed(data)
    count = 0
    while reader.gets() is not False:
        count += 1
    assert len(frames([data])) == count == len(stream)


reply_fragment = st.sampled_from(
    [b"*1\r\n", b"*2\r\n", b">1\r\n", b"%1\r\n", b"|1\r\n", b"*-1\r\n", b"$1\r\n", b"$3\r\n"]
    + [b"$-1\r\n", b"$-2\r\n", b"+OK\r\n", b":1\r\n", b"a", b"abc", b"\r\n", b"\r", b"\n"]
    + [b"$", b"*", b"+", b":", b"?", b"1", b"-"]
)


@settings(max_examples=300, deadline=None)
@given(
    stream=st.lists(reply_fragment, max_size=25).map(b"".join),
    cuts=st.lists(st.integers(min_value=0), max_size=6),
)
def test_any_split_of_any_stream_agrees(stream: bytes, cuts: list[int]) -> None:
    def outcome(pieces: list[bytes]) -> list[Event] | None:
        try:
            return frames(pieces, subscribed=True)
        except ReplyProtocolError:
            return None

    whole = outcome([stream])
    assert outcome(split_at(stream, cuts)) == whole
    assert outcome(bytewise(stream)) == whole
