"""[audit] fsync through the running proxy (in-process, real redis-server as the backend).

`always`: os.fdatasync is wrapped. At every fdatasync of the trail on the event loop, the
records written since the previous one (the batch being committed) are read back and,
after a pause that gives Redis time to run anything already sent to it, the backend is
asked whether any of their keys exists. Every client SET writes a fresh key, so a key
that exists there means a command reached Redis before its record was on disk: if the
fsync moved after the release to the backend, this test fails.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from proxy.server import ServerState, serve
from proxy.startup import load_everything
from tests.helpers import PKI, RedisServer, free_port, run_concurrently, write_proxy_config

PAUSE_S = 0.02  # inside the fsync: long enough for Redis to run what it was already sent


@dataclass
class Trail:
    path: Path
    synced: int = 0  # bytes of the trail known to be on disk
    calls: list[tuple[str, int, float]] = field(default_factory=list)  # thread, size, time
    committed: set[str] = field(default_factory=set)  # keys whose records were synced
    early: list[tuple[list[str], int]] = field(default_factory=list)  # violations
    fail: int = 0  # fail the next n fdatasyncs of the trail with EIO


def command_keys(data: bytes) -> list[str]:
    keys = []
    for line in data.splitlines():
        record = json.loads(line)
        if record["event"] == "command":
            keys.extend(record["keys"])
    return keys


@pytest.fixture()
def watched(backend: RedisServer, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Trail]:
    trail = Trail(tmp_path / "p" / "audit.jsonl")
    probe = backend.client()
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") != str(trail.path):
            return real(fd)
        size = os.fstat(fd).st_size
        thread = threading.current_thread().name
        trail.calls.append((thread, size, time.monotonic()))
        if threading.current_thread() is threading.main_thread():  # the event loop
            with open(trail.path, "rb") as f:
                f.seek(trail.synced)
                keys = command_keys(f.read(size - trail.synced))
            if keys:
                time.sleep(PAUSE_S)
                ran = probe.exists(*keys)
                if ran:
                    trail.early.append((keys, ran))
        if trail.fail:
            trail.fail -= 1
            raise OSError(errno.EIO, "Input/output error")
        real(fd)
        trail.synced = size
        with open(trail.path, "rb") as f:
            trail.committed.update(command_keys(f.read(size)))
        return None

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    yield trail
    probe.close()


async def run_proxy(pki: PKI, backend: RedisServer, workdir: Path, mode: str,
                    work: Callable[[dict], None]) -> None:
    """Serve in this process (this loop) while `work(client_kwargs)` runs in a thread."""
    port = free_port()
    config_path = write_proxy_config(pki, workdir, backend.port, port,
                                     audit=f'fsync = "{mode}"')
    config, decide, roles = load_everything(config_path)
    state = ServerState(config, decide, roles)
    ready = asyncio.Event()
    server = asyncio.create_task(serve(state, ready=ready.set))
    await asyncio.wait_for(ready.wait(), 15)
    cert, key = pki.clients["app-writer"]
    kwargs = {"host": "127.0.0.1", "port": port, "socket_timeout": 10, "ssl": True,
              "ssl_ca_certs": str(pki.path("clients-ca.pem")), "ssl_certfile": str(cert),
              "ssl_keyfile": str(key)}
    try:
        await asyncio.to_thread(work, kwargs)
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # serve() handles it: drain, stop record, close
        assert await asyncio.wait_for(server, 30) == 0


def clients(kwargs: dict, tag: str, count: int = 4, singles: int = 15,
            pipelined: int = 20) -> None:
    """Concurrent clients: single SETs and a pipeline each, every key fresh."""
    def one(n: int) -> None:
        client = redis.Redis(**kwargs)
        for i in range(singles):
            assert client.set(f"app:phi:{tag}:{n}:{i}", "v")
        pipe = client.pipeline(transaction=False)
        for i in range(pipelined):
            pipe.set(f"app:phi:{tag}:{n}:p{i}", "v")
        assert all(pipe.execute())
        client.close()

    run_concurrently(count, one)


async def test_always_no_command_reaches_redis_before_its_record_is_on_disk(
        pki: PKI, backend: RedisServer, tmp_path: Path, watched: Trail) -> None:
    await run_proxy(pki, backend, tmp_path / "p", "always",
                    lambda kwargs: clients(kwargs, "always"))
    ran = {key.decode() for key in backend.client().scan_iter("app:phi:always:*")}
    assert len(ran) == 4 * (15 + 20)
    loop_syncs = [c for c in watched.calls if c[0] == "MainThread"]
    assert watched.early == []  # no key existed in Redis while its record was unsynced
    assert ran <= watched.committed  # every command that ran had its record synced
    # group commit: one fsync served many records (each pipeline came in one read)
    assert len(loop_syncs) < len(ran)
    assert not any(c[0] == "audit-fsync" for c in watched.calls)  # no background thread


async def test_everysec_syncs_about_once_a_second_off_the_loop(
        pki: PKI, backend: RedisServer, tmp_path: Path, watched: Trail) -> None:
    marks: dict[str, float] = {}

    def work(kwargs: dict) -> None:
        marks["first"] = time.monotonic()
        clients(kwargs, "everysec", count=2, singles=40, pipelined=10)
        marks["last"] = time.monotonic()
        size = watched.path.stat().st_size
        deadline = marks["last"] + 2.5
        while time.monotonic() < deadline and watched.synced < size:
            time.sleep(0.05)
        marks["synced"] = time.monotonic()

    await run_proxy(pki, backend, tmp_path / "p", "everysec", work)
    serving = [c for c in watched.calls if c[2] <= marks["synced"]]
    assert serving and all(c[0] == "audit-fsync" for c in serving)  # never on the loop
    assert marks["synced"] - marks["last"] < 2.0  # the last writes were on disk within ~1 s
    assert len(serving) <= marks["synced"] - marks["first"] + 2  # per second, not per write
    assert len(watched.committed) >= 2 * 50


async def test_no_never_syncs(pki: PKI, backend: RedisServer, tmp_path: Path,
                              watched: Trail) -> None:
    await run_proxy(pki, backend, tmp_path / "p", "no",
                    lambda kwargs: clients(kwargs, "no", count=2, singles=10, pipelined=5))
    assert watched.calls == []
    assert len(command_keys(watched.path.read_bytes())) == 2 * 15


async def test_always_a_failed_fsync_refuses_the_iterations_commands(
        pki: PKI, backend: RedisServer, tmp_path: Path, watched: Trail) -> None:
    answers: list[object] = []

    def work(kwargs: dict) -> None:
        client = redis.Redis(**kwargs)
        answers.append(client.set("app:phi:fs:before", "v"))
        watched.fail = 1
        with pytest.raises(redis.exceptions.ResponseError, match="audit unavailable"):
            client.set("app:phi:fs:refused", "v")
        answers.append(client.set("app:phi:fs:after", "v"))  # the disk is back
        client.close()

    await run_proxy(pki, backend, tmp_path / "p", "always", work)
    direct = backend.client()
    assert answers == [True, True]
    assert direct.exists("app:phi:fs:before", "app:phi:fs:after") == 2
    assert not direct.exists("app:phi:fs:refused")  # never forwarded
    keys = command_keys(watched.path.read_bytes())
    assert "app:phi:fs:refused" not in keys  # and cut back off the trail
    checked = subprocess.run(
        [sys.executable, "-m", "proxy", "audit", "verify", str(watched.path),
         "--key-file", str(watched.path.parent / "audit.key")],
        capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
