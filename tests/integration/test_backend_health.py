"""Backend health without traffic (`[backend] health_interval_s`): /readyz and
phiproxy_backend_up follow a dead, a paused and a recovered backend within the interval,
and the pool refills after recovery without errors for new clients."""

from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import (
    PKI,
    Proxy,
    RedisServer,
    free_port,
    start_proxy,
    start_redis,
    write_proxy_config,
)

INTERVAL = 0.6
POOL = 3


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def seconds_until(condition: Callable[[], bool], limit: float) -> float:
    """How long until condition() holds (polled every 20 ms); fails past `limit`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < limit, f"not within {limit} s"
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture
def setup(pki: PKI, tmp_path: Path):
    port = free_port()
    backend = start_redis(pki, tmp_path / "redis", port)
    metrics_port = free_port()
    proxy_port = free_port()
    config = write_proxy_config(
        pki, tmp_path / "proxy", port, proxy_port, metrics_port=metrics_port,
        extra=f"health_interval_s = {INTERVAL}\npool_size = {POOL}")
    proxy = start_proxy(config, pki, proxy_port)
    state = {"backend": backend}
    seconds_until(lambda: readyz(metrics_port) == 200, 10)
    try:
        yield proxy, state, metrics_port, port
    finally:
        os.kill(state["backend"].proc.pid, signal.SIGCONT) if state["backend"].proc.poll() \
            is None else None
        assert proxy.stop() == 0
        state["backend"].stop()


def test_a_killed_backend_with_no_clients_is_seen_within_the_interval_and_its_return_too(
        setup: tuple[Proxy, dict[str, RedisServer], int, int], pki: PKI,
        tmp_path: Path) -> None:
    proxy, state, metrics_port, port = setup
    assert metric(metrics_port, "phiproxy_backend_up") == 1
    state["backend"].proc.kill()
    state["backend"].proc.wait()
    took = seconds_until(lambda: readyz(metrics_port) == 503, 5)
    assert took <= INTERVAL + 0.3
    assert metric(metrics_port, "phiproxy_backend_up") == 0

    state["backend"] = start_redis(pki, tmp_path / "redis", port)
    took = seconds_until(lambda: readyz(metrics_port) == 200, 5)
    assert took <= INTERVAL + 0.3
    assert metric(metrics_port, "phiproxy_backend_up") == 1
    # The pool is full again, with nobody asking for a connection.
    seconds_until(lambda: metric(metrics_port, "phiproxy_backend_pool_idle_connections")
                  == POOL, 3)
    # New clients right after recovery see no error at all: shared slots and the pool
    # came back before they asked.
    for n in range(20):
        client = proxy.client()
        assert client.set(f"app:phi:after:{n}", "ok")
        assert client.get(f"app:phi:after:{n}") == b"ok"
        with client.pipeline(transaction=True) as tx:  # a dedicated connection
            tx.incr("app:phi:tx").incr("app:phi:tx")
            assert len(tx.execute()) == 2
        client.close()
    assert state["backend"].client().get("app:phi:tx") == b"40"


def test_a_paused_backend_is_seen_by_ping_and_its_resumption_too(
        setup: tuple[Proxy, dict[str, RedisServer], int, int]) -> None:
    proxy, state, metrics_port, _ = setup
    pid = state["backend"].proc.pid
    # Paused, Redis keeps its connections open: only a PING that goes unanswered tells.
    os.kill(pid, signal.SIGSTOP)
    try:
        took = seconds_until(lambda: readyz(metrics_port) == 503, 5)
        assert took <= INTERVAL + 0.3
        assert "did not answer PING" in proxy.stderr()
    finally:
        os.kill(pid, signal.SIGCONT)
    took = seconds_until(lambda: readyz(metrics_port) == 200, 5)
    assert took <= INTERVAL + 0.3
    client = proxy.client()
    assert client.set("app:phi:resumed", "1") and client.get("app:phi:resumed") == b"1"
