"""`phiproxy keys rewrap`: move every stored protected value to the primary key, online.

Connects to the backend as the proxy does (same TLS files and AUTH), SCANs every database
for the keys of each `[[protect]]` rule with `encrypt = true` (MATCH, COUNT 1000), and per
key, under WATCH so that a concurrent write is never lost:

- string: GET, re-encrypt, `SET key value KEEPTTL`;
- hash: HGETALL, `HSET key field value ...` for the fields that need it (per-field TTLs of
  Redis 7.4+ are read first and put back: HSET drops them);
- list: LRANGE, `LSET key index value` for each element that needs it;
- stream without consumer groups: rebuilt with the same entry ids (DEL, XADD id ...,
  XSETID with the stream's last id and counters, PEXPIRE with its TTL); a stream with
  consumer groups cannot be rebuilt without losing their pending entries: counted and left.

Keys go in batches of up to BATCH: all read under one WATCH, all written in one MULTI/EXEC
(three round trips per batch, not per key). If EXEC is aborted (a client wrote one of them
after WATCH, through the proxy), each key of the batch is read again and done on its own,
retried until its EXEC goes through: the concurrent write wins and is then rewrapped or,
being under the primary already, left. Values already
under the primary are counted and left; values that do not decrypt (written before
protection was enabled, changed, or under a key id the keyring no longer has) are counted
and left as they are, and the run exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any, TextIO

import hiredis

from proxy.config import BackendConfig, Config
from proxy.protect.crypto import (
    HASH,
    LIST,
    STREAM,
    STRING,
    Cipher,
    NotCiphertext,
    Tampered,
    UnknownKey,
    associated,
    key_id_of,
)
from proxy.protect.rules import Protection, ProtectRule
from proxy.resp.request import encode_command

SCAN_COUNT = b"1000"
MAX_ATTEMPTS = 100  # a key rewritten this often during one rewrap is left, and reported
BATCH = 100  # keys read under one WATCH and written in one MULTI/EXEC
COMMAND_TIMEOUT_S = 60.0


class RewrapError(Exception):
    """The backend cannot be used for a rewrap (connection, AUTH, an unexpected reply)."""


@dataclass
class Counts:
    """What one run did (the `rewrap` audit record carries them, with these names)."""

    keys: int = 0  # keys under an encrypt rule that were read
    keys_changed: int = 0  # keys with at least one value rewrapped
    rewrapped: int = 0  # values moved to the primary (dry run: that would be)
    current: int = 0  # values already under the primary
    not_ciphertext: int = 0  # plaintext, e.g. written before protection was enabled
    tampered: int = 0  # does not verify here (changed, or copied from another key)
    unknown_key: int = 0  # names a key id the keyring does not have
    streams_with_groups: int = 0  # left: their old key must stay in the keyring
    stream_values_left: int = 0  # values under old keys in those streams
    other_types: int = 0  # sets, sorted sets, ...: no values the proxy encrypts
    retries: int = 0  # EXECs aborted by a concurrent write, then read again
    busy: int = 0  # keys left after MAX_ATTEMPTS aborted EXECs

    @property
    def undecryptable(self) -> int:
        return self.not_ciphertext + self.tampered + self.unknown_key

    def add(self, other: Counts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Backend:
    """A minimal RESP2 client over the proxy's own backend settings (one connection)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = hiredis.Reader()

    @classmethod
    async def connect(cls, cfg: BackendConfig) -> Backend:
        from proxy.backend import auth_command
        from proxy.config import backend_node
        from proxy.tls import backend_context

        if cfg.mode == "sentinel":  # the primary the sentinels name now
            from proxy.backend import BackendUnavailable
            from proxy.backend.sentinel import resolve_primary

            try:
                cfg = await resolve_primary(cfg, backend_context(cfg))
            except BackendUnavailable as exc:
                raise RewrapError(f"cannot find the primary: {exc}") from None
        node = backend_node(cfg)
        if cfg.mode != "standalone":
            raise RewrapError(f'mode = "{cfg.mode}" is not supported by keys rewrap yet; point '
                              "a copy of the configuration at the primary (standalone) and "
                              "run it with that")
        try:
            if cfg.unix_socket is not None:
                opening = asyncio.open_unix_connection(str(cfg.unix_socket))
            else:
                ctx = backend_context(cfg)
                opening = asyncio.open_connection(
                    cfg.address, cfg.port, ssl=ctx,
                    server_hostname=cfg.server_name if ctx is not None else None)
            reader, writer = await asyncio.wait_for(opening, cfg.connect_timeout_s)
        except (OSError, TimeoutError) as exc:
            raise RewrapError(f"cannot connect to {node}: {exc or type(exc).__name__}") \
                from None
        backend = cls(reader, writer)
        auth = auth_command(cfg)
        if auth is not None:
            reply = (await backend._send([auth]))[0]
            if reply != b"OK":  # Redis's error text never contains the password
                backend.close()
                raise RewrapError(f"{node} refused the proxy's AUTH: {reply}")
        return backend

    async def _send(self, commands: list[bytes]) -> list[Any]:
        self._writer.write(b"".join(commands))
        replies: list[Any] = []
        while len(replies) < len(commands):
            reply = self._parser.gets()
            if reply is False:
                data = await asyncio.wait_for(self._reader.read(1 << 16), COMMAND_TIMEOUT_S)
                if not data:
                    raise RewrapError("the backend closed the connection")
                self._parser.feed(data)
                continue
            replies.append(reply)
        return replies

    async def pipeline(self, *commands: list[bytes]) -> list[Any]:
        """Replies in order; error replies are hiredis.ReplyError objects, not raised."""
        return await self._send([encode_command(argv) for argv in commands])

    async def call(self, *argv: bytes) -> Any:
        reply = (await self.pipeline(list(argv)))[0]
        if isinstance(reply, hiredis.ReplyError):
            raise RewrapError(f"{argv[0].decode(errors='replace')} failed: {reply}")
        return reply

    async def transaction(self, *commands: list[bytes]) -> bool:
        """MULTI commands EXEC on a WATCHed key: False if EXEC was aborted."""
        replies = await self.pipeline([b"MULTI"], *commands, [b"EXEC"])
        for argv, reply in zip(commands, replies[1:-1], strict=True):
            if isinstance(reply, hiredis.ReplyError):  # queueing refused: EXEC is discarded
                raise RewrapError(f"{argv[0].decode()} refused: {reply}")
        result = replies[-1]
        if isinstance(result, hiredis.ReplyError):
            raise RewrapError(f"EXEC failed: {result}")
        if result is None:
            return False
        for argv, reply in zip(commands, result, strict=True):
            if isinstance(reply, hiredis.ReplyError):
                raise RewrapError(f"{argv[0].decode()} failed inside MULTI: {reply}")
        return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()


