"""Metrics scraped over HTTP from the running proxy, checked by value."""

from __future__ import annotations

import re
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis

from tests.helpers import (
    PKI,
    Proxy,
    RedisServer,
    free_port,
    run_concurrently,
    start_proxy,
    write_proxy_config,
)


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{labels} in metrics")


def refused_once(proxy: Proxy, client: str = "nobody") -> None:
    """One connection with an unmapped certificate: refused after the handshake (or with
    `client`'s certificate)."""
    ctx = proxy.ssl_context(client)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"PING\r\n")
                assert tls.recv(64) == b""
        except (ssl.SSLError, ConnectionError):
            pass


def test_metrics_count_commands_denials_connections(pki: PKI, backend: RedisServer,
                                                    tmp_path: Path) -> None:
    port, mport = free_port(), free_port()
    roles = ('[roles.writer]\nacl = "+@all ~* &*"\n'
             '[roles.reader]\nacl = "+@read +keys ~app:phi:*"\n')  # reader's KEYS is filtered
    config = write_proxy_config(pki, tmp_path / "p", backend.port, port, metrics_port=mport,
                                roles=roles)
    proxy = start_proxy(config, pki, port)
    try:
        status, _ = scrape(mport, "/healthz")
        assert status == 200
        deadline = time.monotonic() + 5
        while scrape(mport, "/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert scrape(mport, "/readyz")[0] == 200
        # Without redis-py's CLIENT SETINFO: a read-only role is refused it (as Redis 7.2
        # refuses a +@read user), which would add denials this test does not count.
        writer = proxy.client("app-writer")
        reader = proxy.client("app-reader", lib_name=None, lib_version=None)
        pipe = writer.pipeline(transaction=False)
        for i in range(25):
            pipe.set(f"app:phi:{i}", i)
        pipe.execute()
        for _ in range(7):
            writer.incr("app:phi:0")
        with pytest.raises(redis.ResponseError):
            writer.incr("app:phi:nonnumeric") if writer.set("app:phi:nonnumeric", "x") else None
        for _ in range(3):
            with pytest.raises(redis.exceptions.NoPermissionError):
                reader.set("app:phi:x", "1")
        assert all(k.startswith(b"app:phi:") for k in reader.keys("*"))  # a filtered reply
        refused_once(proxy)
        time.sleep(0.3)
        _, text = scrape(mport)
        assert value(text, "phiproxy_commands_total", command="set", role="writer",
                     result="ok") == 26
        assert value(text, "phiproxy_commands_total", command="incrby", role="writer",
                     result="ok") == 7
        assert value(text, "phiproxy_commands_total", command="incrby", role="writer",
                     result="error") == 1
        assert value(text, "phiproxy_commands_total", command="set", role="reader",
                     result="denied") == 3
        assert value(text, "phiproxy_denials_total", role="reader", reason="acl") == 3
        assert value(text, "phiproxy_commands_total", command="keys", role="reader",
                     result="ok") == 1
        assert value(text, "phiproxy_connections_total", result="refused",
                     reason="identity") == 1
        assert value(text, "phiproxy_connections_open") == 2
        assert value(text, "phiproxy_proxy_latency_seconds_count") >= 10
        assert value(text, "phiproxy_backend_rtt_seconds_count") >= 10
        assert value(text, "phiproxy_backend_up") == 1
        assert value(text, "phiproxy_cert_expiry_seconds", cert="server") > 86400
        assert "app:phi" not in text  # key names never reach the metrics
        backend.stop()
        deadline = time.monotonic() + 10
        while scrape(mport, "/readyz")[0] == 200 and time.monotonic() < deadline:
            writer.connection_pool.disconnect()
            try:
                proxy.client("app-writer").get("app:phi:1")
            except redis.RedisError:
                pass
            time.sleep(0.2)
        status, body = scrape(mport, "/readyz")
        assert status == 503 and "backend" in body
    finally:
        proxy.stop()


def test_lockout_blocks_a_source_after_repeated_failures(pki: PKI, backend: RedisServer,
                                                         tmp_path: Path) -> None:
    port, mport = free_port(), free_port()
    config = write_proxy_config(pki, tmp_path / "p", backend.port, port, metrics_port=mport)
    config.write_text(config.read_text() + "\n[lockout]\nfailures = 3\nwindow_s = 60\n"
                      "block_s = 30\n")
    proxy = start_proxy(config, pki, port)
    try:
        for _ in range(3):
            refused_once(proxy, "other-ca")  # no trusted certificate: counts per source
        time.sleep(0.2)
        # Now even a good certificate from the same source is refused before the handshake.
        with pytest.raises(redis.ConnectionError):
            proxy.client("app-writer").ping()
        _, text = scrape(mport)
        assert value(text, "phiproxy_connections_total", result="refused",
                     reason="lockout") >= 1
        assert value(text, "phiproxy_lockout_blocked_sources") == 1
        assert "blocked for 30 s after 3" in proxy.stderr()
        trail = (proxy.config.parent / "audit.jsonl").read_text()
        assert '"event":"lockout"' in trail
        assert '"blocked":{"kind":"source","address":"127.0.0.1"}' in trail
        assert '"reason":"lockout: source blocked for 30 s after 3' in trail
    finally:
        proxy.stop()


def test_audit_records_of_concurrent_clients_share_writes(pki: PKI, backend: RedisServer,
                                                          tmp_path: Path) -> None:
    """Reads that arrive in one event loop iteration are audited with one write-ahead
    (phiproxy_audit_writes_total < records), and every record is still there, in a chain
    that verifies."""
    port, mport = free_port(), free_port()
    config = write_proxy_config(pki, tmp_path / "p", backend.port, port, metrics_port=mport)
    proxy = start_proxy(config, pki, port)
    clients, per_client = 20, 200
    try:
        def work(n: int) -> None:
            client = proxy.client("app-writer")
            for i in range(per_client):  # no pipelining: one command per read
                client.set(f"app:phi:{n}:{i}", i)
            client.close()

        run_concurrently(clients, work, timeout=60)
        text = scrape(mport)[1]
        written = value(text, "phiproxy_audit_records_written_total")
        writes = value(text, "phiproxy_audit_writes_total")
    finally:
        assert proxy.stop() == 0
    trail = tmp_path / "p" / "audit.jsonl"
    commands = trail.read_text().count('"event":"command"')
    assert commands == clients * per_client
    assert written >= commands
    assert writes < written * 0.9, (writes, written)  # shared writes, not one per read
    from tests.integration.test_audit_live import verify

    result = verify(proxy, trail)
    assert result.returncode == 0, result.stdout + result.stderr
