"""Fixtures: a development PKI, a real TLS-only redis-server, and phiproxy as a subprocess."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    PKI,
    Proxy,
    RedisServer,
    free_port,
    make_test_pki,
    start_proxy,
    start_redis,
    write_proxy_config,
)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture()
def backend(pki: PKI, tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(pki, tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture()
def proxy(pki: PKI, backend: RedisServer, tmp_path: Path) -> Iterator[Proxy]:
    port = free_port()
    config = write_proxy_config(pki, tmp_path / "proxy", backend.port, port)
    proc = start_proxy(config, pki, port)
    yield proc
    proc.stop()
