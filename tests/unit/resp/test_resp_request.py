"""Request framer: literal RESP cases, Redis's exact errors, limits, resumability."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import hiredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.resp.request import (
    LimitExceeded,
    ProtocolError,
    RequestFramer,
    encode_command,
    split_inline,
)

MiB = 1024 * 1024
HDR = 64 * 1024  # Redis's PROTO_INLINE_MAX_SIZE


def feed_all(framer: RequestFramer, pieces: list[bytes]) -> list[list[bytes]]:
    out: list[list[bytes]] = []
    for piece in pieces:
        out.extend(framer.feed(piece))
    return out


def outcome(pieces: list[bytes], **limits: int) -> tuple[list[list[bytes]], str | None]:
    """Every command framed, plus the error ('Class: message') that ended the stream."""
    framer = RequestFramer(**limits)
    out: list[list[bytes]] = []
    try:
        for piece in pieces:
            out.extend(framer.feed(piece))
    except ProtocolError as exc:
        out.extend(exc.commands)
        return out, f"{type(exc).__name__}: {exc}"
    return out, None


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# ------------------------------------------------------------------ literal cases

VALID = [
    (b"*1\r\n$4\r\nPING\r\n", [[b"PING"]]),
    (b"*2\r\n$3\r\nGET\r\n$0\r\n\r\n", [[b"GET", b""]]),
    (b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\na\r\nb\r\n", [[b"SET", b"k", b"a\r\nb"]]),
    (b"*1\r\n$2\r\n\r\n\r\n", [[b"\r\n"]]),
    (b"*1\r\n$3\r\n\x00\xff*\r\n", [[b"\x00\xff*"]]),
    # n <= 0 is an empty command: Redis skips it silently.
    (b"*0\r\n*-1\r\n*-9223372036854775808\r\n*1\r\n$1\r\na\r\n", [[b"a"]]),
    (b"*4\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n$1\r\nd\r\n", [[b"a", b"b", b"c", b"d"]]),
    (b"*1\r\n$10000\r\n" + b"x" * 10000 + b"\r\n", [[b"x" * 10000]]),  # past the header cache
    # Inline: LF or CRLF ends the line; blank lines are skipped.
    (b"PING\r\n", [[b"PING"]]),
    (b"PING\n", [[b"PING"]]),
    (b" PING\t\r\n", [[b"PING"]]),
    (b"\r\n\n \t\r\nPING\r\n", [[b"PING"]]),
    (b"SET a b\r\n*1\r\n$3\r\nGET\r\nGET a\n", [[b"SET", b"a", b"b"], [b"GET"], [b"GET", b"a"]]),
    (b"$3\r\n", [[b"$3"]]),  # only '*' starts a multibulk command
    (b"A\rB\r\r\n", [[b"A", b"B"]]),  # a CR inside an inline line separates words
    (b"ECHO " + b"a" * (HDR - 5) + b"\n", [[b"ECHO", b"a" * (HDR - 5)]]),
]

ERRORS = [
    # Anything but a bulk string inside a request, with Redis's text.
    (b"*1\r\n+PING\r\n", "expected '$', got '+'"),
    (b"*1\r\n:1\r\n", "expected '$', got ':'"),
    (b"*1\r\n*1\r\n$1\r\na\r\n", "expected '$', got '*'"),
    (b"*1\r\n_\r\n", "expected '$', got '_'"),
    (b"*2\r\n$3\r\nGET\r\n$-1\r\n", "invalid bulk length"),
    # Counts and lengths follow string2ll: plain decimal only.
    (b"*01\r\n", "invalid multibulk length"),
    (b"*+1\r\n", "invalid multibulk length"),
    (b"*-0\r\n", "invalid multibulk length"),
    (b"* 1\r\n", "invalid multibulk length"),
    (b"*1 \r\n", "invalid multibulk length"),
    (b"*\r\n", "invalid multibulk length"),
    (b"*1_0\r\n", "invalid multibulk length"),
    (b"*x\r\n", "invalid multibulk length"),
    (b"*2147483648\r\n", "invalid multibulk length"),  # > INT_MAX
    (b"*9223372036854775808\r\n", "invalid multibulk length"),  # overflows 64 bits
    (b"*1\r\n$04\r\nPING\r\n", "invalid bulk length"),
    (b"*1\r\n$+4\r\nPING\r\n", "invalid bulk length"),
    (b"*1\r\n$\r\n", "invalid bulk length"),
    (b"*1\r\n$ 4\r\nPING\r\n", "invalid bulk length"),
    (b"*1\r\n$-0\r\n", "invalid bulk length"),
    (b"*1\r\n$99999999999999999999\r\n", "invalid bulk length"),
    # Stricter than Redis: a lone CR ends a header line, a payload ends in CRLF.
    (b"*1\rx\r\n$4\r\nPING\r\n", "invalid multibulk length"),
    (b"*1\r\n$4\rx$4\r\nPING\r\n", "invalid bulk length"),
    (b"*1\r\n$4\r\nPINGxx\r\n", "expected '\\r\\n' after bulk payload"),
    (b"*1\r\n$4\r\nPING\rX", "expected '\\r\\n' after bulk payload"),
    (b"*1\r\n$4\r\nPING\n\r", "expected '\\r\\n' after bulk payload"),
    # Inline quoting, as sdssplitargs fails.
    (b'SET "a\r\n', "unbalanced quotes in request"),
    (b"ECHO 'a\r\n", "unbalanced quotes in request"),
    (b'ECHO "a"x\r\n', "unbalanced quotes in request"),
    (b"ECHO 'a'x\n", "unbalanced quotes in request"),
    (b'ECHO "a\\"\n', "unbalanced quotes in request"),
    (b"ECHO 'a\\'\n", "unbalanced quotes in request"),
    (b"ECHO 'a\\\\'\n", "unbalanced quotes in request"),  # in '...' only \' escapes
    (b'ECHO "a""b"\n', "unbalanced quotes in request"),
    # Redis never finds the end of such a line (strchr stops at NUL) and hangs.
    (b"ECHO a\x00b\r\n", "NUL byte in inline request"),
]


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_requests_whole_and_byte_by_byte(data: bytes, expected: list[list[bytes]]) -> None:
    assert outcome([data]) == (expected, None)
    assert outcome(bytewise(data)) == (expected, None)
    framer = RequestFramer()
    feed_all(framer, [data])
    assert framer.buffered == 0


@pytest.mark.parametrize(("data", "message"), ERRORS)
def test_malformed_requests_get_redis_errors(data: bytes, message: str) -> None:
    framer = RequestFramer()
    with pytest.raises(ProtocolError) as info:
        framer.feed(data + b"*1\r\n$4\r\nPING\r\n")
    assert str(info.value) == message
    assert type(info.value) is ProtocolError  # a malformation, not a limit
    assert info.value.commands == []
    # Whatever the chunking, the same error (nothing framed before it).
    assert outcome(bytewise(data)) == ([], f"ProtocolError: {message}")


def test_error_carries_the_commands_framed_before_it() -> None:
    framer = RequestFramer()
    with pytest.raises(ProtocolError) as info:
        framer.feed(b"*1\r\n$4\r\nPING\r\nGET a\r\n*1\r\n+x\r\n")
    assert info.value.commands == [[b"PING"], [b"GET", b"a"]]


def test_framer_is_dead_after_an_error() -> None:
    framer = RequestFramer()
    with pytest.raises(ProtocolError):
        framer.feed(b"*1\r\n:1\r\n")
    with pytest.raises(ProtocolError, match="expected '\\$', got ':'"):
        framer.feed(b"*1\r\n$4\r\nPING\r\n")


def mixed_pipeline() -> list[tuple[bytes, list[bytes] | None]]:
    """Small commands with every kind of exception to the fast path in between."""
    small = [(encode_command([b"GET", b"k%d" % i]), [b"GET", b"k%d" % i]) for i in range(40)]
    odd: list[tuple[bytes, list[bytes] | None]] = [
        (encode_command([b"SET", b"k", b"a\r\nb"]), [b"SET", b"k", b"a\r\nb"]),
        (encode_command([b"SET", b"k", b"v" * 9000]), [b"SET", b"k", b"v" * 9000]),
        (b"GET lf-only\n", [b"GET", b"lf-only"]),
        (b"PING\r\n", [b"PING"]),
        (b"*0\r\n", None),
        (b"*-1\r\n", None),
        (encode_command([b"MSET", b"a", b"1", b"b", b"2"]), [b"MSET", b"a", b"1", b"b", b"2"]),
        (encode_command([b"PING"]), [b"PING"]),
        (encode_command([b"SET", b"k", b""]), [b"SET", b"k", b""]),
    ]
    out = []
    for i, item in enumerate(odd):
        out.extend(small[i * 4 : i * 4 + 4])
        out.append(item)
    out.extend(small[36:])
    return out


def test_every_cut_of_a_mixed_pipeline() -> None:
    # A command is returned exactly when its last byte has arrived, never before, and
    # the two halves together give every command, whatever the cut.
    items = mixed_pipeline()
    data = b"".join(raw for raw, _ in items)
    expected = [argv for _, argv in items if argv is not None]
    ends, pos = [], 0
    for raw, argv in items:
        pos += len(raw)
        if argv is not None:
            ends.append(pos)
    big = data.index(b"v" * 9000)
    cuts = [c for c in range(len(data) + 1) if not big + 10 < c < big + 8990 or c % 97 == 0]
    for cut in cuts:
        framer = RequestFramer()
        first = framer.feed(data[:cut])
        assert first == expected[: sum(1 for e in ends if e <= cut)], cut
        assert first + framer.feed(data[cut:]) == expected, cut
        assert framer.buffered == 0


def test_payload_completed_by_the_next_chunk_must_end_in_crlf() -> None:
    for first, second in [(b"*1\r\n$3\r\n", b"foo\rX"), (b"*1\r\n$3\r\nf", b"oo\rX")]:
        framer = RequestFramer()
        assert framer.feed(first) == []
        with pytest.raises(ProtocolError, match="after bulk payload"):
            framer.feed(second)


# ------------------------------------------------------------------ header limits


@pytest.mark.parametrize(
    ("prefix", "too_big", "invalid"),
    [
        (b"*", "too big mbulk count string", "invalid multibulk length"),
        (b"*1\r\n$", "too big bulk count string", "invalid bulk length"),
    ],
)
def test_header_line_limit_like_redis(prefix: bytes, too_big: str, invalid: str) -> None:
    # The line (from its first byte) may hold 64 KiB without a CR; one more is refused.
    large = prefix + b"0" * (HDR - 1)
    start = len(prefix) - 1  # the line's first byte
    assert len(large) - start == HDR
    for pieces in ([large], [large[:10], large[10:]]):
        assert outcome(pieces) == ([], None)
        assert outcome([*pieces, b"0"]) == ([], f"ProtocolError: {too_big}")
        assert outcome([*pieces, b"\r"]) == ([], None)
        assert outcome([*pieces, b"\r\n"]) == ([], f"ProtocolError: {invalid}")
    # A line longer than that is too big even if its CRLF came in the same chunk.
    assert outcome([large + b"00\r\n"]) == ([], f"ProtocolError: {too_big}")


def test_inline_line_limit() -> None:
    line = b"a" * HDR
    assert outcome([line]) == ([], None)
    assert outcome([line, b"\n"]) == ([[line]], None)
    assert outcome([line + b"a"]) == ([], "ProtocolError: too big inline request")
    assert outcome(bytewise(b"a" * 6), max_inline_bytes=5) == (
        [],
        "ProtocolError: too big inline request",
    )
    assert outcome([b"a" * 6 + b"\n"], max_inline_bytes=5) == (
        [],
        "ProtocolError: too big inline request",
    )


def test_partial_header_is_judged_before_its_crlf() -> None:
    # The element type is known from its line; Redis rejects at the line end.
    framer = RequestFramer()
    assert framer.feed(b"*1\r\n+PING") == []
    with pytest.raises(ProtocolError, match="expected '\\$', got '\\+'"):
        framer.feed(b"\r\n")
    # A lone CR already ends the line as malformed.
    framer = RequestFramer()
    with pytest.raises(ProtocolError, match="invalid bulk length"):
        framer.feed(b"*1\r\n$4\rx")


# ------------------------------------------------------------------ configured limits


def test_bulk_length_over_limit_refused_at_its_header() -> None:
    framer = RequestFramer(max_bulk_bytes=1000)
    assert framer.feed(b"*2\r\n$3\r\nSET\r\n$1000\r\n") == []  # exactly the limit: waits
    framer = RequestFramer(max_bulk_bytes=1000)
    with pytest.raises(LimitExceeded, match="^invalid bulk length$"):
        framer.feed(b"*2\r\n$3\r\nSET\r\n$1001\r\n")  # no payload sent


def test_small_limits_apply_on_the_pipelined_fast_path() -> None:
    pipeline = encode_command([b"GET", b"a"]) * 50 + encode_command([b"GET", b"abcdef"])
    with pytest.raises(LimitExceeded, match="invalid bulk length") as info:
        RequestFramer(max_bulk_bytes=5).feed(pipeline)
    assert len(info.value.commands) == 50
    pipeline = encode_command([b"GET", b"a"]) * 50 + encode_command([b"MGET", b"a", b"b"])
    with pytest.raises(LimitExceeded, match="invalid multibulk length") as info:
        RequestFramer(max_args=2).feed(pipeline)
    assert len(info.value.commands) == 50


def test_argument_count_limits() -> None:
    with pytest.raises(LimitExceeded, match="invalid multibulk length"):
        RequestFramer(max_args=10).feed(b"*11\r\n")
    assert RequestFramer(max_args=10).feed(b"*10\r\n") == []
    # Redis's own ceiling is INT_MAX: a plain protocol error, not a configured limit.
    with pytest.raises(ProtocolError, match="invalid multibulk length") as info:
        RequestFramer().feed(b"*4294967296\r\n")
    assert type(info.value) is ProtocolError
    # A huge declared count allocates nothing up front.
    framer = RequestFramer()
    assert framer.feed(b"*2147483647\r\n$1\r\na\r\n") == []
    assert framer.buffered == len(b"*2147483647\r\n$1\r\na\r\n")
    with pytest.raises(LimitExceeded, match="too many arguments"):
        RequestFramer(max_args=2).feed(b"a b c\r\n")


@pytest.mark.parametrize("chunking", ["whole", "bytewise", "header-only"])
def test_query_buffer_limit_counts_the_whole_command(chunking: str) -> None:
    cmd = encode_command([b"SET", b"key", b"v" * 40])
    limit = len(cmd)
    ok = outcome([cmd], max_query_buffer_bytes=limit)
    assert ok == ([[b"SET", b"key", b"v" * 40]], None)
    big = encode_command([b"SET", b"key", b"v" * 41])  # one byte over
    pieces = {
        "whole": [big],
        "bytewise": bytewise(big),
        "header-only": [big[: big.index(b"$41\r\n") + 5]],  # the payload never comes
    }[chunking]
    assert outcome(pieces, max_query_buffer_bytes=limit) == (
        [],
        "LimitExceeded: query buffer limit exceeded",
    )


def test_query_buffer_limit_with_many_small_arguments() -> None:
    framer = RequestFramer(max_query_buffer_bytes=1000)
    assert framer.feed(b"*1000000\r\n") == []
    held = []
    with pytest.raises(LimitExceeded, match="query buffer limit exceeded"):
        for _ in range(1000):
            framer.feed(b"$1\r\na\r\n")
            held.append(framer.buffered)
    assert 990 < max(held) <= 1000  # refused at the argument that would cross the limit


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_bulk_bytes"):
        RequestFramer(max_bulk_bytes=0)


# ------------------------------------------------------------------ big values


def test_big_value_in_64k_chunks_is_linear() -> None:
    # 64 MiB in 64 KiB chunks: a framer that re-scanned or re-concatenated the partial
    # payload on every feed would do ~32 GiB of copying here and take minutes.
    value = bytes(range(256)) * (64 * MiB // 256)
    data = encode_command([b"SET", b"big", value]) + encode_command([b"GET", b"big"])
    framer = RequestFramer()
    out = []
    step = 64 * 1024
    for i in range(0, len(data), step):
        out.extend(framer.feed(data[i : i + step]))
        if not out:
            assert 0 < framer.buffered <= i + step
    assert len(out) == 2
    assert out[0][2] == value
    assert out[1] == [b"GET", b"big"]
    assert framer.buffered == 0


def test_buffered_tracks_the_partial_command() -> None:
    framer = RequestFramer()
    assert framer.feed(b"*2\r\n$3\r\nGET\r\n$5\r\nab") == []
    assert framer.buffered == len(b"*2\r\n$3\r\nGET\r\n$5\r\nab")
    assert framer.feed(b"cde\r\n") == [[b"GET", b"abcde"]]
    assert framer.buffered == 0


# ------------------------------------------------------------------ inline splitting


SPLIT = [
    (b"", []),
    (b"   ", []),
    (b"a b  c", [b"a", b"b", b"c"]),
    (b'SET "a b" c', [b"SET", b"a b", b"c"]),
    (b"SET 'a b' c", [b"SET", b"a b", b"c"]),
    (b'"\\n\\r\\t\\b\\a\\\\\\"\\q"', [b'\n\r\t\b\x07\\"q']),
    (b'"\\x41\\x7a\\xZZ\\x4"', [b"AzxZZx4"]),  # \x needs two hex digits
    (b"'it\\'s' '\\n'", [b"it's", b"\\n"]),
    (b'a"b c"', [b"ab c"]),  # a quote may open mid-word
    (b'"a"\tb', [b"a", b"b"]),
    (b'""', [b""]),
    (b"''", [b""]),
    (b"\x0b\x0ca\x0bb c", [b"a\x0bb", b"c"]),  # \v \f skipped between words only
    (b'"a"\x0bb', [b"a", b"b"]),  # ... and end a quoted word like other isspace()
    (b"a\rb", [b"a", b"b"]),
]


@pytest.mark.parametrize(("line", "argv"), SPLIT)
def test_split_inline_mirrors_sdssplitargs(line: bytes, argv: list[bytes]) -> None:
    assert split_inline(line) == argv


# ------------------------------------------------------------------ properties

# Arguments rich in the bytes that matter to framing.
arg = st.one_of(
    st.binary(max_size=20),
    st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"$", b"*", b"0", b"a"]), max_size=8).map(
        b"".join
    ),
    st.integers(8180, 8200).map(lambda n: b"x" * n),  # around the header cache edge
)
argvs = st.lists(st.lists(arg, min_size=1, max_size=6), max_size=12)


@settings(max_examples=150, deadline=None)
@given(commands=argvs, cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_any_split_gives_the_encoded_commands(commands: list[list[bytes]], cuts: list[int]) -> None:
    data = b"".join(encode_command(argv) for argv in commands)
    assert outcome([data]) == (commands, None)
    assert outcome(split_at(data, cuts)) == (commands, None)


@settings(max_examples=150, deadline=None)
@given(commands=argvs)
def test_hiredis_reads_the_same_commands(commands: list[list[bytes]]) -> None:
    data = b"".join(encode_command(argv) for argv in commands)
    reader = hiredis.Reader()
    reader.feed(data)
    theirs = []
    while (item := reader.gets()) is not False:
        theirs.append(item)
    assert RequestFramer().feed(data) == theirs


# Streams of protocol fragments, valid or not: every chunking must agree exactly.
fragment = st.sampled_from(
    [
        b"*",
        b"$",
        b"*1\r\n",
        b"*2\r\n",
        b"*0\r\n",
        b"*-1\r\n",
        b"$1\r\n",
        b"$3\r\n",
        b"$0\r\n",
        b"a",
        b"GET",
        b"\r\n",
        b"\r",
        b"\n",
        b" ",
        b'"',
        b"'",
        b"\\",
        b"+",
        b":1",
        b"0",
        b"-",
        b"\x00",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=st.lists(fragment, max_size=30).map(b"".join), cuts=st.lists(st.integers(0)))
def test_any_split_of_any_stream_agrees(stream: bytes, cuts: list[int]) -> None:
    whole = outcome([stream])
    assert outcome(split_at(stream, cuts)) == whole
    assert outcome(bytewise(stream)) == whole


def test_encode_command() -> None:
    assert encode_command([]) == b"*0\r\n"
    assert encode_command([b""]) == b"*1\r\n$0\r\n\r\n"
    assert encode_command([b"GET", b"k"]) == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    big = b"z" * 5000
    assert encode_command([big]) == b"*1\r\n$5000\r\n" + big + b"\r\n"


# ------------------------------------------------------------------ against real Redis

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"


@pytest.fixture(scope="module")
def redis_port():
    if not os.path.exists(REDIS):
        pytest.skip("redis-server not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [REDIS, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
             "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                    break
                except OSError:
                    time.sleep(0.01)
            yield port
        finally:
            proc.terminate()
            proc.wait(5)


def redis_inline_args(port: int, line: bytes) -> list[bytes] | str:
    """Redis's own split of an inline line: RPUSH its words, read them back."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        reader = hiredis.Reader()
        sock.sendall(b"DEL k\r\nRPUSH k " + line + b"\r\nLRANGE k 0 -1\r\n")
        replies: list[object] = []
        while len(replies) < 3:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reader.feed(chunk)
            while (item := reader.gets()) is not False:
                replies.append(item)
    if isinstance(replies[1], hiredis.ReplyError):
        err = str(replies[1]).removeprefix("ERR ")
        return "wrong number" if "wrong number" in err else err
    assert isinstance(replies[2], list)
    return replies[2]


