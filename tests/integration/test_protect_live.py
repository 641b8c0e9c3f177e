"""Value encryption and TTL limits through the running proxy, against a real redis-server
(SPEC §9): Redis never holds a protected value in plaintext (its keyspace, its DUMP
serialisation, what MONITOR on the backend sees); a client never receives ciphertext; and
the refusals and TTL rules as a client meets them, with redis-py in RESP2 and RESP3."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from proxy.protect.crypto import MAGIC, is_ciphertext
from proxy.protect.keyring import create_keyring
from tests.helpers import (
    PKI,
    Proxy,
    RedisServer,
    free_port,
    start_proxy,
    start_redis,
    write_proxy_config,
)

PROTECT = """
[encryption]
keyring = "keyring.json"

[[protect]]
keys = ["app:phi:*"]
encrypt = true
max_ttl_s = 86400
default_ttl_s = 3600

[[protect]]
keys = ["app:cache:*"]
max_ttl_s = 60
"""
SECRET = "MRN-0042 Ada Lovelace, dx: J45"


@pytest.fixture(scope="module")
def site(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proxy,
                                                                              RedisServer]]:
    tmp = tmp_path_factory.mktemp("protect")
    backend = start_redis(pki, tmp / "redis")
    port = free_port()
    config = write_proxy_config(pki, tmp / "proxy", backend.port, port, extra="")
    create_keyring(config.parent / "keyring.json")
    config.write_text(config.read_text() + PROTECT)
    proxy = start_proxy(config, pki, port)
    yield proxy, backend
    proxy.stop()
    backend.stop()


def monitor(backend: RedisServer, seen: list[bytes], stop: threading.Event) -> None:
    with backend.client().monitor() as m:
        for event in m.listen():
            seen.append(event["command"].encode("utf-8", "surrogateescape"))
            if stop.is_set():
                return


@pytest.mark.parametrize("protocol", [2, 3])
def test_redis_never_holds_plaintext_and_clients_never_see_ciphertext(
        site: tuple[Proxy, RedisServer], protocol: int) -> None:
    proxy, backend = site
    client = proxy.client(protocol=protocol, decode_responses=True)
    direct = backend.client()
    key = f"app:phi:p{protocol}"
    client.set(key, SECRET)
    client.hset(f"{key}:h", mapping={"name": "Ada", "dob": "1815-12-10"})
    client.rpush(f"{key}:q", "job-1", "job-2")
    client.xadd(f"{key}:s", {"event": "admitted", "ward": "7"})
    client.mset({f"{key}:m1": "one", f"{key}:m2": "two"})

    # Through the proxy: plaintext, in every reply shape.
    assert client.get(key) == SECRET
    assert client.mget(f"{key}:m1", "app:other", f"{key}:m2") == ["one", None, "two"]
    assert client.hgetall(f"{key}:h") == {"name": "Ada", "dob": "1815-12-10"}
    assert sorted(client.hvals(f"{key}:h")) == ["1815-12-10", "Ada"]
    assert client.hmget(f"{key}:h", ["dob", "nope"]) == ["1815-12-10", None]
    assert client.lrange(f"{key}:q", 0, -1) == ["job-1", "job-2"]
    assert client.lmove(f"{key}:q", f"{key}:work", "LEFT", "RIGHT") == "job-1"
    assert client.lrange(f"{key}:work", 0, -1) == ["job-1"]
    (entry_id, fields), = client.xrange(f"{key}:s")
    assert fields == {"event": "admitted", "ward": "7"}
    with client.pipeline(transaction=True) as tx:
        tx.set(f"{key}:tx", "in a transaction").get(f"{key}:tx").hget(f"{key}:h", "name")
        assert tx.execute() == [True, "in a transaction", "Ada"]

    # In Redis: ciphertext only, and every protected key got the default TTL.
    for name in direct.scan_iter(match=f"{key}*"):
        kind = direct.type(name)
        if kind == b"string":
            values = [direct.get(name)]
        elif kind == b"hash":
            values = list(direct.hgetall(name).values())
        elif kind == b"list":
            values = direct.lrange(name, 0, -1)
        else:
            values = [v for _, f in direct.xrange(name) for v in f.values()]
        assert values and all(is_ciphertext(v) for v in values), (name, values)
        assert 0 < direct.ttl(name) <= 3600, name
    dumped = b"".join(direct.dump(n) or b"" for n in direct.scan_iter(match=f"{key}*"))
    for plain in (SECRET, "Ada", "1815-12-10", "job-2", "admitted", "in a transaction"):
        assert plain.encode() not in dumped


def test_monitor_on_the_backend_sees_no_plaintext(site: tuple[Proxy, RedisServer]) -> None:
    proxy, backend = site
    seen: list[bytes] = []
    stop = threading.Event()
    watcher = threading.Thread(target=monitor, args=(backend, seen, stop), daemon=True)
    watcher.start()
    time.sleep(0.3)
    client = proxy.client()
    client.set("app:phi:watched", SECRET)
    client.hset("app:phi:watched:h", "note", SECRET)
    assert client.get("app:phi:watched") == SECRET.encode()
    stop.set()
    backend.client().ping()  # one more event so the monitor loop sees stop
    watcher.join(5)
    commands = b"\n".join(seen)
    assert b"app:phi:watched" in commands  # it did see the traffic
    assert SECRET.encode() not in commands


@pytest.mark.parametrize(("args", "words"), [
    (("INCR", "app:phi:n"), "computes on the stored value"),
    (("SADD", "app:phi:set", "m"), "compares members"),
    (("RENAME", "app:phi:a", "app:phi:b"), "would move a value"),
    (("EVAL", "return redis.call('GET', KEYS[1])", "1", "app:phi:a"), "runs a script"),
    (("EXPIRE", "app:phi:a", "90000"), "beyond max_ttl_s = 86400"),
    (("PERSIST", "app:phi:a"), "would remove the key's TTL"),
    (("SET", "app:cache:x", "v", "EX", "61"), "beyond max_ttl_s = 60"),
])
def test_refusals_name_the_command_the_key_and_the_rule(
        site: tuple[Proxy, RedisServer], args: tuple[str, ...], words: str) -> None:
    proxy, backend = site
    client = proxy.client()
    client.set("app:phi:a", "x")
    with pytest.raises(redis.ResponseError) as refused:
        client.execute_command(*args)
    text = str(refused.value)
    key = args[3] if args[0] == "EVAL" else args[1]
    assert f"'{args[0]}' is refused on protected key '{key}'" in text
    assert "[[protect]] #" in text and words in text


def test_ttl_only_rule_gives_its_maximum_to_writes_without_ttl(
        site: tuple[Proxy, RedisServer]) -> None:
    proxy, backend = site
    client = proxy.client()
    client.set("app:cache:k", "v")  # no encryption on this rule: stored as it is
    client.expire("app:cache:k2", 30)
    direct = backend.client()
    assert direct.get("app:cache:k") == b"v" and 0 < direct.ttl("app:cache:k") <= 60


def test_a_value_copied_by_someone_with_direct_access_fails_to_decrypt(
        site: tuple[Proxy, RedisServer]) -> None:
    proxy, backend = site
    client = proxy.client()
    client.set("app:phi:patient:1", "patient one")
    direct = backend.client()
    stolen = direct.get("app:phi:patient:1")
    assert stolen.startswith(MAGIC)
    direct.set("app:phi:patient:2", stolen)  # moved to another patient's key
    with pytest.raises(redis.ResponseError, match="cannot be decrypted"):
        client.get("app:phi:patient:2")
    direct.set("app:phi:legacy", "written before protection")
    with pytest.raises(redis.ResponseError, match="not encrypted"):
        client.get("app:phi:legacy")


def test_config_without_protection_is_untouched(pki: PKI, tmp_path: Path) -> None:
    backend = start_redis(pki, tmp_path / "redis")
    port = free_port()
    proxy = start_proxy(write_proxy_config(pki, tmp_path / "p", backend.port, port), pki, port)
    try:
        proxy.client().set("app:phi:x", "plain")
        assert backend.client().get("app:phi:x") == b"plain"
        assert backend.client().ttl("app:phi:x") == -1
    finally:
        proxy.stop()
        backend.stop()
