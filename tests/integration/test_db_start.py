"""A role whose `dbs` excludes 0 starts in its first allowed database, never in db 0."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import PKI, RedisServer, free_port, start_proxy, write_proxy_config


def test_role_without_db0_starts_in_its_first_database(pki: PKI, backend: RedisServer,
                                                       tmp_path: Path) -> None:
    port = free_port()
    roles = '[roles.writer]\nacl = "+@all ~*"\ndbs = [5, 3]\n[roles.reader]\nacl = "+@read"\n'
    config = write_proxy_config(pki, tmp_path / "p", backend.port, port, roles=roles)
    proxy = start_proxy(config, pki, port)
    try:
        client = proxy.client("app-writer", single_connection_client=True)
        client.set("where-am-i", "here")
        direct = backend.client
        assert direct(db=0).get("where-am-i") is None
        assert direct(db=3).get("where-am-i") == b"here"
    finally:
        proxy.stop()
