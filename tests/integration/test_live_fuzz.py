"""A live fuzzer against a running proxy in front of a real redis-server.

20 clients send malformed, truncated and oversized frames (seeded mutations of valid RESP,
huge and negative lengths, `*\\x00`, `$\\x00`, nested arrays, bad inline lines, ...), one
payload per TLS record, while a checker client SETs and GETs its own keys in pipelines.

Each fuzz payload's outcome is known in advance from the reference parser
(tests/fuzz/reference.py) and the role's policy: a payload the framer refuses is answered
with one `-ERR Protocol error` and none of its commands run (the proxy drops the whole
read); otherwise every complete command gets its reply, in order (ECHO its argument,
STRLEN 0, refusals an error). Afterwards:
- the proxy is up and serves a new client;
- the checker saw exactly its own data, in order (no desync);
- the backend's commandstats grew by exactly the commands that should have reached it
  (the checker's SET/GET, the fuzzers' allowed ECHO/STRLEN) plus connection housekeeping,
  and its errorstats by exactly the arity errors of those: nothing malformed, nothing
  unexpected reached Redis.
"""

from __future__ import annotations

import random
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import hiredis
import pytest
import redis

from proxy.commands.table import default_table
from proxy.config import RoleConfig
from proxy.policy.engine import compile_roles, decide
from proxy.resp.request import LimitExceeded, ProtocolError, RequestFramer, encode_command
from tests.fuzz.mutate import mutate
from tests.fuzz.reference import Limits, frame_requests
from tests.helpers import (
    DEFAULT_IDENTITIES,
    DEFAULT_ROLES,
    PKI,
    Proxy,
    RedisServer,
    free_port,
    start_proxy,
    write_proxy_config,
)

FUZZERS = 20
PAYLOADS_PER_FUZZER = 60
FUZZ_ACL = "+echo +strlen ~fuzz:*"
LIMITS = Limits(max_bulk_bytes=4096, max_query_buffer_bytes=16384, max_args=64,
                max_inline_bytes=1024)
# Commands the session handles itself (connection state, QUIT, ...): a mutation that
# happens to spell one is skipped, so every expected reply is one reply.
SESSION_COMMANDS = {b"auth", b"hello", b"select", b"subscribe", b"psubscribe", b"ssubscribe",
                    b"unsubscribe", b"punsubscribe", b"sunsubscribe", b"multi", b"exec",
                    b"discard", b"watch", b"unwatch", b"reset", b"quit", b"client",
                    b"monitor", b"wait", b"waitaof", b"ping"}
# What the proxy's own connections and the inspecting client may add to commandstats.
HOUSEKEEPING = {"auth", "hello", "ping", "select", "reset", "info", "command", "readonly",
                "client|setname", "client|setinfo", "client|id", "client|info",
                "command|docs", "command|info", "command|count", "command|list"}

ROLES = DEFAULT_ROLES + f"""
[roles.fuzzer]
acl = "{FUZZ_ACL}"

[limits]
max_bulk_bytes = {LIMITS.max_bulk_bytes}
max_query_buffer_bytes = {LIMITS.max_query_buffer_bytes}
max_args = {LIMITS.max_args}
max_inline_bytes = {LIMITS.max_inline_bytes}
"""
IDENTITIES = DEFAULT_IDENTITIES + """
[[identities]]
subject_cn = "nobody"
role = "fuzzer"
"""

_ROLE = compile_roles({"fuzzer": RoleConfig("fuzzer", FUZZ_ACL)}, default_table())["fuzzer"]


# ------------------------------------------------------------------ payloads


def _valid_command(rng: random.Random) -> list[bytes]:
    kind = rng.randrange(5)
    if kind == 0:
        return [b"ECHO", rng.randbytes(rng.randint(0, 40))]
    if kind == 1:
        return [b"ECHO", b"a\r\nb\r\n*1\r\n$4\r\nPING\r\n"]  # framing bytes inside a value
    if kind == 2:
        return [b"STRLEN", b"fuzz:%d" % rng.randrange(100)]
    if kind == 3:
        return [b"GET", b"chk:0"]  # refused: the fuzzer's role cannot read the checker's keys
    return [b"ECHO", b"x" * rng.choice((1, 100, 1000, 4000))]


