"""Session + shared backend connections, driven with plain bytes over fake transports:
interleaved clients on one connection, replies split anywhere, per-client db/protocol,
pinning and release, a connection lost mid-pipeline, a client that does not read."""

from __future__ import annotations

import asyncio
import random

import pytest

from proxy import session as session_module
from proxy.config import LimitsConfig
from proxy.resp import canned
from tests.unit.session_harness import (
    Audit,
    FakeRouter,
    Hooks,
    cmd,
    make_session,
    sent,
    wire,
)

GET_A, GET_B = cmd("GET", "a"), cmd("GET", "b")


@pytest.fixture(autouse=True)
def quick_unpin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "UNPIN_GRACE_S", 0.01)


async def test_clients_share_one_connection_and_each_gets_its_own_replies() -> None:
    router = FakeRouter()
    shared = router.conns[0]
    a, b = make_session(router), make_session(router)
    a.data_received(GET_A + GET_A)
    b.data_received(GET_B)
    assert wire(shared) == GET_A + GET_A + GET_B  # both clients, one connection
    shared.data_received(b"$2\r\na1\r\n$2\r\na2\r\n$2\r\nb1\r\n")  # one chunk for both
    assert sent(a) == b"$2\r\na1\r\n$2\r\na2\r\n"
    assert sent(b) == b"$2\r\nb1\r\n"
    assert a.counts["get"] == [2, 0, 0] and b.counts["get"] == [1, 0, 0]
    assert len(router.conns) == 1  # no connection per client


@pytest.mark.parametrize("seed", range(20))
async def test_replies_split_anywhere_reach_the_right_client_in_order(seed: int) -> None:
    rng = random.Random(seed)
    router = FakeRouter()
    shared = router.conns[0]
    clients = [make_session(router) for _ in range(5)]
    expected = {id(c): b"" for c in clients}
    stream = b""
    for _ in range(40):
        client = rng.choice(clients)
        value = rng.randbytes(rng.choice([0, 1, 5, 300]))
        kind = rng.random()
        if kind < 0.1:
            reply = b"-ERR nope\r\n"
        elif kind < 0.2:
            reply = b"*2\r\n$1\r\nx\r\n:7\r\n"
        else:
            reply = b"$%d\r\n%s\r\n" % (len(value), value)
        client.data_received(cmd("GET", "k"))
        expected[id(client)] += reply
        stream += reply
    wire(shared)
    cuts = sorted(rng.sample(range(1, len(stream)), min(30, len(stream) - 1)))
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        shared.data_received(stream[start:end])
    for client in clients:
        assert sent(client) == expected[id(client)]
    assert not shared.fifo


async def test_a_refusal_between_forwarded_commands_keeps_request_order() -> None:
    router = FakeRouter()
    shared = router.conns[0]
    client = make_session(router, "+get ~*")
    client.data_received(GET_A + cmd("SET", "a", "1") + GET_B)
    assert wire(shared) == GET_A + GET_B
    assert sent(client) == b""  # the refusal waits for the first GET's reply
    shared.data_received(b"$1\r\n1\r\n")
    assert sent(client).startswith(b"$1\r\n1\r\n-NOPERM")
    shared.data_received(b"$1\r\n2\r\n")
    assert sent(client) == b"$1\r\n2\r\n"


async def test_select_is_answered_here_and_puts_the_connection_in_the_clients_db() -> None:
    router = FakeRouter()
    shared = router.conns[0]
    a, b = make_session(router), make_session(router)
    a.data_received(cmd("SELECT", "3") + GET_A)
    assert sent(a) == b"+OK\r\n"  # nothing owed before it: answered at once
    b.data_received(GET_B)
    assert wire(shared) == cmd("SELECT", "3") + GET_A + cmd("SELECT", "0") + GET_B
    shared.data_received(b"+OK\r\n$1\r\na\r\n+OK\r\n$1\r\nb\r\n")  # prefixes swallowed
    assert sent(a) == b"$1\r\na\r\n" and sent(b) == b"$1\r\nb\r\n"