def ours_inline_args(line: bytes) -> list[bytes] | str:
    try:
        argv = split_inline(b"RPUSH k " + line)
    except ProtocolError as exc:
        return f"Protocol error: {exc}"
    return argv[2:] if len(argv) > 2 else "wrong number"


@pytest.mark.parametrize("line", [line for line, _ in SPLIT if line] + [b"'a", b'"a" b"'])
def test_inline_split_matches_redis(redis_port: int, line: bytes) -> None:
    assert ours_inline_args(line) == redis_inline_args(redis_port, line)


inline_text = st.lists(
    st.sampled_from([b" ", b"\t", b"\x0b", b'"', b"'", b"\\", b"x", b"4", b"a", b"n", b"\r"]),
    max_size=12,
).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(line=inline_text)
def test_inline_split_matches_redis_generated(redis_port: int, line: bytes) -> None:
    assert ours_inline_args(line) == redis_inline_args(redis_port, line)


# --- verbatim: the session forwards a read as it is only when this flag says it is exactly
# the canonical encoding of the commands framed from it. A wrong True would let bytes other
# than the checked argv reach Redis.


def _verbatim_claims_hold(framer: RequestFramer, chunk: bytes, got: list[list[bytes]]) -> None:
    if framer.verbatim:
        assert got and b"".join(encode_command(argv) for argv in got) == chunk


