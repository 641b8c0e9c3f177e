"""`phiproxy keys rewrap` against a real redis-server: values seeded under an old key (with
Cipher directly, as the proxy would have written them) move to the new primary with TTLs,
stream ids and concurrent writes kept; undecryptable values are left and counted."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from proxy.cli import main
from proxy.config import Config, load_config
from proxy.protect.crypto import HASH, LIST, STREAM, STRING, Cipher, associated, key_id_of
from proxy.protect.keyring import add_key, create_keyring, load_keyring
from proxy.protect.rewrap import rewrap
from tests.helpers import PKI, RedisServer, free_port, start_proxy, write_proxy_config

PROTECT = """
[encryption]
keyring = "keyring.json"

[[protect]]
keys = ["app:phi:public:*"]

[[protect]]
keys = ["app:phi:*", "app:notes:*"]
encrypt = true
"""

STRINGS = 200


@dataclass
class Site:
    config_path: Path
    config: Config  # loaded after the rotation: the new primary
    old: Cipher
    new: Cipher
    r: redis.Redis

    @property
    def binding(self) -> bytes:
        return self.config.protection.rules[1].list_binding

    def reload(self) -> None:
        self.config = load_config(self.config_path)

    def trail(self, name: str = "audit.jsonl") -> list[dict]:
        path = self.config_path.parent / name
        return [json.loads(line) for line in path.read_text().splitlines()]

    def verify(self, name: str = "audit.jsonl") -> int:
        return main(["audit", "verify", str(self.config_path.parent / name), "--key-file",
                     str(self.config_path.parent / "audit.key")])


def _site(pki: PKI, backend: RedisServer, workdir: Path) -> Site:
    workdir.mkdir(parents=True, exist_ok=True)
    keyring = workdir / "keyring.json"
    create_keyring(keyring)
    old = load_keyring(keyring)
    path = write_proxy_config(pki, workdir, backend.port, free_port(), extra=PROTECT)
    add_key(keyring)
    config = load_config(path)
    assert config.encryption.cipher is not None
    return Site(path, config, old, config.encryption.cipher, backend.client())


@pytest.fixture()
def site(pki: PKI, backend: RedisServer, tmp_path: Path) -> Site:
    return _site(pki, backend, tmp_path / "proxy")


def seed(site: Site) -> None:
    """Everything the proxy would have stored under the old key, plus odd cases."""
    r, old = site.r, site.old
    for i in range(STRINGS):
        key = f"app:phi:s:{i}".encode()
        r.set(key, old.encrypt(b"patient %d" % i, associated(STRING, key)),
              ex=1000 if i % 2 else None)
    key = b"app:notes:h"
    r.hset(key, mapping={f"f{i}": old.encrypt(b"note %d" % i, associated(HASH, key, b"f%d" % i))
                         for i in range(5)})
    r.expire(key, 2000)
    key = b"app:phi:l"
    r.rpush(key, *[old.encrypt(b"item %d" % i, associated(LIST, site.binding))
                   for i in range(5)])
    key = b"app:phi:x"
    for i in range(1, 5):
        r.xadd(key, {b"a": old.encrypt(b"event %d" % i, associated(STREAM, key, b"a")),
                     b"b": old.encrypt(b"more %d" % i, associated(STREAM, key, b"b"))},
               id=f"{i}-1")
    r.xdel(key, "4-1")  # the last id was deleted: the rebuilt stream must still know it
    r.expire(key, 3000)
    key = b"app:phi:xg"
    r.xadd(key, {b"a": old.encrypt(b"grouped", associated(STREAM, key, b"a"))}, id="1-1")
    r.xgroup_create(key, "workers", id="0")
    r.sadd("app:phi:set", "member")
    r.set("app:phi:public:1", "plain on purpose")  # an earlier rule without encryption
    r.set("other:1", old.encrypt(b"not protected", associated(STRING, b"other:1")))


def dumps(r: redis.Redis) -> dict[bytes, bytes]:
    return {key: r.dump(key) for key in r.scan_iter(count=1000)}


def check_rewrapped(site: Site) -> None:
    r, new = site.r, site.new
    for i in range(STRINGS):
        key = f"app:phi:s:{i}".encode()
        value = r.get(key)
        assert key_id_of(value) == new.primary
        assert new.decrypt(value, associated(STRING, key)) == b"patient %d" % i
        ttl = r.ttl(key)
        assert (900 < ttl <= 1000) if i % 2 else ttl == -1, (key, ttl)
    key = b"app:notes:h"
    stored = r.hgetall(key)
    assert {f: new.decrypt(v, associated(HASH, key, f)) for f, v in stored.items()} == {
        b"f%d" % i: b"note %d" % i for i in range(5)}
    assert {key_id_of(v) for v in stored.values()} == {new.primary}
    assert 1900 < r.ttl(key) <= 2000
    key = b"app:phi:l"
    ad = associated(LIST, site.binding)
    items = r.lrange(key, 0, -1)
    assert [new.decrypt(v, ad) for v in items] == [b"item %d" % i for i in range(5)]
    assert {key_id_of(v) for v in items} == {new.primary}
    key = b"app:phi:x"
    entries = r.xrange(key)
    assert [e[0] for e in entries] == [b"1-1", b"2-1", b"3-1"]  # the same ids
    for entry_id, fields in entries:
        n = int(entry_id.split(b"-")[0])
        assert new.decrypt(fields[b"a"], associated(STREAM, key, b"a")) == b"event %d" % n
        assert new.decrypt(fields[b"b"], associated(STREAM, key, b"b")) == b"more %d" % n
        assert {key_id_of(v) for v in fields.values()} == {new.primary}
    info = r.xinfo_stream(key)
    assert info["last-generated-id"] == b"4-1" and info["entries-added"] == 4
    assert info["max-deleted-entry-id"] == b"4-1"
    assert 2900 < r.ttl(key) <= 3000
    with pytest.raises(redis.ResponseError):
        r.xadd(key, {"a": "x"}, id="4-1")  # ids already used stay used


def rewrap_cli(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "keys", "rewrap", "-c",
                           str(site.config_path), *args], capture_output=True, text=True,
                          timeout=120)


def test_rewrap_moves_everything_to_the_new_primary(site: Site) -> None:
    seed(site)
    r = site.r
    r.set("app:phi:plain", "legacy plaintext")  # written before protection was enabled
    copied = site.old.encrypt(b"someone else's", associated(STRING, b"app:phi:s:0"))
    r.set("app:phi:copied", copied)  # copied from another key: does not verify here
    before = dumps(r)

    dry = rewrap_cli(site, "--dry-run")
    assert dry.returncode == 1, dry.stderr
    assert "dry run" in dry.stdout and f"would rewrap {STRINGS + 5 + 5 + 6} values" in dry.stdout
    assert dumps(r) == before  # the dry run changed nothing
    record = site.trail()[-1]
    assert record["event"] == "rewrap" and record["dry_run"] is True

    done = rewrap_cli(site)
    assert done.returncode == 1, done.stderr  # two values could not be decrypted
    check_rewrapped(site)
    assert r.get("app:phi:plain") == b"legacy plaintext"  # left as it was
    assert r.get("app:phi:copied") == copied
    assert r.dump("app:phi:xg") == before[b"app:phi:xg"]  # consumer groups: left
    assert r.dump("other:1") == before[b"other:1"]  # not protected
    assert r.dump("app:phi:public:1") == before[b"app:phi:public:1"]
    assert "keep those keys in the keyring" in done.stdout
    assert "1 not ciphertext" in done.stdout and "1 tampered" in done.stdout

    record = site.trail()[-1]
    assert record["event"] == "rewrap" and record["dry_run"] is False
    assert record["ok"] is False and record["primary"] == site.new.primary
    counts = record["counts"]
    assert counts["rewrapped"] == STRINGS + 5 + 5 + 6
    assert counts["keys_changed"] == STRINGS + 3
    assert (counts["not_ciphertext"], counts["tampered"], counts["unknown_key"]) == (1, 1, 0)
    assert (counts["streams_with_groups"], counts["stream_values_left"]) == (1, 1)
    assert counts["other_types"] == 1 and counts["busy"] == 0
    assert record["by"]["user"] and record["by"]["pid"]
    assert "legacy plaintext" not in json.dumps(record)
    assert site.verify() == 0

    r.delete("app:phi:plain", "app:phi:copied")
    again = rewrap_cli(site, "--pattern", "app:phi:s:*")
    assert again.returncode == 0, again.stdout + again.stderr
    counts = site.trail()[-1]["counts"]
    assert (counts["rewrapped"], counts["current"], counts["keys"]) == (0, STRINGS, STRINGS)
    assert site.trail()[-1]["pattern"] == "app:phi:s:*"
    assert site.verify() == 0


def test_unknown_key_id_is_counted(site: Site) -> None:
    stranger = Cipher({"k-gone": bytes(32)}, "k-gone")
    site.r.set("app:phi:1", stranger.encrypt(b"x", associated(STRING, b"app:phi:1")))
    counts = asyncio.run(rewrap(site.config))
    assert (counts.unknown_key, counts.rewrapped) == (1, 0)


def test_a_write_between_read_and_exec_wins_and_is_not_lost(site: Site) -> None:
    """The deterministic race: every key is written (under the new key, as the proxy would
    after the SIGHUP) right after rewrap read it; EXEC aborts, rewrap reads it again."""
    seed(site)
    r, new = site.r, site.new
    raced: list[bytes] = []

    async def concurrent_write(key: bytes) -> None:
        if key in raced:
            return
        raced.append(key)
        kind = r.type(key)
        if kind == b"string":
            r.set(key, new.encrypt(b"newer " + key, associated(STRING, key)), keepttl=True)
        elif kind == b"hash":
            r.hset(key, b"f0", new.encrypt(b"newer", associated(HASH, key, b"f0")))
        elif kind == b"list":
            r.lset(key, 0, new.encrypt(b"newer", associated(LIST, site.binding)))
        else:
            r.xadd(key, {b"a": new.encrypt(b"newer", associated(STREAM, key, b"a"))}, id="9-1")

    counts = asyncio.run(rewrap(site.config, after_read=concurrent_write))
    assert counts.retries == len(raced) == STRINGS + 3  # strings, hash, list, stream
    assert counts.busy == 0
    for i in range(STRINGS):
        key = f"app:phi:s:{i}".encode()
        assert new.decrypt(r.get(key), associated(STRING, key)) == b"newer " + key
    hash_key = b"app:notes:h"
    assert new.decrypt(r.hget(hash_key, b"f0"), associated(HASH, hash_key, b"f0")) == b"newer"
    assert new.decrypt(r.hget(hash_key, b"f1"), associated(HASH, hash_key, b"f1")) == b"note 1"
    assert new.decrypt(r.lindex(b"app:phi:l", 0), associated(LIST, site.binding)) == b"newer"
    entries = r.xrange(b"app:phi:x")
    assert [e[0] for e in entries] == [b"1-1", b"2-1", b"3-1", b"9-1"]
    assert all(key_id_of(v) == new.primary for _, fields in entries for v in fields.values())


def test_concurrent_writer_thread_loses_nothing(site: Site) -> None:
    """A real client thread writes the keys (under the new key, as a reloaded proxy would)
    while rewrap runs; rounds until some of its writes landed between a batch's read and
    its EXEC (counted as retries), and no round may lose one."""
    r, old, new = site.r, site.old, site.new
    keys = [f"app:phi:c:{i}".encode() for i in range(3000)]
    retried = 0
    for round_ in range(5):
        pipe = r.pipeline(transaction=False)
        for i, key in enumerate(keys):
            pipe.set(key, old.encrypt(b"seed %d" % i, associated(STRING, key)))
        pipe.execute()
        last: dict[bytes, bytes] = {}
        stop = threading.Event()

        def writer(seed: int = round_, stop: threading.Event = stop,
                   last: dict[bytes, bytes] = last) -> None:
            rnd, n = random.Random(seed), 0
            while not stop.is_set():
                key = keys[rnd.randrange(len(keys))]
                value = b"w%d-%d" % (seed, n)
                r.set(key, new.encrypt(value, associated(STRING, key)))
                last[key] = value
                n += 1

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            counts = asyncio.run(rewrap(site.config))
        finally:
            stop.set()
            thread.join(10)
        assert counts.busy == 0 and counts.undecryptable == 0
        for i, key in enumerate(keys):
            value = r.get(key)
            assert key_id_of(value) == new.primary, key
            assert new.decrypt(value, associated(STRING, key)) == last.get(key, b"seed %d" % i)
        retried += counts.retries
        if retried:
            break
    assert retried, "the writer never hit a batch between its read and its EXEC"


def test_while_the_proxy_runs_the_record_goes_to_the_companion_trail(
        site: Site, pki: PKI) -> None:
    seed(site)
    port = site.config.listener.port
    proxy = start_proxy(site.config_path, pki, port)
    try:
        main_before = (site.config_path.parent / "audit.jsonl").read_bytes()
        done = rewrap_cli(site)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "audit.keys.jsonl" in done.stdout and "a running phiproxy holds" in done.stdout
        assert (site.config_path.parent / "audit.jsonl").read_bytes()[:len(main_before)] \
            == main_before
        [record] = site.trail("audit.keys.jsonl")
        assert record["event"] == "rewrap" and record["counts"]["rewrapped"] > STRINGS
        assert site.verify("audit.keys.jsonl") == 0
    finally:
        assert proxy.stop() == 0
    check_rewrapped(site)
    assert site.verify() == 0  # the proxy's own trail is whole


def test_without_an_encrypt_rule_there_is_nothing_to_rewrap(
        pki: PKI, backend: RedisServer, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = write_proxy_config(pki, tmp_path, backend.port, free_port(),
                              extra='[[protect]]\nkeys = ["a:*"]\nmax_ttl_s = 10\n')
    assert main(["keys", "rewrap", "-c", str(path)]) == 2
    assert "no [[protect]] rule has encrypt = true" in capsys.readouterr().err


def test_unreachable_backend_is_a_clear_error(site: Site, backend: RedisServer) -> None:
    backend.stop()
    done = rewrap_cli(site)
    assert done.returncode == 2
    assert "[backend] rewrap stopped: cannot connect" in done.stderr
    assert site.trail()[-1]["reason"].startswith("stopped: cannot connect")


def test_sighup_reloads_the_keyring_and_the_rules(pki: PKI, backend: RedisServer,
                                                  tmp_path: Path) -> None:
    from tests.integration.test_reload import hup_and_wait, trail

    workdir = tmp_path / "proxy"
    workdir.mkdir()
    keyring = workdir / "keyring.json"
    first = create_keyring(keyring)
    port = free_port()
    config = write_proxy_config(pki, workdir, backend.port, port, extra=PROTECT)
    proxy = start_proxy(config, pki, port)
    try:
        second, _ = add_key(keyring)
        config.write_text(config.read_text() + '\n[[protect]]\nkeys = ["tmp:*"]\n'
                                               "max_ttl_s = 60\n")
        hup_and_wait(proxy, "reload done")
        record = [r for r in trail(proxy) if r["event"] == "reload"][-1]
        assert record["ok"] is True
        assert f"keyring reloaded from {keyring}: primary {second} (was {first}), 2 keys" \
            in record["reason"]
        assert "[[protect]] rules: 2 -> 3" in record["reason"]

        keyring.chmod(0o644)  # a keyring others can read is refused, the old one kept
        hup_and_wait(proxy, "reload refused")
        record = [r for r in trail(proxy) if r["event"] == "reload"][-1]
        assert record["ok"] is False
        assert "[encryption] keyring" in record["reason"] and "chmod 600" in record["reason"]
        assert proxy.client().ping()
    finally:
        assert proxy.stop() == 0
    key_material = json.loads(keyring.read_text())["keys"][second]
    assert key_material not in proxy.stderr()
    assert key_material not in (workdir / "audit.jsonl").read_text()


def test_values_written_through_the_proxy_read_back_after_rotation_and_rewrap(
        pki: PKI, backend: RedisServer, tmp_path: Path) -> None:
    """The proxy's own encryption and rewrap agree on every binding (string, hash field,
    list rule, stream field): written through the proxy under the old key, rewrapped while
    it runs, read back through it in plaintext."""
    from tests.integration.test_reload import hup_and_wait

    workdir = tmp_path / "proxy"
    workdir.mkdir()
    keyring = workdir / "keyring.json"
    first = create_keyring(keyring)
    port = free_port()
    config = write_proxy_config(pki, workdir, backend.port, port, extra=PROTECT)
    proxy = start_proxy(config, pki, port)
    direct = backend.client()
    try:
        c = proxy.client()
        c.set("app:phi:s", "patient one", ex=500)
        c.hset("app:notes:h", mapping={"dx": "flu", "rx": "rest"})
        c.rpush("app:phi:l", "a", "b")
        c.xadd("app:phi:x", {"event": "admitted"}, id="5-1")
        assert key_id_of(direct.get("app:phi:s")) == first
        second, _ = add_key(keyring)
        hup_and_wait(proxy, "reload done")
        done = subprocess.run([sys.executable, "-m", "proxy", "keys", "rewrap", "-c",
                               str(config)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "rewrapped 6 values in 4 keys" in done.stdout
        assert key_id_of(direct.get("app:phi:s")) == second
        assert {key_id_of(v) for v in direct.hvals("app:notes:h")} == {second}
        assert {key_id_of(v) for v in direct.lrange("app:phi:l", 0, -1)} == {second}
        assert c.get("app:phi:s") == b"patient one" and 400 < c.ttl("app:phi:s") <= 500
        assert c.hgetall("app:notes:h") == {b"dx": b"flu", b"rx": b"rest"}
        assert c.lrange("app:phi:l", 0, -1) == [b"a", b"b"]
        assert c.xrange("app:phi:x") == [(b"5-1", {b"event": b"admitted"})]
    finally:
        assert proxy.stop() == 0