@pytest.mark.parametrize(("arg", "error"), [
    (b"16", b"-ERR DB index is out of range\r\n"),
    (b"-1", b"-ERR DB index is out of range\r\n"),
    (b"01", b"-ERR value is not an integer or out of range\r\n"),
    (b" 1", b"-ERR value is not an integer or out of range\r\n"),
    (b"x", b"-ERR value is not an integer or out of range\r\n"),
])
async def test_select_errors_are_redis_s(arg: bytes, error: bytes) -> None:
    router = FakeRouter()
    client = make_session(router)
    client.data_received(cmd("SELECT", arg) + GET_A)
    assert sent(client) == error
    assert wire(router.conns[0]) == GET_A  # still db 0


async def test_hello_is_answered_here_with_the_clients_id_and_protocol() -> None:
    router = FakeRouter()
    shared = router.conns[0]
    client = make_session(router)
    client.data_received(cmd("HELLO", "3", "SETNAME", "worker") + GET_A)
    reply = sent(client)
    assert reply.startswith(b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n")
    assert b"$5\r\nproto\r\n:3\r\n" in reply
    assert b"$2\r\nid\r\n:%d\r\n" % client.conn_id in reply
    assert wire(shared) == cmd("HELLO", "3") + GET_A  # the connection follows the client
    client.data_received(cmd("CLIENT", "GETNAME"))
    shared.data_received(b"%1\r\n+a\r\n:1\r\n$1\r\nv\r\n")
    assert sent(client) == b"$1\r\nv\r\n$6\r\nworker\r\n"
    client.data_received(cmd("HELLO", "4"))
    assert sent(client) == b"-NOPROTO unsupported protocol version\r\n"


async def test_multi_moves_to_a_dedicated_connection_only_after_in_flight_replies() -> None:
    router = FakeRouter()
    shared = router.conns[0]
    client = make_session(router)
    client.data_received(cmd("SET", "x", "1"))
    client.data_received(cmd("MULTI") + cmd("GET", "x") + cmd("EXEC"))
    assert wire(shared) == cmd("SET", "x", "1")
    assert len(router.conns) == 1  # held: SET must run first
    shared.data_received(b"+OK\r\n")
    router.flush()
    dedicated = router.conns[1]
    assert wire(dedicated) == cmd("MULTI") + cmd("GET", "x") + cmd("EXEC")
    dedicated.data_received(b"+OK\r\n+QUEUED\r\n*1\r\n$1\r\n1\r\n")
    assert sent(client) == b"+OK\r\n+OK\r\n+QUEUED\r\n*1\r\n$1\r\n1\r\n"
    await asyncio.sleep(0.05)  # the grace period passes with no state left
    assert router.given_back == [(dedicated, True)]
    client.data_received(GET_A)
    router.flush()
    assert wire(shared) == GET_A and wire(dedicated) == b""  # back on the shared one


async def test_a_pinned_client_does_not_hold_back_others() -> None:
    router = FakeRouter()
    shared = router.conns[0]
    blocked, other = make_session(router), make_session(router)
    blocked.data_received(cmd("BLPOP", "q", "0"))
    router.flush()
    assert wire(router.conns[1]) == cmd("BLPOP", "q", "0")
    other.data_received(GET_A)
    assert wire(shared) == GET_A
    shared.data_received(b"$1\r\nv\r\n")
    assert sent(other) == b"$1\r\nv\r\n"
    assert router.given_back == []  # still blocked: kept
    router.conns[1].data_received(b"*2\r\n$1\r\nq\r\n$1\r\nz\r\n")
    await asyncio.sleep(0.05)
    assert router.given_back == [(router.conns[1], True)]


async def test_subscribe_pins_until_the_last_unsubscribe() -> None:
    router = FakeRouter()
    client = make_session(router)
    client.data_received(cmd("SUBSCRIBE", "c"))
    router.flush()
    dedicated = router.conns[1]
    dedicated.data_received(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n"
                            b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n")
    assert sent(client).endswith(b"$2\r\nhi\r\n")
    await asyncio.sleep(0.05)
    assert router.given_back == []  # subscribed: kept
    client.data_received(cmd("UNSUBSCRIBE"))
    router.flush()
    assert wire(dedicated).endswith(cmd("UNSUBSCRIBE"))
    dedicated.data_received(b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nc\r\n:0\r\n")
    await asyncio.sleep(0.05)
    assert router.given_back == [(dedicated, True)]


async def test_unsubscribe_with_no_subscriptions_is_answered_here() -> None:
    router = FakeRouter()
    client = make_session(router)
    client.data_received(cmd("UNSUBSCRIBE", "a", "b"))
    assert sent(client) == (b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:0\r\n"
                            b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:0\r\n")
    assert len(router.conns) == 1 and wire(router.conns[0]) == b""


async def test_a_lost_connection_answers_exactly_what_it_owed_and_the_rest_goes_on() -> None:
    router = FakeRouter()
    shared = router.conns[0]
    a, b = make_session(router), make_session(router)
    a.data_received(GET_A + GET_A)
    b.data_received(GET_B)
    router.flush()
    shared.data_received(b"$1\r\n1\r\n")  # a's first reply came, then the connection went
    shared.connection_lost(ConnectionResetError("gone"))
    assert sent(a) == b"$1\r\n1\r\n" + canned.BACKEND_UNAVAILABLE
    assert sent(b) == canned.BACKEND_UNAVAILABLE
    a.data_received(GET_A)  # not sent before: goes on a new connection
    await asyncio.sleep(0)
    router.flush()
    assert len(router.conns) == 2 and wire(router.conns[1]) == GET_A
    router.conns[1].data_received(b"$1\r\n3\r\n")
    assert sent(a) == b"$1\r\n3\r\n"
    assert not a.transport.closed and not b.transport.closed


async def test_a_lost_connection_with_a_prefix_in_flight_still_answers_the_client() -> None:
    router = FakeRouter()
    shared = router.conns[0]
    client = make_session(router)
    client.data_received(cmd("SELECT", "2") + GET_A)
    sent(client)
    shared.connection_lost(None)
    assert sent(client) == canned.BACKEND_UNAVAILABLE


async def test_a_lost_dedicated_connection_with_a_transaction_closes_the_client() -> None:
    router = FakeRouter()
    hooks = Hooks()
    client = make_session(router, hooks=hooks)
    client.data_received(cmd("MULTI") + cmd("INCR", "n"))
    router.flush()
    router.conns[1].connection_lost(None)
    assert sent(client) == canned.BACKEND_UNAVAILABLE * 2
    assert client.transport.closed and hooks.lost == 1


async def test_client_reply_off_is_kept_here_and_redis_replies_are_dropped() -> None:
    router = FakeRouter()
    shared = router.conns[0]
    client = make_session(router)
    client.data_received(cmd("CLIENT", "REPLY", "OFF") + cmd("SET", "a", "1")
                         + cmd("CLIENT", "REPLY", "ON") + GET_A)
    assert wire(shared) == cmd("SET", "a", "1") + GET_A  # CLIENT REPLY never forwarded
    shared.data_received(b"+OK\r\n$1\r\n1\r\n")
    assert sent(client) == b"+OK\r\n$1\r\n1\r\n"  # ON's +OK, then GET's reply


async def test_a_client_that_does_not_read_is_closed_and_others_go_on() -> None:
    router = FakeRouter()
    shared = router.conns[0]
    limits = LimitsConfig(max_reply_buffer_bytes=1000)
    slow, busy = make_session(router, limits=limits), make_session(router, limits=limits)
    slow.data_received(GET_A)
    busy.data_received(GET_B)
    slow.pause_writing()  # its socket is full
    assert not slow.transport.reading  # no more requests from it
    slow.transport.buffered = 5000
    shared.data_received(b"$3000\r\n" + b"x" * 3000 + b"\r\n$1\r\nb\r\n")
    assert slow.transport.closed and "does not read" in (slow.close_reason or "")
    assert sent(busy) == b"$1\r\nb\r\n" and not busy.transport.closed


async def test_a_failed_audit_write_takes_back_only_the_audited_command() -> None:
    router = FakeRouter()
    audit = Audit()
    audit.fail = True
    client = make_session(router, audit=audit)
    client.data_received(GET_A + cmd("GET", "app:phi:1") + GET_B)
    assert wire(router.conns[0]) == GET_A + GET_B
    router.conns[0].data_received(b"$1\r\na\r\n$1\r\nb\r\n")
    assert sent(client) == b"$1\r\na\r\n" + canned.AUDIT_UNAVAILABLE + b"$1\r\nb\r\n"


async def test_wait_runs_on_a_dedicated_connection_after_a_propagated_marker() -> None:
    router = FakeRouter()
    client = make_session(router)
    client.data_received(cmd("SET", "k", "v") + cmd("WAIT", "1", "100"))
    router.conns[0].data_received(b"+OK\r\n")
    router.flush()
    written = wire(router.conns[1])
    assert written == session_module._WAIT_MARKER + cmd("WAIT", "1", "100")
    router.conns[1].data_received(b":0\r\n:1\r\n")  # the marker's reply is not shown
    assert sent(client) == b"+OK\r\n:1\r\n"


async def test_reset_on_a_dedicated_connection_logs_it_in_again() -> None:
    router = FakeRouter(auth=cmd("AUTH", "proxy", "pw"))
    client = make_session(router)
    client.data_received(cmd("MULTI"))
    router.flush()
    dedicated = router.conns[1]
    wire(dedicated)
    client.data_received(cmd("RESET") + GET_A)
    router.flush()
    # RESET and the proxy's AUTH in one write; the connection is in db 0, RESP2 after it
    assert wire(dedicated) == cmd("RESET") + cmd("AUTH", "proxy", "pw") + GET_A
    dedicated.data_received(b"+OK\r\n+RESET\r\n+OK\r\n$1\r\nv\r\n")
    assert sent(client) == b"+OK\r\n+RESET\r\n$1\r\nv\r\n"


async def test_reads_wait_for_the_iteration_end_and_a_later_protocol_error_waits_too() -> None:
    """Reads are decided after the loop iteration's I/O (one write-ahead for all); a
    protocol error in a later read of the same iteration is answered after the replies
    owed to the earlier one."""
    router = FakeRouter()
    audit = Audit()
    client = make_session(router, audit=audit, deferred=True)
    get = cmd("GET", "app:phi:a")
    client.data_received(get)
    client.data_received(b"*1\r\n*1\r\n")  # malformed (nested array), same iteration
    assert audit.records == [] and router.dirty == []
    await asyncio.sleep(0)
    assert wire(router.conns[0]) == get  # forwarded as read, after its record
    assert len(audit.records) == 1 and b'"keys":["app:phi:a"]' in audit.records[0]
    assert sent(client) == b"" and not client.transport.closed
    router.conns[0].data_received(b"$1\r\nx\r\n")
    assert sent(client) == b"$1\r\nx\r\n-ERR Protocol error: expected '$', got '*'\r\n"
    assert client.transport.closed


def test_client_setinfo_is_answered_here_even_with_a_redis_70_table() -> None:
    """Client libraries send CLIENT SETINFO on every connection (Redis 7.2); the proxy
    answers it, decided as CLIENT SETNAME (same categories), never as an unknown command."""
    router = FakeRouter()
    writer = make_session(router)
    writer.data_received(cmd("CLIENT", "SETINFO", "LIB-NAME", "redis-py"))
    router.flush()
    assert sent(writer) == b"+OK\r\n" and wire(router.shared.conn) == b""
    reader = make_session(router, "+@read ~*")
    reader.data_received(cmd("CLIENT", "SETINFO", "LIB-VER", "1.0"))
    assert sent(reader) == (b"-NOPERM this user has no permissions to run the "
                            b"'client|setinfo' command\r\n")
