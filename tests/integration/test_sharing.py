"""Shared, pipelined backend connections against a real redis-server (SPEC §5, version 2):
many clients on a few connections, each with its replies in its order; pinning and
release; per-client db, name and id; a backend killed mid-pipeline; a client that does
not read beside a busy one."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

import redis

from tests.helpers import (
    DEFAULT_ROLES,
    PKI,
    Proxy,
    RedisServer,
    free_port,
    run_concurrently,
    start_proxy,
    start_redis,
    wait_port,
    write_proxy_config,
)

SHARED, POOL = 2, 2


def proxy_clients(backend: RedisServer) -> list[dict[str, str]]:
    """The backend's connections opened by the proxy, from CLIENT LIST (the test's own
    connection uses the same user: it is the one running CLIENT LIST)."""
    admin = backend.client()
    return [c for c in admin.client_list()
            if c.get("user") == "phiproxy" and c.get("cmd") != "client|list"]


def start(pki: PKI, backend: RedisServer, workdir: Path, limits: str = "") -> Proxy:
    port = free_port()
    config = write_proxy_config(
        pki, workdir, backend.port, port,
        extra=f"shared_connections = {SHARED}\npool_size = {POOL}",
        roles=(f"[limits]\n{limits}\n" if limits else "") + DEFAULT_ROLES)
    return start_proxy(config, pki, port)


def test_pipelines_of_50_clients_share_two_connections_each_in_order(
        pki: PKI, backend: RedisServer, tmp_path: Path) -> None:
    proxy = start(pki, backend, tmp_path)
    try:
        def work(n: int) -> None:
            client = proxy.client()
            for round_ in range(5):
                pipe = client.pipeline(transaction=False)
                for i in range(100):
                    pipe.set(f"app:phi:{n}:{i}", f"{n}-{round_}-{i}")
                    pipe.get(f"app:phi:{n}:{i}")
                    pipe.incr(f"app:phi:{n}:counter")
                results = pipe.execute()
                assert results[1::3] == [f"{n}-{round_}-{i}".encode() for i in range(100)]
                assert results[2::3] == list(range(round_ * 100 + 1, round_ * 100 + 101))
            client.close()

        run_concurrently(50, work, timeout=120)
        kinds = proxy_clients(backend)
        # 50 clients ran on the shared connections: no more than those and the pool
        assert len(kinds) <= SHARED + POOL, kinds
        assert backend.client().get("app:phi:49:counter") == b"500"
    finally:
        assert proxy.stop() == 0


def test_200_stateless_clients_use_only_the_shared_connections_and_the_pool(
        pki: PKI, backend: RedisServer, tmp_path: Path) -> None:
    proxy = start(pki, backend, tmp_path)
    clients = []
    try:
        for n in range(200):
            client = proxy.client()
            client.set(f"app:phi:c{n}", n)
            clients.append(client)
        for n, client in enumerate(clients):
            assert client.get(f"app:phi:c{n}") == str(n).encode()
        proxied = proxy_clients(backend)
        assert len(proxied) <= SHARED + POOL, len(proxied)
        # the commands ran on the shared connections (cmd= is the last command run there)
        assert sum(1 for c in proxied if c["cmd"] in ("get", "set")) <= SHARED
    finally:
        for client in clients:
            client.close()
        assert proxy.stop() == 0


def test_transactions_reuse_pooled_connections(pki: PKI, backend: RedisServer,
                                               tmp_path: Path) -> None:
    proxy = start(pki, backend, tmp_path)
    try:
        time.sleep(0.5)  # the pool is filled
        admin = backend.client()
        before = admin.info("stats")["total_connections_received"]

        def work(n: int) -> None:
            client = proxy.client()
            for i in range(20):
                pipe = client.pipeline(transaction=True)
                pipe.incr(f"app:phi:tx{n}").get(f"app:phi:tx{n}")
                assert pipe.execute() == [i + 1, str(i + 1).encode()]
            client.close()

        run_concurrently(5, work)
        time.sleep(2)  # past the release grace: every dedicated connection is back
        opened = admin.info("stats")["total_connections_received"] - before
        # 100 transactions from 5 clients: connections come from the pool (and its
        # refill), never one per transaction
        assert opened <= 5 + POOL, opened
        assert len(proxy_clients(backend)) <= SHARED + POOL + 5
    finally:
        assert proxy.stop() == 0


def test_a_blocked_client_does_not_stall_the_others(pki: PKI, backend: RedisServer,
                                                    tmp_path: Path) -> None:
    proxy = start(pki, backend, tmp_path)
    try:
        blocked = proxy.client()
        result: list[object] = []
        thread = threading.Thread(
            target=lambda: result.append(blocked.blpop(["app:phi:queue"], timeout=10)))
        thread.start()
        time.sleep(0.3)
        other = proxy.client()
        started = time.monotonic()
        for i in range(50):
            other.set(f"app:phi:o{i}", i)
        assert time.monotonic() - started < 2  # not behind the BLPOP
        other.rpush("app:phi:queue", "job")
        thread.join(5)
        assert result == [(b"app:phi:queue", b"job")]
    finally:
        assert proxy.stop() == 0


def test_db_name_and_id_are_kept_per_client(pki: PKI, backend: RedisServer,
                                            tmp_path: Path) -> None:
    proxy = start(pki, backend, tmp_path)
    try:
        one, two = proxy.client(db=1), proxy.client(db=2)
        one.client_setname("one")
        for i in range(20):  # interleaved on the shared connections
            one.set("app:phi:where", f"db1-{i}")
            two.set("app:phi:where", f"db2-{i}")
        assert backend.client(db=1).get("app:phi:where") == b"db1-19"
        assert backend.client(db=2).get("app:phi:where") == b"db2-19"
        assert one.client_getname() == "one" and two.client_getname() is None
        assert one.client_id() != two.client_id()
        assert one.client_id() == one.client_id()
        r3 = proxy.client(protocol=3)  # redis-py sends HELLO 3 itself
        hello = r3.execute_command("HELLO", "3")
        assert hello[b"proto"] == 3 and hello[b"server"] == b"redis"
        assert hello[b"id"] == r3.client_id()
        r3.set("app:phi:r3", "v")
        assert r3.get("app:phi:r3") == b"v" and one.get("app:phi:where") == b"db1-19"
    finally:
        assert proxy.stop() == 0


def test_backend_killed_mid_pipeline_answers_what_was_owed_and_recovers(
        pki: PKI, tmp_path: Path) -> None:
    port = free_port()
    backend = start_redis(pki, tmp_path / "redis", port)
    proxy = start(pki, backend, tmp_path / "proxy")
    try:
        client = proxy.client()
        client.set("app:phi:x", "1")
        results: list[object] = []

        def pipeline() -> None:
            pipe = client.pipeline(transaction=False)
            for _ in range(20000):
                pipe.incr("app:phi:n")
            results.extend(pipe.execute(raise_on_error=False))

        thread = threading.Thread(target=pipeline)
        thread.start()
        time.sleep(0.15)
        backend.proc.kill()
        thread.join(30)
        assert len(results) == 20000  # every command got an answer
        errors = [r for r in results if isinstance(r, Exception)]
        counts = [r for r in results if not isinstance(r, Exception)]
        assert errors and all("backend unavailable" in str(e) for e in errors)
        assert counts == list(range(1, len(counts) + 1))  # in order, none skipped
        backend = start_redis(pki, tmp_path / "redis", port)
        deadline = time.monotonic() + 10
        while True:  # the proxy reconnects by itself; the same client goes on
            try:
                assert client.set("app:phi:after", "ok")
                break
            except redis.ResponseError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert backend.client().get("app:phi:after") == b"ok"
        assert proxy.proc.poll() is None
    finally:
        assert proxy.stop() == 0
        backend.stop()


def test_a_client_that_never_reads_is_closed_and_its_neighbour_goes_on(
        pki: PKI, backend: RedisServer, tmp_path: Path) -> None:
    proxy = start(pki, backend, tmp_path, limits="max_reply_buffer_bytes = 1048576")
    busy = proxy.client()
    busy.set("app:phi:big", b"x" * 100_000)
    raw = proxy.ssl_context().wrap_socket(
        socket.create_connection(("127.0.0.1", proxy.port)), server_hostname="localhost")
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        get = b"*2\r\n$3\r\nGET\r\n$11\r\napp:phi:big\r\n"
        raw.settimeout(0.2)
        for _ in range(500):  # 50 MB of replies owed; it reads none of them
            try:
                raw.sendall(get * 4)
            except (TimeoutError, ssl.SSLError, OSError):
                break  # the proxy stopped reading it (or closed it)
        started = time.monotonic()
        for i in range(100):
            assert busy.get("app:phi:big") == b"x" * 100_000, i
        assert time.monotonic() - started < 10
        deadline = time.monotonic() + 10
        while "does not read its replies" not in proxy.stderr():
            assert time.monotonic() < deadline, proxy.stderr()[-2000:]
            time.sleep(0.1)
    finally:
        raw.close()
        assert proxy.stop() == 0


def test_the_proxy_waits_for_redis_at_start_and_serves_once_it_is_there(
        pki: PKI, tmp_path: Path) -> None:
    port = free_port()
    backend_port = free_port()
    config = write_proxy_config(pki, tmp_path / "p", backend_port, port)
    proxy = start_proxy(config, pki, port)
    try:
        client = proxy.client()
        try:
            client.get("app:phi:a")
            raise AssertionError("answered without a backend")
        except redis.ResponseError as exc:
            assert "backend unavailable" in str(exc)
        backend = start_redis(pki, tmp_path / "r", backend_port)
        wait_port(backend_port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.set("app:phi:a", "1")
                client.execute_command("SELECT", "1")  # needs the backend's db count
                break
            except redis.ResponseError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        backend.stop()
    finally:
        assert proxy.stop() == 0