def _pairs(flat: list[Any]) -> list[tuple[bytes, bytes]]:
    return list(zip(flat[0::2], flat[1::2], strict=True))


class Rewrap:
    """One run over the backend. `after_read` (tests) runs between a key's read and its
    MULTI/EXEC: where a concurrent write would land."""

    def __init__(self, backend: Backend, cipher: Cipher, protection: Protection, *,
                 dry_run: bool = False, pattern: str | None = None,
                 progress: Callable[[Counts, int], None] | None = None,
                 after_read: Callable[[bytes], Awaitable[None]] | None = None) -> None:
        self.backend = backend
        self.cipher = cipher
        self.protection = protection
        self.dry_run = dry_run
        self.pattern = pattern
        self.counts = Counts()
        self.progress = progress
        self.after_read = after_read
        self.field_ttls = False  # Redis 7.4+: hash fields may have their own TTLs
        self.xsetid_counters = False  # Redis 7.0+: XSETID ENTRIESADDED / MAXDELETEDID
        from proxy.policy.glob import compile_glob

        self._planners: dict[str, Callable[..., list[list[bytes]]]] = {
            "string": self._string, "hash": self._hash, "list": self._list,
            "stream": self._stream}
        self._globs = {rule.index: [(k.encode(), compile_glob(k.encode())) for k in rule.keys]
                       for rule in protection.rules}

    async def run(self) -> Counts:
        version = await self._version()
        self.field_ttls = version >= (7, 4)
        self.xsetid_counters = version >= (7, 0)
        for db in await self._databases():
            await self.backend.call(b"SELECT", str(db).encode())
            for pattern, rule in self._scans():
                await self._scan(db, pattern, rule)
        return self.counts

    async def _version(self) -> tuple[int, ...]:
        info = (await self.backend.call(b"INFO", b"server")).decode(errors="replace")
        for line in info.splitlines():
            if line.startswith("redis_version:"):
                with contextlib.suppress(ValueError):
                    return tuple(int(x) for x in line.split(":", 1)[1].split(".")[:2])
        return (0, 0)

    async def _databases(self) -> list[int]:
        info = (await self.backend.call(b"INFO", b"keyspace")).decode(errors="replace")
        dbs = [int(line[2:line.index(":")]) for line in info.splitlines()
               if line.startswith("db") and ":" in line and line[2:line.index(":")].isdigit()]
        return sorted(dbs)

    def _scans(self) -> list[tuple[bytes, ProtectRule | None]]:
        """(MATCH pattern, the rule it belongs to) to scan; with --pattern, that one alone
        (each key found is then checked against the rules)."""
        if self.pattern is not None:
            return [(self.pattern.encode(), None)]
        return [(pattern.encode(), rule) for rule in self.protection.rules if rule.encrypt
                for pattern in rule.keys]

    async def _scan(self, db: int, pattern: bytes, scanned_for: ProtectRule | None) -> None:
        cursor = b"0"
        while True:
            cursor, keys = await self.backend.call(b"SCAN", cursor, b"MATCH", pattern,
                                                   b"COUNT", SCAN_COUNT)
            todo = []
            for key in keys:
                rule = self.protection.rule_for(key)
                if rule is None or not rule.encrypt:
                    continue  # an earlier rule without encryption decides (first match wins)
                if scanned_for is not None and (rule is not scanned_for
                                                or self._first_pattern(rule, key) != pattern):
                    continue  # another scan of this run visits it: once per key
                todo.append((key, rule))
            for start in range(0, len(todo), BATCH):
                await self._batch(todo[start:start + BATCH])
                if self.progress is not None:
                    self.progress(self.counts, db)
            if cursor == b"0":
                return

    def _first_pattern(self, rule: ProtectRule, key: bytes) -> bytes:
        return next((pattern for pattern, match in self._globs[rule.index] if match(key)), b"")

    async def _batch(self, items: list[tuple[bytes, ProtectRule]]) -> None:
        """Every key of the batch read under one WATCH and written in one MULTI/EXEC (three
        round trips for up to BATCH keys); if a client wrote any of them meanwhile, each key
        of the batch is done again on its own."""
        aborted = await self._attempt(items)
        if aborted is None:
            return
        self.counts.retries += aborted
        for item in items:
            await self._key(*item)

    async def _key(self, key: bytes, rule: ProtectRule) -> None:
        for _ in range(MAX_ATTEMPTS):
            aborted = await self._attempt([(key, rule)])
            if aborted is None:
                return
            self.counts.retries += aborted
        self.counts.busy += 1

    async def _attempt(self, items: list[tuple[bytes, ProtectRule]]) -> int | None:
        """One try: None when done (counted), else how many keys had writes aborted."""
        keys = [key for key, _ in items]
        replies = await self.backend.pipeline([b"WATCH", *keys], *[[b"TYPE", k] for k in keys])
        _check(replies, "WATCH/TYPE")
        kinds = [kind.decode() for kind in replies[1:]]
        reads = [self._reads(kind, key) for key, kind in zip(keys, kinds, strict=True)]
        flat = [argv for argvs in reads for argv in argvs]
        replies = await self.backend.pipeline(*flat) if flat else []
        if any(isinstance(r, hiredis.ReplyError) and str(r).startswith("WRONGTYPE")
               for r in replies):
            await self.backend.call(b"UNWATCH")  # its type changed after TYPE: read again
            return len(items)
        _check(replies, "read")
        counts, writes, changed = Counts(), [], 0
        pos = 0
        for (key, rule), kind, argvs in zip(items, kinds, reads, strict=True):
            got = replies[pos:pos + len(argvs)]
            pos += len(argvs)
            if kind == "none":  # deleted since SCAN found it
                continue
            counts.keys += 1
            planner = self._planners.get(kind)
            if planner is None:
                counts.other_types += 1
                continue
            key_counts = Counts()
            key_writes = planner(key, rule, got, key_counts)
            if key_writes and self.after_read is not None:
                await self.after_read(key)
            counts.add(key_counts)
            counts.keys_changed += int(bool(key_writes))
            changed += int(bool(key_writes))
            writes += key_writes
        if writes and self.field_ttls:
            writes += await self._field_ttls(writes)
        if not writes or self.dry_run:
            await self.backend.call(b"UNWATCH")
        elif not await self.backend.transaction(*writes):
            return changed
        self.counts.add(counts)
        return None

    @staticmethod
    def _reads(kind: str, key: bytes) -> list[list[bytes]]:
        if kind == "string":
            return [[b"GET", key]]
        if kind == "hash":
            return [[b"HGETALL", key]]
        if kind == "list":
            return [[b"LRANGE", key, b"0", b"-1"]]
        if kind == "stream":
            return [[b"XINFO", b"GROUPS", key], [b"XRANGE", key, b"-", b"+"],
                    [b"XINFO", b"STREAM", key], [b"PTTL", key]]
        return []

    def _value(self, value: bytes, ad: bytes, counts: Counts) -> bytes | None:
        """The value re-encrypted under the primary, or None to leave it (counted)."""
        try:
            plaintext = self.cipher.decrypt(value, ad)
        except NotCiphertext:
            counts.not_ciphertext += 1
            return None
        except UnknownKey:
            counts.unknown_key += 1
            return None
        except Tampered:
            counts.tampered += 1
            return None
        if key_id_of(value) == self.cipher.primary:
            counts.current += 1
            return None
        counts.rewrapped += 1
        return self.cipher.encrypt(plaintext, ad)

    def _string(self, key: bytes, rule: ProtectRule, got: list[Any],
                counts: Counts) -> list[list[bytes]]:
        [value] = got
        if value is None:
            return []
        new = self._value(value, associated(STRING, key), counts)
        return [] if new is None else [[b"SET", key, new, b"KEEPTTL"]]

    def _hash(self, key: bytes, rule: ProtectRule, got: list[Any],
              counts: Counts) -> list[list[bytes]]:
        changed: list[bytes] = []
        for field, value in _pairs(got[0]):
            new = self._value(value, associated(HASH, key, field), counts)
            if new is not None:
                changed += [field, new]
        return [[b"HSET", key, *changed]] if changed else []

    async def _field_ttls(self, writes: list[list[bytes]]) -> list[list[bytes]]:
        """Redis 7.4+: HSET drops a field's own TTL; read them (under the same WATCH) and
        put them back after the HSETs."""
        hsets = [argv for argv in writes if argv[0] == b"HSET"]
        if not hsets:
            return []
        asks = [[b"HPTTL", argv[1], b"FIELDS", str(len(argv[2::2])).encode(), *argv[2::2]]
                for argv in hsets]
        replies = await self.backend.pipeline(*asks)
        _check(replies, "HPTTL")
        return [[b"HPEXPIRE", argv[1], str(ms).encode(), b"FIELDS", b"1", name]
                for argv, ttls in zip(hsets, replies, strict=True)
                for name, ms in zip(argv[2::2], ttls, strict=True) if ms > 0]

    def _list(self, key: bytes, rule: ProtectRule, got: list[Any],
              counts: Counts) -> list[list[bytes]]:
        ad = associated(LIST, rule.list_binding)
        writes = []
        for index, value in enumerate(got[0]):
            new = self._value(value, ad, counts)
            if new is not None:
                writes.append([b"LSET", key, str(index).encode(), new])
        return writes

    def _stream(self, key: bytes, rule: ProtectRule, got: list[Any],
                counts: Counts) -> list[list[bytes]]:
        groups, entries, info_flat, ttl_ms = got
        adds = []
        for entry_id, flat in entries:
            argv = [b"XADD", key, entry_id]
            for field, value in _pairs(flat):
                new = self._value(value, associated(STREAM, key, field), counts)
                argv += [field, value if new is None else new]
            adds.append(argv)
        if not counts.rewrapped:
            return []
        if groups:  # their pending entries and positions would not survive a rebuild
            counts.streams_with_groups = 1
            counts.stream_values_left, counts.rewrapped = counts.rewrapped, 0
            return []
        info = dict(_pairs(info_flat))
        setid = [b"XSETID", key, info[b"last-generated-id"]]
        if self.xsetid_counters:
            setid += [b"ENTRIESADDED", str(info[b"entries-added"]).encode(),
                      b"MAXDELETEDID", info[b"max-deleted-entry-id"]]
        writes = [[b"DEL", key], *adds, setid]
        if ttl_ms > 0:
            writes.append([b"PEXPIRE", key, str(ttl_ms).encode()])
        return writes


