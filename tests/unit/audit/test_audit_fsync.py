"""[audit] fsync: no / everysec / always (group commit), the head never ahead of the disk."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from pathlib import Path

import pytest

from proxy.audit import files
from proxy.audit.chain import Mac, decode_head
from proxy.audit.verify import verify
from proxy.audit.writer import AuditWriter
from proxy.config import AuditConfig, ConfigError, load_config
from tests.unit.audit.test_audit_config import BASE, site  # noqa: F401 - the fixture

KEY = os.urandom(32)


class Syncs:
    """os.fdatasync wrapped: who synced which file, when, at what size; can be made to fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str, float]] = []  # (path, size, thread, time)
        self.fail = 0  # fail the next n calls with EIO
        self._real = os.fdatasync

    def __call__(self, fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        self.calls.append((path, os.fstat(fd).st_size, threading.current_thread().name,
                           time.monotonic()))
        if self.fail:
            self.fail -= 1
            raise OSError(errno.EIO, "Input/output error")
        self._real(fd)

    def of(self, path: Path) -> list[tuple[str, int, str, float]]:
        return [c for c in self.calls if c[0] == str(path)]


@pytest.fixture()
def syncs(monkeypatch: pytest.MonkeyPatch) -> Syncs:
    recorder = Syncs()
    monkeypatch.setattr(os, "fdatasync", recorder)
    return recorder


def writer_for(path: Path, fsync: str, **config: object) -> AuditWriter:
    writer = AuditWriter(AuditConfig(path=str(path), fsync=fsync, **config),  # type: ignore[arg-type]
                         key=KEY, check_interval_s=0)
    writer.open()
    return writer


def batch(writer: AuditWriter, n: int = 3, tag: str = "k") -> list[bytes]:
    conn = writer.records.connection(5, "127.0.0.1:1", None, "writer")
    return [conn.command("set", [f"app:phi:{tag}:{i}".encode()], 0) for i in range(n)]


def head_seq(path: Path) -> int:
    head = decode_head(Mac(KEY), Path(files.head_path(str(path))).read_bytes())
    assert head is not None
    return head.seq


# --- configuration -------------------------------------------------------------------
def config_with(site: Path, lines: str):  # noqa: F811 - site is the fixture
    cfg = site / "fsync.toml"
    cfg.write_text(BASE + lines + "\n")
    return load_config(cfg)


def test_default_is_everysec_and_each_mode_loads(site: Path) -> None:  # noqa: F811
    assert config_with(site, 'path = "audit.jsonl"').audit.fsync == "everysec"
    for mode in ("no", "everysec", "always"):
        assert config_with(site, f'path = "audit.jsonl"\nfsync = "{mode}"').audit.fsync == mode
    # stdout and syslog: nothing to sync, "no"/"everysec" accepted (and mean nothing)
    assert config_with(site, 'path = "-"\nfsync = "everysec"').audit.fsync == "everysec"


@pytest.mark.parametrize(("lines", "words"), [
    ('path = "audit.jsonl"\nfsync = "sometimes"', 'must be "no", "everysec" or "always"'),
    ('path = "audit.jsonl"\nfsync = true', "fsync"),
    ('path = "-"\nfsync = "always"', '"always" needs a file trail'),
    ('path = "syslog+tcp://127.0.0.1:6514"\nfsync = "always"', "collector"),
])
def test_mistakes_name_the_file_and_the_key(site: Path, lines: str, words: str) -> None:  # noqa: F811
    with pytest.raises(ConfigError) as info:
        config_with(site, lines)
    text = str(info.value)
    assert "fsync" in text and words in text and "fsync.toml" in text


# --- always ----------------------------------------------------------------------------
def test_always_one_fsync_per_write_ahead_covering_its_records(tmp_path: Path,
                                                               syncs: Syncs) -> None:
    path = tmp_path / "audit.jsonl"
    writer = writer_for(path, "always")
    syncs.calls.clear()
    assert writer.write_ahead(batch(writer, 5))
    trail = syncs.of(path)
    assert len(trail) == 1  # one call for all five records (group commit)
    assert trail[0][1] == path.stat().st_size  # and everything written was in it
    assert head_seq(path) == writer.seq  # no loop: the head follows the sync at once
    writer.close()


def test_always_failed_fsync_takes_the_batch_back(tmp_path: Path, syncs: Syncs) -> None:
    path = tmp_path / "audit.jsonl"
    writer = writer_for(path, "always")
    assert writer.write_ahead(batch(writer, 2, tag="before"))
    size, seq = path.stat().st_size, writer.seq
    syncs.fail = 1
    assert not writer.write_ahead(batch(writer, 4, tag="lost"))
    # cut back off the trail, the chain where it was, the failure counted and visible
    assert path.stat().st_size == size and writer.seq == seq
    assert writer.stats.fsync_failures == 1 and writer.stats.fsync_failing
    assert writer.stats.failures == 1 and head_seq(path) == seq
    assert b"lost" not in path.read_bytes()
    assert writer.write_ahead(batch(writer, 2, tag="after"))  # the disk is back
    assert not writer.stats.fsync_failing
    writer.close()
    assert verify([str(path)], KEY).records == seq + 2


async def test_always_records_outside_the_gate_sync_at_the_end_of_the_iteration(
        tmp_path: Path, syncs: Syncs) -> None:
    path = tmp_path / "audit.jsonl"
    writer = AuditWriter(AuditConfig(path=str(path), fsync="always"), key=KEY)
    writer.open(asyncio.get_running_loop())
    start = writer.seq
    syncs.calls.clear()
    assert writer.write_one(writer.records.start(version="t", pid=1))
    assert syncs.of(path) == [] and head_seq(path) == start  # not yet on disk: head behind
    await asyncio.sleep(0)
    assert len(syncs.of(path)) == 1 and head_seq(path) == writer.seq
    # a failed end-of-iteration sync leaves the head where the disk is
    syncs.fail = 1
    assert writer.write_one(writer.records.start(version="t", pid=2))
    await asyncio.sleep(0)
    assert head_seq(path) == start + 1 and writer.stats.fsync_failing
    writer.close()  # close syncs again (and that one works)
    assert head_seq(path) == writer.seq


# --- everysec --------------------------------------------------------------------------
def test_everysec_syncs_off_the_caller_about_once_a_second(tmp_path: Path,
                                                           syncs: Syncs) -> None:
    path = tmp_path / "audit.jsonl"
    writer = writer_for(path, "everysec")
    syncs.calls.clear()
    first = time.monotonic()
    for i in range(50):
        assert writer.write_ahead(batch(writer, 1, tag=str(i)))
        time.sleep(0.01)
    assert all(c[2] == "audit-fsync" for c in syncs.of(path))  # never the writing thread
    last = time.monotonic()
    deadline = last + 2.5
    while time.monotonic() < deadline and head_seq(path) != writer.seq:  # the head follows
        time.sleep(0.05)
    trail = syncs.of(path)
    assert trail and trail[-1][1] == path.stat().st_size  # everything written got synced
    assert trail[-1][3] - last < 2.0  # within about a second of the last write
    assert len(trail) <= (last - first) + 2  # about once a second, not once per write
    assert head_seq(path) == writer.seq  # the thread moved the head after the sync
    assert writer.stats.fsyncs == len(trail)
    idle = len(syncs.of(path))
    time.sleep(1.3)
    assert len(syncs.of(path)) == idle  # nothing written: nothing synced
    writer.close()


def test_everysec_failure_is_counted_and_cleared(tmp_path: Path, syncs: Syncs) -> None:
    path = tmp_path / "audit.jsonl"
    writer = writer_for(path, "everysec")
    seq = writer.seq
    syncs.fail = 1
    assert writer.write_ahead(batch(writer))  # commands are not refused for it
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not writer.stats.fsync_failures:
        time.sleep(0.05)
    assert writer.stats.fsync_failing and writer.stats.fsync_failures == 1
    assert head_seq(path) == seq  # the head never names what did not reach the disk
    assert writer.write_ahead(batch(writer, tag="b"))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and (writer.stats.fsync_failing
                                           or head_seq(path) != writer.seq):
        time.sleep(0.05)
    assert not writer.stats.fsync_failing and head_seq(path) == writer.seq
    writer.close()


# --- no, rotation, close -------------------------------------------------------------
def test_no_never_syncs(tmp_path: Path, syncs: Syncs) -> None:
    path = tmp_path / "audit.jsonl"
    writer = writer_for(path, "no", max_bytes=1500, keep=2)
    for i in range(20):
        assert writer.write_ahead(batch(writer, 2, tag=str(i)))
    assert writer.stats.rotations >= 2
    writer.close()
    assert syncs.calls == []


@pytest.mark.parametrize("mode", ["everysec", "always"])
def test_rotation_and_close_sync_before_rename_and_close(tmp_path: Path, syncs: Syncs,
                                                         mode: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    dir_syncs: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (dir_syncs.append(
        os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    writer = writer_for(path, mode, max_bytes=1500, keep=3)
    assert writer.write_ahead(batch(writer, 2))
    size = path.stat().st_size
    syncs.calls.clear()
    while writer.stats.rotations == 0:
        assert writer.write_ahead(batch(writer, 2, tag="r"))
    # the file that became .1 was synced at its full size while still at the path
    rotated = [c for c in syncs.of(path) if c[2] != "audit-fsync"]
    assert rotated and rotated[0][1] >= size
    assert Path(files.rotated(str(path), 1)).stat().st_size == rotated[0][1]
    assert str(tmp_path) in dir_syncs  # the renames too
    assert writer.write_one(writer.records.stop(reason="x"))
    syncs.calls.clear()
    writer.close()
    assert any(c[1] == path.stat().st_size for c in syncs.of(path))
    assert head_seq(path) == writer.seq