def _valid(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(1, 8)):
        argv = _valid_command(rng)
        if rng.random() < 0.2 and all(a.isalnum() or a.replace(b":", b"").isalnum()
                                      for a in argv if a):
            parts.append(b" ".join(argv) + b"\r\n")  # inline
        else:
            parts.append(encode_command(argv))
    return b"".join(parts)


_HOSTILE = [
    b"*\x00\r\n", b"$\x00\r\n", b"*1\r\n$\x00\r\n", b"*-5\r\n*1\r\n$4\r\nECHO\r\n",
    b"*1\r\n$-5\r\n", b"*1\r\n$-1\r\n", b"*2\r\n*1\r\n$1\r\na\r\n$1\r\nb\r\n",
    b"*1\r\n$5000\r\n", b"*1\r\n$9223372036854775807\r\n", b"*1\r\n$99999999999999999999\r\n",
    b"*100000\r\n", b"*2147483648\r\n", b"*1\r\n$1\r\nab\r\n", b"*1\r\n$1\r\na\n\r",
    b"ECHO \"unbalanced\r\n", b"ECHO a\x00b\r\n", b"x" * 2000, b"x" * 2000 + b"\r\n",
    b"*1\r" + b"1" * 10, b"*1\r\n$" + b"9" * 70000, b"\r\n\r\n\n", b"*0\r\n*-1\r\n",
    b"*1\r\n$4000\r\n" + b"y" * 100,  # declared within the limit, never completed
    encode_command([b"ECHO"] + [b"x" * 4000] * 5),  # over max_query_buffer_bytes
    b"ECHO " + b"y" * 30000 + b"\r\n",  # an inline line over max_inline_bytes
]


