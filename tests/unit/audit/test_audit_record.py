"""Audit record schema (SPEC §6): field order, every event, no values, ASCII output."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path

from proxy.audit.record import AuditRecords, encode_keys, event_of, format_src
from proxy.audit.writer import AuditWriter
from proxy.config import AuditConfig
from proxy.identity import Identity

KEY = os.urandom(32)
COMMON = ["ts", "seq", "event", "environment", "instance", "conn", "src", "identity", "role"]
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
IDENTITY = {"cn": "billing-service", "san_uri": "spiffe://example.org/billing",
            "fingerprint": "ab" * 32}


def write_all(tmp_path: Path, bodies: list[bytes]) -> list[dict]:
    writer = AuditWriter(AuditConfig(path=str(tmp_path / "audit.jsonl"), environment="prod",
                                     instance="proxy-9"), key=KEY)
    writer.open()
    assert writer.write(bodies)
    writer.close()
    lines = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    assert all(line.isascii() for line in lines)
    return [json.loads(line) for line in lines]


def all_events(records: AuditRecords) -> dict[str, tuple[bytes, list[str]]]:
    conn = records.connection(42, ("10.1.2.3", 50123), IDENTITY, "writer")
    return {
        "start": (records.start(version="0.1.0", pid=1234, config="/etc/phiproxy.toml"),
                  ["version", "pid", "config"]),
        "stop": (records.stop(reason="SIGTERM"), ["reason"]),
        "reload": (records.reload(ok=False, reason="bad policy"), ["ok", "reason"]),
        "recovered": (records.recovered(reason="torn", torn_file="a.torn-1", torn_bytes=3,
                                        torn_sha256="00" * 32),
                      ["reason", "torn_file", "torn_bytes", "torn_sha256"]),
        "tls_failed": (records.tls_failed(conn=43, src="10.1.2.3:50124",
                                          reason="certificate expired", subject="CN=old",
                                          fingerprint="cd" * 32),
                       ["reason", "subject", "fingerprint"]),
        "identity_refused": (records.identity_refused(conn=44, src="10.1.2.3:50125",
                                                      identity=IDENTITY, reason="no rule",
                                                      subject="CN=billing-service"),
                             ["reason", "subject", "fingerprint"]),
        "connect": (conn.connect(tls_version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384"),
                    ["tls"]),
        "auth": (conn.auth(username="legacy", command="hello"), ["command", "username"]),
        "command": (conn.command("set", [b"app:phi:1"], 0), ["command", "keys", "db"]),
        "denied": (conn.denied("config|get", [], 3, "dangerous"),
                   ["command", "keys", "db", "reason"]),
        "disconnect": (conn.disconnect(duration_s=1.5, commands=7, bytes_in=100,
                                       bytes_out=2000, reason="client closed"),
                       ["duration_s", "commands", "bytes_in", "bytes_out", "reason"]),
    }


def test_every_event_has_its_fields_in_order(tmp_path: Path) -> None:
    events = all_events(AuditRecords("prod", "proxy-9"))
    got = write_all(tmp_path, [body for body, _ in events.values()])
    assert [r["event"] for r in got] == list(events)
    for record, (name, (_, specific)) in zip(got, events.items(), strict=True):
        assert list(record) == COMMON + specific + ["prev", "mac"], name
        assert TS.match(record["ts"]) and record["environment"] == "prod"
        assert record["instance"] == "proxy-9"
    assert [r["seq"] for r in got] == list(range(1, len(events) + 1))
    assert got[0]["prev"] == "0" * 64
    assert all(b["prev"] == a["mac"] for a, b in zip(got, got[1:], strict=False))


def test_connection_fields(tmp_path: Path) -> None:
    got = {r["event"]: r for r in write_all(tmp_path, [
        body for body, _ in all_events(AuditRecords("prod", "proxy-9")).values()])}
    command = got["command"]
    assert command["conn"] == 42 and command["src"] == "10.1.2.3:50123"
    assert command["identity"] == IDENTITY and command["role"] == "writer"
    assert command["command"] == "set" and command["keys"] == ["app:phi:1"]
    assert command["db"] == 0
    assert got["denied"]["command"] == "config|get" and got["denied"]["reason"] == "dangerous"
    assert got["denied"]["db"] == 3 and got["denied"]["keys"] == []
    assert got["connect"]["tls"] == {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"}
    assert got["auth"]["username"] == "legacy" and "password" not in got["auth"]
    assert got["disconnect"]["duration_s"] == 1.5 and got["disconnect"]["bytes_out"] == 2000
    for name in ("start", "stop", "reload", "recovered"):
        assert [got[name][k] for k in ("conn", "src", "identity", "role")] == [None] * 4
    refused = got["identity_refused"]
    assert refused["identity"] == IDENTITY and refused["role"] is None
    assert refused["fingerprint"] == IDENTITY["fingerprint"]
    failed = got["tls_failed"]
    assert failed["identity"] is None and failed["subject"] == "CN=old"


def test_ts_is_rfc3339_utc_microseconds(tmp_path: Path) -> None:
    (record,) = write_all(tmp_path, [AuditRecords("dev", "p").stop(reason="x")])
    parsed = datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))
    assert abs(parsed.timestamp() - datetime.now().timestamp()) < 60


def test_no_value_is_ever_written(tmp_path: Path) -> None:
    # what the session has for SET app:phi:patient:7 <value>: the builders take the name
    # and the keys the key specs found; there is no parameter for a value
    value = b"DIAGNOSIS-ZX81-" + os.urandom(8).hex().encode()
    argv = [b"SET", b"app:phi:patient:7", value]
    conn = AuditRecords("dev", "p").connection(1, "127.0.0.1:1", IDENTITY, "writer")
    bodies = [conn.command("set", [argv[1]], 0), conn.denied("set", [argv[1]], 0, "noperm")]
    for body in bodies:
        assert b"app:phi:patient:7" in body and value not in body
    write_all(tmp_path, bodies)
    trail = (tmp_path / "audit.jsonl").read_bytes()
    assert b"app:phi:patient:7" in trail and value not in trail


def test_keys_are_escaped_ascii() -> None:
    keys = [b"app:phi:\xff\xfe", "app:phi:é".encode(), b'app:"quoted"\n', "str-key"]
    encoded = encode_keys(keys)
    assert encoded.isascii()
    assert json.loads(encoded) == ["app:phi:\\xff\\xfe", "app:phi:é", 'app:"quoted"\n',
                                   "str-key"]


def test_src_and_identity_forms() -> None:
    assert format_src(("::1", 6380, 0, 0)) == "[::1]:6380"
    assert format_src(("127.0.0.1", 5)) == "127.0.0.1:5" and format_src(None) is None
    identity = Identity(subject="CN=a", cn="a", ous=(), san_dns=(), san_uris=("spiffe://x",),
                        san_emails=(), fingerprint="ef" * 32, serial=1, not_after=None)  # type: ignore[arg-type]
    body = AuditRecords("dev", "p").connection(None, None, identity, None).command("get", [], 0)
    record = json.loads(b"{" + body + b"}")
    assert record["identity"] == {"cn": "a", "san_uri": "spiffe://x", "fingerprint": "ef" * 32}
    assert record["conn"] is None and record["src"] is None
    assert event_of(body) == "command"


def test_huge_db_and_many_names() -> None:
    conn = AuditRecords("dev", "p").connection(1, None, None, "r")
    assert json.loads(b"{" + conn.command("get", [b"k"], 1000) + b"}")["db"] == 1000
    for i in range(5000):  # client-chosen names: the per-connection cache stays bounded
        conn.denied(f"x{i}", [], 0, "unknown_command")
    assert len(conn._names) <= 4096
