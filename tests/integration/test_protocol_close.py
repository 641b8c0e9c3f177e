"""A client that breaks the protocol is answered `-ERR Protocol error` and its connection is
closed within about a second, whatever it does next (Redis closes at once). Seen from
Redis's own test suite: a client that keeps writing and never reads kept its connection
for 30 s while the TLS shutdown waited for a close_notify it never sent."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import PKI, Proxy, free_port, start_proxy, start_redis, write_proxy_config


@pytest.fixture(scope="module")
def proxy(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("protocol-close")
    backend = start_redis(pki, tmp / "redis")
    port = free_port()
    proxy = start_proxy(write_proxy_config(pki, tmp / "proxy", backend.port, port), pki, port)
    yield proxy
    proxy.stop()
    backend.stop()


def connect(proxy: Proxy) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    return proxy.ssl_context().wrap_socket(raw, server_hostname="localhost")


def seconds_until_closed(tls: ssl.SSLSocket, limit: float) -> float:
    """Keep writing and never read, as the offending clients do; the time until a write
    fails because the proxy dropped the connection."""
    start = time.monotonic()
    tls.settimeout(0.5)
    while time.monotonic() - start < limit:
        try:
            tls.send(b"x" * 1024)
        except (TimeoutError, ssl.SSLWantWriteError):
            continue  # the buffers are full: the proxy is not reading any more
        except (OSError, ssl.SSLError):
            return time.monotonic() - start
    return float("inf")


@pytest.mark.parametrize("garbage", [b"*\x00\r\n", b"$\x00\r\n", b"x" * (70 * 1024)],
                         ids=["star-nul", "dollar-nul", "endless-inline"])
def test_a_protocol_error_closes_within_a_second_even_if_the_client_keeps_writing(
        proxy: Proxy, garbage: bytes) -> None:
    tls = connect(proxy)
    try:
        tls.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert tls.recv(64) == b"+PONG\r\n"
        tls.sendall(garbage)
        took = seconds_until_closed(tls, 10)
        assert took < 2.0, f"still connected after {took:.1f} s"
    finally:
        tls.close()
    assert "protocol error from" in Path(proxy.log).read_text()


def test_the_error_reply_arrives_before_the_close(proxy: Proxy) -> None:
    tls = connect(proxy)
    try:
        tls.sendall(b"*\x00\r\n")
        data = b""
        while b"\r\n" not in data:
            chunk = tls.recv(256)
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"-ERR Protocol error")
    finally:
        tls.close()