def payloads(seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    pool = [_valid(rng) for _ in range(8)]
    while True:
        kind = rng.randrange(4)
        if kind == 0:
            yield _valid(rng)
        elif kind == 1:
            yield mutate(rng.choice(pool), rng, pool)
        elif kind == 2:
            data = _valid(rng)
            yield data[: rng.randint(0, len(data))]  # truncated
        else:
            yield rng.choice(_HOSTILE) if rng.random() < 0.7 else \
                _valid(rng) + rng.choice(_HOSTILE)


# ------------------------------------------------------------------ expectations


class Expected:
    """What the proxy must answer to one payload sent as one read on a clean connection."""

    def __init__(self, data: bytes):
        ref = frame_requests(data, LIMITS)
        self.error = ref.status == "error"
        if ref.status == "incomplete":
            # A partial command may be refused before it ends (a CR without LF, a limit):
            # the framer's contract (tests/fuzz checks it against the reference).
            try:
                RequestFramer(**LIMITS.kwargs()).feed(data)
            except (ProtocolError, LimitExceeded):
                self.error = True
        self.commands = [] if self.error else ref.commands
        self.clean = ref.status == "ok" and not self.error
        # Over one TLS record the proxy may get a payload in several reads, and a read
        # with a protocol error runs none of its commands: only payloads whose outcome
        # does not depend on that are sent big.
        self.any_size = not ref.commands
        self.kind = "refused" if self.error else "clean" if self.clean else "partial"

    def usable(self) -> bool:
        return not any(argv[0].lower() in SESSION_COMMANDS for argv in self.commands)

    def forwarded(self) -> Counter[str]:
        return Counter(argv[0].decode().lower() for argv in self.commands
                       if decide(_ROLE, argv).allowed)

    def check_replies(self, replies: list[object], where: str) -> None:
        if self.error:
            assert len(replies) == 1 and isinstance(replies[0], hiredis.ReplyError), where
            assert str(replies[0]).startswith("ERR Protocol error: "), (where, replies)
            return
        assert len(replies) == len(self.commands), (where, replies)
        for argv, reply in zip(self.commands, replies, strict=True):
            allowed = decide(_ROLE, argv).allowed
            name = argv[0].lower()
            if allowed and name == b"echo" and len(argv) == 2:
                assert reply == argv[1], (where, argv, reply)
            elif allowed and name == b"strlen" and len(argv) == 2:
                assert reply == 0, (where, argv, reply)
            else:
                assert isinstance(reply, hiredis.ReplyError), (where, argv, reply)

    @property
    def reply_count(self) -> int:
        return 1 if self.error else len(self.commands)


# ------------------------------------------------------------------ clients


def _read_replies(tls: ssl.SSLSocket, count: int, where: str) -> list[object]:
    reader = hiredis.Reader()
    replies: list[object] = []
    while len(replies) < count:
        try:
            chunk = tls.recv(65536)
        except TimeoutError:
            raise AssertionError(f"{where}: {len(replies)} of {count} replies in time") from None
        if not chunk:
            raise AssertionError(f"{where}: closed after {len(replies)} of {count} replies")
        reader.feed(chunk)
        while (item := reader.gets()) is not False:
            replies.append(item)
    return replies


def fuzz_client(proxy: Proxy, n: int, forwarded: Counter[str], lock: threading.Lock) -> None:
    ctx = proxy.ssl_context("nobody")
    source = payloads(1000 + n)
    sent = 0
    while sent < PAYLOADS_PER_FUZZER:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            # Payloads go out one TLS record each and wait for their replies: the proxy
            # frames each as one read. The connection is kept while they are clean.
            while sent < PAYLOADS_PER_FUZZER:
                data = next(source)
                expected = Expected(data)
                if not expected.usable() or (len(data) > 16000 and not expected.any_size):
                    continue
                sent += 1
                where = f"fuzzer {n} payload {sent} {data[:80]!r}"
                try:
                    tls.sendall(data)
                    replies = _read_replies(tls, expected.reply_count, where)
                except (ConnectionResetError, BrokenPipeError):
                    # Refused while still sending: the proxy may close before the rest
                    # arrives (then the reset can discard its error reply). Nothing ran.
                    assert expected.error and len(data) > 16000, where
                    break
                expected.check_replies(replies, where)
                with lock:
                    forwarded.update(expected.forwarded())
                    forwarded["payload " + expected.kind] += 1
                if not expected.clean:
                    break  # a refused or partial payload: a new connection for the next


def checker(proxy: Proxy, stop: threading.Event, counts: Counter[str]) -> None:
    client = proxy.client("app-writer")
    i = 0
    while not stop.is_set() or i < 200:
        pipe = client.pipeline(transaction=False)
        batch = range(i, i + 10)
        for k in batch:
            pipe.set(f"chk:{k}", f"value-{k}-" + "v" * (k % 50))
            pipe.get(f"chk:{k}")
        results = pipe.execute()
        expected = []
        for k in batch:
            expected += [True, (f"value-{k}-" + "v" * (k % 50)).encode()]
        assert results == expected, f"checker desync at {i}: {results[:4]}"
        counts["set"] += 10
        counts["get"] += 10
        i += 10


def _stats(direct: redis.Redis) -> tuple[dict[str, dict], dict[str, dict]]:
    # One connection for both snapshots: redis-py's connection setup (CLIENT SETINFO,
    # unknown to Redis 7.0) adds errors of its own.
    commands = {k.removeprefix("cmdstat_"): v for k, v in direct.info("commandstats").items()}
    errors = {k.removeprefix("errorstat_"): v for k, v in direct.info("errorstats").items()}
    return commands, errors


@pytest.fixture()
def fuzz_proxy(pki: PKI, backend: RedisServer, tmp_path: Path) -> Iterator[Proxy]:
    port = free_port()
    config = write_proxy_config(pki, tmp_path / "proxy", backend.port, port, roles=ROLES,
                                identities=IDENTITIES)
    proc = start_proxy(config, pki, port)
    yield proc
    proc.stop()


def test_live_fuzz_reaches_nothing_malformed(fuzz_proxy: Proxy, backend: RedisServer) -> None:
    proxy = fuzz_proxy
    assert proxy.client().ping()  # the proxy's backend connections are up before "before"
    time.sleep(0.5)
    direct = backend.client()  # the proxy's backend user over its own TLS client certificate
    before_cmd, before_err = _stats(direct)

    forwarded: Counter[str] = Counter()
    checked: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def guard(fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    check_thread = threading.Thread(target=guard, args=(checker, proxy, stop, checked))
    check_thread.start()
    fuzzers = [threading.Thread(target=guard, args=(fuzz_client, proxy, n, forwarded, lock))
               for n in range(FUZZERS)]
    started = time.monotonic()
    for t in fuzzers:
        t.start()
    for t in fuzzers:
        t.join(60)
    stop.set()
    check_thread.join(60)
    elapsed = time.monotonic() - started
    assert not errors, errors[:3]
    assert proxy.proc.poll() is None, "the proxy died"
    fresh = proxy.client("app-writer")
    assert fresh.set("chk:after", "1") and fresh.get("chk:after") == b"1"
    checked["set"] += 1
    checked["get"] += 1

    time.sleep(0.3)
    after_cmd, after_err = _stats(direct)
    direct.close()
    grew = {name: (after_cmd[name]["calls"] + after_cmd[name].get("rejected_calls", 0)
                   - before_cmd.get(name, {}).get("calls", 0)
                   - before_cmd.get(name, {}).get("rejected_calls", 0))
            for name in after_cmd}
    grew = {name: n for name, n in grew.items() if n}
    outcomes = {k: forwarded.pop(k) for k in list(forwarded) if k.startswith("payload ")}
    assert sum(outcomes.values()) == FUZZERS * PAYLOADS_PER_FUZZER
    # The mix stays a fuzz run: refused, partial and clean payloads, each plenty.
    assert min(outcomes.get(f"payload {k}", 0) for k in ("refused", "clean", "partial")) \
        >= FUZZERS * PAYLOADS_PER_FUZZER // 10, outcomes
    expected = Counter(checked) + forwarded
    for name in ("set", "get", "echo", "strlen"):
        assert grew.get(name, 0) == expected.get(name, 0), (name, grew, expected)
    unexpected = set(grew) - set(expected) - HOUSEKEEPING
    assert not unexpected, f"commands that should not have reached Redis: {unexpected}"
    # Every backend error is an arity error of a forwarded ECHO/STRLEN (Redis counts those
    # as rejected calls); a malformed frame or an unknown command would add others.
    rejected = sum(after_cmd[name].get("rejected_calls", 0)
                   - before_cmd.get(name, {}).get("rejected_calls", 0)
                   for name in after_cmd)
    failed = sum(after_cmd[name].get("failed_calls", 0)
                 - before_cmd.get(name, {}).get("failed_calls", 0) for name in after_cmd)
    err_grew = {name: after_err[name]["count"] - before_err.get(name, {}).get("count", 0)
                for name in after_err}
    err_grew = {k: v for k, v in err_grew.items() if v}
    assert sum(err_grew.values()) == rejected + failed, (err_grew, rejected, failed, grew)
    assert set(err_grew) <= {"ERR"}, err_grew
    assert elapsed < 30, f"the live fuzz took {elapsed:.1f} s"
    print(f"live fuzz: {FUZZERS} fuzzers x {PAYLOADS_PER_FUZZER} payloads in {elapsed:.1f} s; "
          f"{outcomes}; checker {checked['set']} SET + {checked['get']} GET; forwarded "
          f"{dict(forwarded)}; "
          f"backend errors {err_grew}")