def _check(replies: list[Any], what: str) -> None:
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise RewrapError(f"{what} failed: {reply}")


class Progress:
    """A one-line counter on a terminal (stderr), at most five times a second."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._last = 0.0
        self.shown = False

    def __call__(self, counts: Counts, db: int) -> None:
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        self.shown = True
        self.stream.write(f"\rrewrap: db {db}: {counts.keys} keys, {counts.rewrapped} values "
                          f"rewrapped, {counts.current} current, {counts.undecryptable} "
                          "undecryptable ")
        self.stream.flush()

    def done(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


async def rewrap(config: Config, *, dry_run: bool = False, pattern: str | None = None,
                 progress: Callable[[Counts, int], None] | None = None,
                 after_read: Callable[[bytes], Awaitable[None]] | None = None) -> Counts:
    """One run against the configured backend; RewrapError if it cannot be used."""
    cipher = config.encryption.cipher
    assert cipher is not None, "load_config refuses encrypt = true without a keyring"
    backend = await Backend.connect(config.backend)
    try:
        return await Rewrap(backend, cipher, config.protection, dry_run=dry_run,
                            pattern=pattern, progress=progress, after_read=after_read).run()
    finally:
        backend.close()


def default_progress() -> Progress | None:
    return Progress(sys.stderr) if sys.stderr.isatty() else None
