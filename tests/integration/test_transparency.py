"""Unchanged clients work through the proxy (SPEC §5): redis-py and redis-cli, real Redis."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import pytest
import redis

from tests.helpers import Proxy, RedisServer, require


def test_pipeline_of_1000_commands_in_order(proxy: Proxy, backend: RedisServer) -> None:
    client = proxy.client()
    pipe = client.pipeline(transaction=False)
    for i in range(500):
        pipe.set(f"app:phi:k{i}", f"v{i}")
        pipe.get(f"app:phi:k{i}")
    results = pipe.execute()
    assert len(results) == 1000
    assert results[0::2] == [True] * 500
    assert results[1::2] == [f"v{i}".encode() for i in range(500)]
    assert backend.client().get("app:phi:k499") == b"v499"


def test_multi_exec(proxy: Proxy) -> None:
    client = proxy.client()
    pipe = client.pipeline(transaction=True)
    pipe.set("app:phi:a", "1").incr("app:phi:a").get("app:phi:a")
    assert pipe.execute() == [True, 2, b"2"]


def test_watch_conflict_aborts_transaction(proxy: Proxy) -> None:
    client, other = proxy.client(), proxy.client()
    client.set("app:phi:w", "0")
    with client.pipeline(transaction=True) as pipe:
        pipe.watch("app:phi:w")
        other.set("app:phi:w", "changed")  # another connection writes the watched key
        pipe.multi()
        pipe.set("app:phi:w", "mine")
        with pytest.raises(redis.WatchError):
            pipe.execute()
    assert client.get("app:phi:w") == b"changed"


@pytest.mark.parametrize("protocol", [2, 3])
def test_pubsub(proxy: Proxy, protocol: int) -> None:
    subscriber = proxy.client(protocol=protocol)
    pubsub = subscriber.pubsub()
    pubsub.subscribe("app:events:a", "app:events:b")
    pubsub.psubscribe("app:events:*")
    confirmations = [pubsub.get_message(timeout=5) for _ in range(3)]
    assert [m["type"] for m in confirmations] == ["subscribe", "subscribe", "psubscribe"]
    publisher = proxy.client()
    assert publisher.publish("app:events:a", "hello") == 2  # channel + pattern
    got = [pubsub.get_message(timeout=5) for _ in range(2)]
    assert sorted(m["type"] for m in got) == ["message", "pmessage"]
    assert all(m["data"] == b"hello" for m in got)
    # Still usable for PING while subscribed, then unsubscribe everything.
    pubsub.ping()
    pong = pubsub.get_message(timeout=5)
    assert pong is not None
    pubsub.unsubscribe()
    pubsub.punsubscribe()
    kinds = set()
    for _ in range(3):
        msg = pubsub.get_message(timeout=5)
        kinds.add(msg["type"])
    assert kinds == {"unsubscribe", "punsubscribe"}
    pubsub.close()


def test_pubsub_messages_interleave_with_replies_in_resp3(proxy: Proxy) -> None:
    """RESP3 allows commands while subscribed; pushes must not be taken for replies."""
    client = proxy.client(protocol=3)
    pubsub = client.pubsub()
    pubsub.subscribe("app:events:x")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    conn = pubsub.connection
    publisher = proxy.client()
    for i in range(20):
        publisher.publish("app:events:x", f"m{i}")
    conn.send_command("GET", "app:phi:none")
    time.sleep(0.2)
    messages = [pubsub.get_message(timeout=5) for _ in range(20)]
    assert [m["data"] for m in messages] == [f"m{i}".encode() for i in range(20)]
    pubsub.close()


def test_blpop_with_and_without_data(proxy: Proxy) -> None:
    client = proxy.client()
    assert client.blpop(["app:phi:q"], timeout=0.5) is None
    pusher = proxy.client()

    def push_later() -> None:
        time.sleep(0.3)
        pusher.rpush("app:phi:q", "job")

    threading.Thread(target=push_later).start()
    assert client.blpop(["app:phi:q"], timeout=5) == (b"app:phi:q", b"job")


def test_resp3_hello(proxy: Proxy) -> None:
    client = proxy.client(protocol=3)
    client.set("app:phi:h", "v")
    assert client.get("app:phi:h") == b"v"
    info = client.execute_command("HELLO", 3)
    assert info[b"proto"] == 3 if b"proto" in info else info["proto"] == 3
    assert client.hgetall("app:phi:none") == {}


def test_big_value_8_mib(proxy: Proxy) -> None:
    client = proxy.client()
    value = os.urandom(8 * 1024 * 1024)
    client.set("app:phi:big", value)
    assert client.get("app:phi:big") == value


def test_select_and_client_setname(proxy: Proxy, backend: RedisServer) -> None:
    client = proxy.client(db=3)
    client.set("app:phi:in3", "x")
    client.client_setname("billing")
    assert client.client_getname() == "billing"
    assert backend.client(db=3).get("app:phi:in3") == b"x"
    assert backend.client(db=0).get("app:phi:in3") is None


def test_client_auth_is_answered_locally_and_never_forwarded(proxy: Proxy,
                                                             backend: RedisServer) -> None:
    # A legacy app with its own password: +OK, and the backend identity stays the proxy's.
    client = proxy.client(username="legacy", password="legacy-password")
    assert client.ping()
    assert client.execute_command("AUTH", "someone", "wrong") in (b"OK", True, "OK")
    assert client.acl_whoami() in (b"phiproxy", "phiproxy")
    hello = client.execute_command("HELLO", 2, "AUTH", "someone", "wrong")
    assert hello is not None
    assert client.acl_whoami() in (b"phiproxy", "phiproxy")


def test_reset_keeps_backend_identity(proxy: Proxy) -> None:
    client = proxy.client(single_connection_client=True)
    client.select(2)
    assert client.execute_command("RESET") in (b"RESET", "RESET")
    # RESET logs a connection out; the proxy re-authenticated it in the same write.
    assert client.acl_whoami() in (b"phiproxy", "phiproxy")
    assert client.set("app:phi:after-reset", "1")


def test_redis_cli_inline_and_pipe(proxy: Proxy, backend: RedisServer) -> None:
    require("redis-cli")
    cert, key = proxy.pki.clients["app-writer"]
    base = ["redis-cli", "--tls", "-h", "127.0.0.1", "-p", str(proxy.port),
            "--cacert", str(proxy.pki.path("clients-ca.pem")), "--cert", str(cert),
            "--key", str(key)]
    inline = subprocess.run(base, input=b'SET app:phi:cli "hello world"\nGET app:phi:cli\n',
                            capture_output=True, timeout=20)
    assert inline.returncode == 0, inline.stderr
    assert inline.stdout.split(b"\n")[:2] == [b"OK", b"hello world"]
    mass = b"".join(b"SET app:phi:pipe:%d %d\r\n" % (i, i) for i in range(2000))
    piped = subprocess.run(base + ["--pipe"], input=mass, capture_output=True, timeout=30)
    assert piped.returncode == 0, piped.stderr
    assert b"errors: 0, replies: 2000" in piped.stdout
    assert backend.client().get("app:phi:pipe:1999") == b"1999"


def test_inline_commands_with_quotes(proxy: Proxy, backend: RedisServer) -> None:
    ctx = proxy.ssl_context("app-writer")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b'SET app:phi:inline "a b\\x41"\r\n\r\nget app:phi:inline\r\n')
        data = b""
        while data.count(b"\r\n") < 3 and (chunk := tls.recv(1024)):
            data += chunk
    assert data == b"+OK\r\n$4\r\na bA\r\n"
    assert backend.client().get("app:phi:inline") == b"a bA"


def test_malformed_request_closes_only_that_connection(proxy: Proxy,
                                                       backend: RedisServer) -> None:
    survivor = proxy.client()
    survivor.set("app:phi:s", "1")
    ctx = proxy.ssl_context("app-writer")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        # A valid SET, then a nested array: nothing of this read may reach the backend.
        tls.sendall(b"*3\r\n$3\r\nSET\r\n$10\r\napp:phi:mx\r\n$1\r\n1\r\n*1\r\n*1\r\n$4\r\nPING\r\n")
        data = b""
        while chunk := tls.recv(1024):
            data += chunk
    assert data.startswith(b"-ERR Protocol error: ")
    assert data.endswith(b"\r\n") and data.count(b"\r\n") == 1
    assert backend.client().get("app:phi:mx") is None
    assert survivor.get("app:phi:s") == b"1"


def test_backend_killed_mid_stream(proxy: Proxy, backend: RedisServer, tmp_path) -> None:
    from tests.helpers import start_redis

    client = proxy.client()
    client.set("app:phi:x", "1")
    errors: list[Exception] = []

    def blocked() -> None:
        try:
            client.blpop(["app:phi:never"], timeout=0)
        except Exception as exc:  # noqa: BLE001 - whatever redis-py raises is recorded
            errors.append(exc)

    thread = threading.Thread(target=blocked)
    thread.start()
    time.sleep(0.3)
    backend.proc.kill()
    backend.proc.wait()
    thread.join(10)
    assert errors and "backend unavailable" in str(errors[0])
    # The proxy stays up: a new client gets a clear error while the backend is down ...
    other = proxy.client()
    with pytest.raises(redis.ResponseError, match="backend unavailable"):
        other.get("app:phi:x")
    # ... and works again once it is back.
    restarted = start_redis(backend.pki, tmp_path / "redis2", port=backend.port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert proxy.client().set("app:phi:back", "1")
                break
            except (redis.ResponseError, redis.ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        restarted.stop()


def test_sigterm_drains_and_exits_zero(proxy: Proxy) -> None:
    client = proxy.client()
    result: list[object] = []

    def blocked() -> None:
        try:
            result.append(client.blpop(["app:phi:never"], timeout=1))
        except Exception as exc:  # noqa: BLE001
            result.append(exc)

    thread = threading.Thread(target=blocked)
    thread.start()
    time.sleep(0.3)
    assert proxy.stop(timeout=15) == 0
    thread.join(5)
    assert result == [None]  # the in-flight BLPOP was answered (timed out) before exit


def test_commands_arriving_with_the_close_still_run_and_are_answered(
        proxy: Proxy, backend: RedisServer) -> None:
    """Commands, close_notify and FIN in one TCP segment: the proxy gets the commands and
    the end of input in one loop iteration, before it has decided them. It must still run
    them, as Redis runs what it read before EOF. (Over TLS the connection ends with the
    client's close_notify, so the replies may not reach it: uvloop closes an SSL transport
    after eof_received, whatever it returns.)"""
    import ssl

    ctx = proxy.ssl_context("app-writer")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    raw.sendall(outgoing.read())
                incoming.write(raw.recv(65536))
        tls.write(b"*3\r\n$3\r\nSET\r\n$10\r\napp:phi:c1\r\n$1\r\n1\r\n"
                  b"*2\r\n$4\r\nINCR\r\n$10\r\napp:phi:c1\r\n")
        try:
            tls.unwrap()  # queue our close_notify behind the commands
        except ssl.SSLWantReadError:
            pass
        raw.sendall(outgoing.read())  # handshake end, commands, close_notify: one write
        raw.shutdown(socket.SHUT_WR)
        answer, ended = b"", False
        while not ended and (data := raw.recv(65536)):
            incoming.write(data)
            try:
                while chunk := tls.read(65536):
                    answer += chunk
                ended = True  # b"": the proxy's close_notify
            except ssl.SSLWantReadError:
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                ended = True
    assert backend.client().get("app:phi:c1") == b"2"
    assert answer in (b"", b"+OK\r\n:2\r\n")  # in order if it comes at all
