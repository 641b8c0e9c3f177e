"""Memory stays bounded when a client pipelines and never reads (SPEC §7, ARCHITECTURE 6)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import PKI, Proxy, RedisServer, free_port, start_proxy, write_proxy_config

MiB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def limited(pki: PKI, backend: RedisServer, tmp_path: Path) -> Iterator[Proxy]:
    """A proxy that buffers at most 32 MiB of replies for a client that does not read."""
    port = free_port()
    config = write_proxy_config(pki, tmp_path, backend.port, port)
    config.write_text(config.read_text() + f"\n[limits]\nmax_reply_buffer_bytes = {32 * MiB}\n")
    proxy = start_proxy(config, pki, port)
    yield proxy
    proxy.stop()


def test_client_that_never_reads_does_not_grow_the_proxy(limited: Proxy,
                                                         backend: RedisServer) -> None:
    """Its replies come over a shared backend connection that other clients use too, so
    Redis cannot be paused for it: they are buffered up to max_reply_buffer_bytes, then
    the client is disconnected with a log line that says why (SPEC §5)."""
    proxy = limited
    backend.client().set("app:phi:big", b"x" * MiB)
    baseline = rss_bytes(proxy.proc.pid)
    ctx = proxy.ssl_context("app-writer")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.setblocking(False)
        request = b"*2\r\n$3\r\nGET\r\n$11\r\napp:phi:big\r\n" * 50
        sent, deadline = 0, time.monotonic() + 8
        # Ask for ~800 MiB of replies and read none of them.
        while sent < 800 and time.monotonic() < deadline:
            try:
                tls.sendall(request)
                sent += 50
            except (BlockingIOError, TimeoutError, OSError):
                time.sleep(0.05)  # the proxy stopped reading from us: that's the point
        time.sleep(1.0)
        grown = rss_bytes(proxy.proc.pid) - baseline
        assert grown < 64 * MiB, f"proxy grew by {grown / MiB:.0f} MiB for a non-reading client"
    # The proxy still serves others afterwards, and said why it dropped that client.
    assert proxy.client().get("app:phi:big") == b"x" * MiB
    assert "does not read its replies" in proxy.stderr()


def test_client_that_never_reads_local_replies_is_bounded(proxy: Proxy) -> None:
    """Refusals are answered by the proxy itself: reading must pause for them too."""
    baseline = rss_bytes(proxy.proc.pid)
    ctx = proxy.ssl_context("app-reader")  # role reader: SET is refused locally
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.setblocking(False)
        request = b"*3\r\n$3\r\nSET\r\n$9\r\napp:phi:x\r\n$1\r\n1\r\n" * 2000
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            try:
                tls.sendall(request)
            except (BlockingIOError, TimeoutError, OSError):
                time.sleep(0.05)
        grown = rss_bytes(proxy.proc.pid) - baseline
        assert grown < 64 * MiB, f"proxy grew by {grown / MiB:.0f} MiB"