@settings(max_examples=300, deadline=None)
@given(commands=argvs, cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_verbatim_only_when_the_bytes_are_the_canonical_commands(
        commands: list[list[bytes]], cuts: list[int]) -> None:
    data = b"".join(encode_command(argv) for argv in commands)
    whole = RequestFramer()
    got = whole.feed(data)
    assert whole.verbatim == bool(commands)  # one clean read of canonical commands
    _verbatim_claims_hold(whole, data, got)
    framer = RequestFramer()
    for chunk in split_at(data, cuts):
        _verbatim_claims_hold(framer, chunk, framer.feed(chunk))


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(fragment, max_size=20), cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_verbatim_never_claimed_for_other_bytes(parts: list[bytes], cuts: list[int]) -> None:
    framer = RequestFramer()
    for chunk in split_at(b"".join(parts), cuts):
        try:
            got = framer.feed(chunk)
        except ProtocolError:
            return
        _verbatim_claims_hold(framer, chunk, got)


@pytest.mark.parametrize(("chunks", "expected"), [
    ([b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"], [True]),
    ([b"PING\r\n"], [False]),  # inline: re-encoded
    ([b"*1\r\n$4\r\nPING\r\nPING\r\n"], [False]),
    ([b"*0\r\n*1\r\n$4\r\nPING\r\n"], [False]),  # an empty command is skipped, not sent
    ([b"*-1\r\n*1\r\n$4\r\nPING\r\n"], [False]),
    ([b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPI"], [False]),  # a partial command is held back
    ([b"*1\r\n$4\r\nPI", b"NG\r\n"], [False, False]),  # completes one held from before
    ([b"*1\r\n$4\r\nPI", b"NG\r\n", b"*1\r\n$4\r\nPING\r\n"], [False, False, True]),
])
def test_verbatim_cases(chunks: list[bytes], expected: list[bool]) -> None:
    framer = RequestFramer()
    seen = []
    for chunk in chunks:
        framer.feed(chunk)
        seen.append(framer.verbatim)
    assert seen == expected
