"""The policy through the live proxy: stricter extras, refusals in pipelines and MULTI,
KEYS/SCAN filtering against a backend seeded with out-of-scope keys."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import PKI, Proxy, RedisServer, free_port, start_proxy, write_proxy_config

ROLES = """
[roles.writer]
acl = "+@read +@write +@transaction +@pubsub -@dangerous ~app:phi:* &app:events:*"

[roles.reader]
acl = "+@read -@dangerous ~app:phi:*"

[roles.lister]
acl = "+@read +@transaction +keys +scan +randomkey ~app:phi:* &app:events:*"

[roles.scripter]
acl = "+@all ~app:*"

[roles.limited_db]
acl = "+@all ~*"
dbs = [0, 1]
"""

IDENTITIES = """
[[identities]]
subject_cn = "app-writer"
role = "writer"

[[identities]]
subject_cn = "app-reader"
role = "reader"

[[identities]]
subject_cn = "revoked-client"
role = "writer"
"""

OUT_OF_SCOPE = [b"billing:invoice:1", b"billing:invoice:2", b"secret", b"app:other:1"]
IN_SCOPE = [b"app:phi:1", b"app:phi:2", b"app:phi:3"]


@pytest.fixture()
def policy_proxy(pki: PKI, backend: RedisServer, tmp_path: Path) -> Iterator[Proxy]:
    port = free_port()
    config = write_proxy_config(pki, tmp_path / "proxy", backend.port, port, roles=ROLES,
                                identities=IDENTITIES)
    proxy = start_proxy(config, pki, port)
    seed = backend.client()
    for key in OUT_OF_SCOPE + IN_SCOPE:
        seed.set(key, "v")
    for i in range(300):  # enough keys for SCAN to take several pages
        seed.set(f"zz:filler:{i}", "v")
        seed.set(f"app:phi:many:{i}", "v")
    yield proxy
    proxy.stop()


def proxy_with_role(policy_proxy: Proxy, tmp_path: Path, role: str) -> Proxy:
    """The same proxy configuration, with app-writer mapped to `role`."""
    port = free_port()
    text = policy_proxy.config.read_text()
    text = text.replace('subject_cn = "app-writer"\nrole = "writer"',
                        f'subject_cn = "app-writer"\nrole = "{role}"')
    text = text.replace(f"port = {policy_proxy.port}", f"port = {port}", 1)
    text = text.replace('path = "audit.jsonl"', f'path = "{role}-audit.jsonl"')  # own trail
    config = policy_proxy.config.parent / f"{role}.toml"  # beside its backend.pass
    config.write_text(text)
    return start_proxy(config, policy_proxy.pki, port)


def raw_exchange(proxy: Proxy, payload: bytes, lines: int, client: str = "app-reader") -> bytes:
    """Send raw bytes; read until `lines` reply lines (simple replies) have arrived."""
    ctx = proxy.ssl_context(client)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(payload)
        data = b""
        while data.count(b"\r\n") < lines and (chunk := tls.recv(4096)):
            data += chunk
        return data


def test_reader_reads_its_keys_only(policy_proxy: Proxy) -> None:
    reader = policy_proxy.client("app-reader")
    assert reader.get("app:phi:1") == b"v"
    with pytest.raises(redis.exceptions.NoPermissionError,
                       match="no permissions to access one of the keys"):
        reader.get("billing:invoice:1")
    with pytest.raises(redis.exceptions.NoPermissionError,
                       match="no permissions to run the 'set' command"):
        reader.set("app:phi:1", "x")
    assert reader.get("app:phi:1") == b"v"  # the connection stays usable


def test_dangerous_keyless_command_refused_although_write_granted(
        policy_proxy: Proxy, backend: RedisServer) -> None:
    writer = policy_proxy.client("app-writer")
    with pytest.raises(redis.exceptions.NoPermissionError, match="'flushall'"):
        writer.flushall()
    assert backend.client().get("secret") == b"v"


def test_refusal_in_the_middle_of_a_pipeline_keeps_order(policy_proxy: Proxy,
                                                         backend: RedisServer) -> None:
    writer = policy_proxy.client("app-writer")
    pipe = writer.pipeline(transaction=False)
    pipe.set("app:phi:p", "1").set("billing:x", "1").get("app:phi:p").flushdb()
    pipe.incr("app:phi:counter")
    results = pipe.execute(raise_on_error=False)
    assert results[0] is True
    assert isinstance(results[1], redis.exceptions.NoPermissionError)
    assert results[2] == b"1"
    assert isinstance(results[3], redis.exceptions.NoPermissionError)
    assert results[4] == 1
    assert backend.client().get("billing:x") is None


def test_refusal_inside_multi_aborts_the_transaction(policy_proxy: Proxy,
                                                     backend: RedisServer) -> None:
    # On the wire, exactly as Redis answers: the refused command's NOPERM, then EXECABORT.
    payload = b"MULTI\r\nSET app:phi:tx 1\r\nSET billing:tx 1\r\nEXEC\r\nGET app:phi:none\r\n"
    answer = raw_exchange(policy_proxy, payload, 5, client="app-writer")
    lines = answer.split(b"\r\n")
    assert lines[:2] == [b"+OK", b"+QUEUED"]
    assert lines[2].startswith(b"-NOPERM") and b"keys" in lines[2]
    assert lines[3] == b"-EXECABORT Transaction discarded because of previous errors."
    assert lines[4] == b"$-1"  # and the connection goes on
    assert backend.client().get("app:phi:tx") is None  # nothing of the transaction ran
    # redis-py maps it to its errors (it raises the queued command's error first).
    writer = policy_proxy.client("app-writer")
    pipe = writer.pipeline(transaction=True)
    pipe.set("app:phi:tx", "1").set("billing:tx", "1")
    with pytest.raises((redis.exceptions.NoPermissionError, redis.exceptions.ExecAbortError)):
        pipe.execute()
    assert backend.client().get("app:phi:tx") is None


def test_mixed_case_and_inline_forms_are_refused(policy_proxy: Proxy,
                                                 backend: RedisServer) -> None:
    answer = raw_exchange(policy_proxy,
                          b"fLuShAlL\r\n*1\r\n$7\r\nFlushDb\r\nsEt secret x\r\n", 3)
    lines = answer.split(b"\r\n")
    assert lines[0].startswith(b"-NOPERM") and b"flushall" in lines[0]
    assert lines[1].startswith(b"-NOPERM") and b"flushdb" in lines[1]
    assert lines[2].startswith(b"-NOPERM")
    assert backend.client().get("secret") == b"v"


def test_keys_and_scan_are_filtered_to_the_role_patterns(policy_proxy: Proxy,
                                                         tmp_path: Path) -> None:
    proxy = proxy_with_role(policy_proxy, tmp_path, "lister")
    try:
        lister = proxy.client("app-writer")
        keys = set(lister.keys("*"))
        assert set(IN_SCOPE) <= keys
        assert all(k.startswith(b"app:phi:") for k in keys)
        assert len(keys) == len(IN_SCOPE) + 300
        # SCAN: pages may be short or empty, but the cursor walks the whole keyspace.
        seen: list[bytes] = []
        cursor, pages = 0, 0
        while True:
            cursor, page = lister.scan(cursor=cursor, count=50)
            pages += 1
            seen.extend(page)
            if cursor == 0:
                break
        assert pages > 2
        assert set(seen) == keys
        assert all(k.startswith(b"app:phi:") for k in seen)
        with pytest.raises(redis.exceptions.NoPermissionError):
            lister.randomkey()
        # Inside MULTI the reply would escape the filter: refused, transaction aborted.
        pipe = lister.pipeline(transaction=True)
        pipe.get("app:phi:1").keys("*")
        with pytest.raises(redis.exceptions.NoPermissionError, match="inside MULTI"):
            pipe.execute()
    finally:
        proxy.stop()


def test_keys_filtered_in_resp3(policy_proxy: Proxy, tmp_path: Path) -> None:
    proxy = proxy_with_role(policy_proxy, tmp_path, "lister")
    try:
        lister = proxy.client("app-writer", protocol=3)
        keys = lister.keys("*")
        assert keys and all(k.startswith(b"app:phi:") for k in keys)
    finally:
        proxy.stop()


def test_scripting_needs_an_explicit_grant(policy_proxy: Proxy, tmp_path: Path) -> None:
    proxy = proxy_with_role(policy_proxy, tmp_path, "scripter")
    try:
        scripter = proxy.client("app-writer")
        assert scripter.set("app:x", "1")  # +@all works for ordinary commands
        with pytest.raises(redis.exceptions.NoPermissionError, match="'eval'"):
            scripter.eval("return redis.call('GET', KEYS[1])", 1, "app:x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            scripter.sort("app:list", by="secret*")  # sort_pattern
    finally:
        proxy.stop()


def test_db_restriction(policy_proxy: Proxy, tmp_path: Path, backend: RedisServer) -> None:
    proxy = proxy_with_role(policy_proxy, tmp_path, "limited_db")
    try:
        client = proxy.client("app-writer", single_connection_client=True)
        assert client.select(1)
        client.set("in-db-1", "x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.select(2)
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.swapdb(0, 2)
        assert client.get("in-db-1") == b"x"  # still in db 1
    finally:
        proxy.stop()


def test_pubsub_channels_enforced(policy_proxy: Proxy) -> None:
    writer = policy_proxy.client("app-writer")
    assert writer.publish("app:events:a", "x") == 0
    with pytest.raises(redis.exceptions.NoPermissionError, match="channels"):
        writer.publish("billing:events", "x")
    pubsub = policy_proxy.client("app-writer").pubsub()
    with pytest.raises(redis.exceptions.NoPermissionError):
        pubsub.subscribe("billing:events")
        pubsub.get_message(timeout=5)


UNKNOWN_PROBES = [
    ("NOSUCHCMD", "app:x"),
    ("nosuchcmd",),
    ("FOO", "a" * 100, "b" * 100, "c"),
    ("FOO", "new\r\nline", "nul\0byte"),
    ("CONFIG", "NOSUCHSUB", "x"),
    ("client", "nosuch"),
    ("OBJECT", "x" * 300),
]


def test_unknown_commands_are_answered_exactly_as_redis_answers_them(
        policy_proxy: Proxy, tmp_path: Path, backend: RedisServer) -> None:
    """Clients probe for features with unknown commands: the error must be Redis's, byte
    for byte (SPEC §4), while the proxy still refuses and records the refusal."""
    trail = policy_proxy.config.parent / "scripter-audit.jsonl"  # other tests' records too
    seen = len(trail.read_text().splitlines()) if trail.exists() else 0
    proxy = proxy_with_role(policy_proxy, tmp_path, "scripter")  # +@all
    direct = backend.client()
    try:
        client = proxy.client("app-writer")
        for probe in UNKNOWN_PROBES:
            with pytest.raises(redis.exceptions.ResponseError) as redis_says:
                direct.execute_command(*probe)
            with pytest.raises(redis.exceptions.ResponseError) as proxy_says:
                client.execute_command(*probe)
            assert str(proxy_says.value) == str(redis_says.value), probe
            assert "unknown" in str(proxy_says.value)
        assert client.ping()  # the connection goes on, as with Redis
    finally:
        proxy.stop()
    records = [json.loads(line) for line in trail.read_text().splitlines()[seen:]]
    # redis-py probes too on every new connection: CLIENT MAINT_NOTIFICATIONS, and
    # CLIENT SETINFO (Redis 7.2; this Redis and the proxy's table are 7.0).
    setup = {"client|maint_notifications", "client|setinfo"}
    denied = [r for r in records if r["event"] == "denied" and r["command"] not in setup]
    assert len(denied) == len(UNKNOWN_PROBES), [(r.get("command"), r["reason"]) for r in denied]
    assert all(r["reason"].startswith("unknown_command") for r in denied)


def test_unchecked_keys_georadius_store_bypass_is_refused(policy_proxy: Proxy, tmp_path: Path,
                                                          backend: RedisServer) -> None:
    """Redis 7.0 checks the first STORE key but writes the last one; phiproxy refuses."""
    proxy = proxy_with_role(policy_proxy, tmp_path, "scripter")  # +@all ~app:*
    try:
        client = proxy.client("app-writer")
        client.geoadd("app:geo", (13.36, 38.11, "palermo"))
        with pytest.raises(redis.exceptions.NoPermissionError, match="'georadius'"):
            client.execute_command("GEORADIUS", "app:geo", 13.36, 38.11, 100, "km",
                                   "STORE", "app:ok", "STORE", "secret:stolen")
        assert backend.client().exists("secret:stolen") == 0
        # The honest form, with its one STORE key inside the patterns, is allowed.
        assert client.execute_command("GEORADIUS", "app:geo", 13.36, 38.11, 100, "km",
                                      "STORE", "app:ok") == 1
    finally:
        proxy.stop()
