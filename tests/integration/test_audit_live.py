"""The audit trail written by the running proxy (SPEC §6), checked record by record."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
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

SECRET_VALUE = "Jane-Doe-MRN-0071-DISTINCTIVE"
SECRET_PASSWORD = "legacy-password-DISTINCTIVE"
ROLES = """
[roles.writer]
acl = "+@all ~* &*"

[roles.reader]
acl = "+@read -@dangerous ~app:phi:*"
"""


def records(proxy: Proxy) -> list[dict]:
    path = proxy.config.parent / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def verify(proxy: Proxy, *files: Path) -> subprocess.CompletedProcess[str]:
    targets = files or (proxy.config.parent / "audit.jsonl",)
    return subprocess.run(
        [sys.executable, "-m", "proxy", "audit", "verify", *map(str, targets),
         "--key-file", str(proxy.config.parent / "audit.key")],
        capture_output=True, text=True, timeout=60)


@pytest.fixture()
def audited(pki: PKI, backend: RedisServer, tmp_path: Path) -> Proxy:
    port = free_port()
    config = write_proxy_config(pki, tmp_path / "p", backend.port, port, roles=ROLES)
    proxy = start_proxy(config, pki, port)
    yield proxy
    proxy.stop()


def refused_once(proxy: Proxy, client: str | None) -> None:
    ctx = proxy.ssl_context(client)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"PING\r\n")
                tls.recv(64)
        except (ssl.SSLError, ConnectionError):
            pass


def test_scripted_session_every_event_and_no_value(audited: Proxy) -> None:
    writer = audited.client("app-writer", username="legacy", password=SECRET_PASSWORD)
    writer.set("app:phi:patient:1", SECRET_VALUE)
    assert writer.get("app:phi:patient:1") == SECRET_VALUE.encode()
    writer.set("cache:page", SECRET_VALUE)  # not PHI: no command record
    writer.keys("*")  # keyless but reads names: recorded
    reader = audited.client("app-reader")
    with pytest.raises(redis.exceptions.NoPermissionError):
        reader.set("app:phi:patient:1", SECRET_VALUE)
    with pytest.raises(redis.exceptions.NoPermissionError):
        reader.flushall()
    refused_once(audited, "nobody")
    refused_once(audited, "expired")
    writer.close()
    reader.close()
    time.sleep(0.3)
    assert audited.stop() == 0

    trail = records(audited)
    text = (audited.config.parent / "audit.jsonl").read_text()
    assert SECRET_VALUE not in text and SECRET_PASSWORD not in text
    events = [r["event"] for r in trail]
    for event in ("start", "connect", "auth", "command", "denied", "identity_refused",
                  "tls_failed", "disconnect", "stop"):
        assert event in events, event
    assert [r["seq"] for r in trail] == list(range(1, len(trail) + 1))
    for r in trail:
        assert list(r)[:9] == ["ts", "seq", "event", "environment", "instance", "conn", "src",
                               "identity", "role"]
        assert list(r)[-2:] == ["prev", "mac"]
        assert r["environment"] == "test" and r["instance"] == "proxy-test"
    commands = [r for r in trail if r["event"] == "command"]
    assert {(r["command"], tuple(r["keys"])) for r in commands} >= {
        ("set", ("app:phi:patient:1",)), ("get", ("app:phi:patient:1",)), ("keys", ())}
    assert not any("cache:page" in r.get("keys", []) for r in commands)
    assert all(r["identity"]["cn"] == "app-writer" and r["role"] == "writer" for r in commands)
    denied = [r for r in trail if r["event"] == "denied"]
    assert {r["command"] for r in denied} >= {"set", "flushall"}
    # (redis-py's CLIENT SETINFO is unknown to Redis 7.0: refused for every role)
    assert all(r["role"] == "reader" and r["reason"] for r in denied
               if not r["command"].startswith("client"))
    connect = next(r for r in trail if r["event"] == "connect")
    assert connect["identity"]["fingerprint"] and connect["src"].startswith("127.0.0.1:")
    auth = next(r for r in trail if r["event"] == "auth")
    assert auth.get("username") == "legacy"
    disconnect = next(r for r in trail if r["event"] == "disconnect")
    assert disconnect["commands"] >= 1 and "duration_s" in disconnect
    assert any("cert_expired" in (r.get("reason") or "") for r in trail
               if r["event"] == "tls_failed")

    ok = verify(audited)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert str(len(trail)) in ok.stdout


def test_verify_detects_an_edited_record(audited: Proxy) -> None:
    audited.client("app-writer").set("app:phi:x", "1")
    assert audited.stop() == 0
    path = audited.config.parent / "audit.jsonl"
    lines = path.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if '"event":"command"' in line)
    lines[index] = lines[index].replace("app:phi:x", "app:phi:y")
    path.write_text("\n".join(lines) + "\n")
    result = verify(audited)
    assert result.returncode == 1
    assert f"seq {index + 1}" in result.stdout + result.stderr or \
        f"line {index + 1}" in result.stdout + result.stderr


def test_fail_closed_refuses_phi_commands_then_recovers(audited: Proxy,
                                                        backend: RedisServer) -> None:
    client = audited.client("app-writer")
    assert client.set("app:phi:before", "1")
    trail = audited.config.parent / "audit.jsonl"
    aside = trail.with_suffix(".aside")
    trail.rename(aside)
    trail.mkdir()  # the sink's path is now a directory: every write fails
    # The writer notices within about a second; until then writes still reach the old file.
    deadline = time.monotonic() + 5
    refused_key = None
    attempt = 0
    while time.monotonic() < deadline and refused_key is None:
        attempt += 1
        try:
            client.set(f"app:phi:during:{attempt}", "1")
        except redis.ResponseError as exc:
            assert "audit unavailable" in str(exc)
            refused_key = f"app:phi:during:{attempt}"
        time.sleep(0.1)
    assert refused_key is not None
    assert backend.client().get(refused_key) is None  # never reached Redis
    assert client.set("cache:not-phi", "1")  # commands without PHI still work
    # A transaction with one unauditable command must not run the rest of it.
    tx = client.pipeline(transaction=True)
    tx.set("cache:tx", "1").set("app:phi:tx", "1")
    with pytest.raises(redis.RedisError):
        tx.execute()
    assert backend.client().get("cache:tx") is None
    trail.rmdir()
    deadline = time.monotonic() + 5
    while True:  # the writer reopens the path by itself
        try:
            assert client.set("app:phi:after", "1")
            break
        except redis.ResponseError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert backend.client().get("app:phi:after") == b"1"
    shutil.move(str(aside), str(aside) + ".kept")


def test_command_records_match_phi_commands_executed_under_load(audited: Proxy,
                                                                backend: RedisServer) -> None:
    clients, per_client = 50, 2000

    def work(n: int) -> None:
        client = audited.client("app-writer")
        pipe = client.pipeline(transaction=False)
        for i in range(per_client):
            if i % 2:
                pipe.hset(f"app:phi:{n}", f"f{i}", i)  # PHI
            else:
                pipe.set(f"cache:{n}:{i}", i)  # not PHI
            if i % 100 == 99:
                pipe.execute()
        pipe.execute()
        client.close()

    run_concurrently(clients, work)
    stats = backend.client().info("commandstats")
    executed = stats["cmdstat_hset"]["calls"]
    assert executed == clients * per_client // 2
    time.sleep(0.5)
    command_records = [r for r in records(audited)
                       if r["event"] == "command" and r["command"] == "hset"]
    assert len(command_records) == executed


def test_command_records_carry_the_db_of_a_pipelined_select(audited: Proxy) -> None:
    ctx = audited.ssl_context("app-writer")
    with socket.create_connection(("127.0.0.1", audited.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"SELECT 3\r\nSET app:phi:in3 x\r\nSELECT 99\r\nSET app:phi:still3 y\r\n")
        data = b""
        while data.count(b"\r\n") < 4:
            data += tls.recv(4096)
        assert data.startswith(b"+OK\r\n+OK\r\n-ERR")  # db 99 is out of range
        tls.sendall(b"SET app:phi:after z\r\n")
        assert tls.recv(64) == b"+OK\r\n"
    time.sleep(0.2)
    dbs = {r["keys"][0]: r["db"] for r in records(audited)
           if r["event"] == "command" and r["command"] == "set"}
    assert dbs["app:phi:in3"] == 3  # the pipelined SELECT counts before its reply is back
    # SELECT 99 was in flight for the next record; once refused, the session is back in 3.
    assert dbs["app:phi:after"] == 3
