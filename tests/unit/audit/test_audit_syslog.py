"""Syslog sink against a real collector: rsyslogd with imtcp (apt package rsyslog).

The collector writes each message's MSG to one file and its header fields to another; the
chain must verify from what the collector received, byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvloop

from proxy.audit.syslog import SyslogSink
from proxy.audit.verify import verify
from proxy.audit.writer import AuditWriter
from proxy.config import AuditConfig
from tests.helpers import free_port, require, wait_port

KEY = os.urandom(32)

CONF = """
global(workDirectory="{dir}" maxMessageSize="256k")
module(load="imtcp" MaxSessions="20")
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="phi")
template(name="msg" type="string" string="%msg%\\n")
template(name="meta" type="string"
         string="%pri%|%syslogfacility-text%|%syslogseverity-text%|%app-name%|%procid%|%msgid%|%timereported:::date-rfc3339%\\n")
ruleset(name="phi") {{
  action(type="omfile" file="{dir}/msg.log" template="msg")
  action(type="omfile" file="{dir}/meta.log" template="meta")
}}
"""


def rsyslogd() -> str:
    # /usr/sbin may be missing from PATH outside a login shell
    return shutil.which("rsyslogd") or (
        "/usr/sbin/rsyslogd" if os.path.exists("/usr/sbin/rsyslogd") else require("rsyslogd"))


class Collector:
    def __init__(self, directory: Path, port: int):
        self.dir, self.port = directory, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.dir / "rsyslog.conf"
        conf.write_text(CONF.format(dir=self.dir, port=self.port))
        self.proc = subprocess.Popen(
            [rsyslogd(), "-n", "-f", str(conf), "-i", str(self.dir / "rsyslogd.pid")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def lines(self, name: str = "msg.log") -> list[bytes]:
        path = self.dir / name
        return path.read_bytes().splitlines(keepends=True) if path.exists() else []

    def wait_for(self, count: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.lines()
            if len(got) >= count:
                return got
            time.sleep(0.02)
        raise AssertionError(f"the collector has {len(self.lines())} of {count} records")


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    directory = tmp_path / "rsyslog"
    directory.mkdir()
    c = Collector(directory, free_port())
    c.start()
    yield c
    c.stop()


RUNNERS: dict[str, Callable[..., object]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


def syslog_writer(port: int, **config: object) -> AuditWriter:
    return AuditWriter(AuditConfig(path=f"syslog+tcp://127.0.0.1:{port}", **config),  # type: ignore[arg-type]
                       key=KEY, hostname="proxy-host")


def traffic(writer: AuditWriter, batches: int, tag: str = "") -> list[bytes]:
    conn = writer.records.connection(3, "10.0.0.9:5000", None, "writer")
    return [conn.command("hset", [f"app:phi:{tag}{b}:{i}".encode()], 0) for b in range(batches)
            for i in range(4)] + [conn.denied("flushall", [], 0, "dangerous")]


@pytest.mark.parametrize("runner", RUNNERS)
def test_records_arrive_intact_and_verify(collector: Collector, tmp_path: Path,
                                          runner: str) -> None:
    async def main() -> AuditWriter:
        writer = syslog_writer(collector.port, syslog_facility="authpriv")
        writer.open()
        assert writer.write_one(writer.records.start(version="0.1.0", pid=os.getpid()))
        conn = writer.records.connection(3, "10.0.0.9:5000", None, "writer")
        for b in range(200):  # written before the connection is even up: queued
            assert writer.write([conn.command("hset", [f"app:phi:{b}:{i}".encode()], 0)
                                 for i in range(4)] + [conn.denied("flushall", [], 0, "dangerous")])
        assert await writer.drain(10)
        assert writer.stats.connected == 1 and writer.stats.pending_bytes == 0
        writer.write_one(writer.records.stop(reason="test"))
        writer.close()
        return writer

    writer = RUNNERS[runner](main())
    assert isinstance(writer, AuditWriter)
    got = collector.wait_for(1002)
    assert len(got) == 1002
    copy = tmp_path / "collected.jsonl"
    copy.write_bytes(b"".join(got))
    assert verify([str(copy)], KEY, no_head=True).records == 1002
    assert [json.loads(line)["seq"] for line in got] == list(range(1, 1003))
    meta = [line.decode().rstrip("\n").split("|") for line in collector.lines("meta.log")]
    records = [json.loads(line) for line in got]
    for fields, record in zip(meta, records, strict=True):
        pri, facility, severity, app, procid, msgid, reported = fields
        assert facility == "authpriv" and app == "phiproxy" and procid == str(os.getpid())
        assert msgid == record["event"]
        assert severity == ("warning" if record["event"] == "denied" else "info")
        assert int(pri) == 10 * 8 + (4 if record["event"] == "denied" else 6)
        assert reported.startswith(record["ts"][:19])


def test_collector_restart_is_survived(tmp_path: Path) -> None:
    collector = Collector(tmp_path, free_port())
    collector.start()

    async def main() -> AuditWriter:
        writer = syslog_writer(collector.port)
        writer.open()
        writer.sink.backoff_s = (0.05, 0.2)  # type: ignore[union-attr]
        await asyncio.sleep(0.2)
        assert writer.write(traffic(writer, 10, "a"))
        assert await writer.drain(5)
        await asyncio.sleep(0.3)  # let rsyslog write it out before it stops
        collector.stop()
        await asyncio.sleep(0.3)  # the sink notices the close
        assert writer.stats.connected == 0
        assert writer.write(traffic(writer, 10, "b"))  # queued while the collector is away
        assert writer.stats.pending_records == 41
        collector.start()
        assert await writer.drain(10)
        assert writer.stats.reconnects >= 1
        writer.close()
        return writer

    try:
        uvloop.run(main())
        got = collector.wait_for(82)
    finally:
        collector.stop()
    copy = tmp_path / "collected.jsonl"
    copy.write_bytes(b"".join(got))
    assert verify([str(copy)], KEY, no_head=True).records == 82


def test_full_buffer_fails_closed_then_recovers(tmp_path: Path) -> None:
    collector = Collector(tmp_path, free_port())  # not started: nobody listens

    async def main() -> list[bool]:
        writer = syslog_writer(collector.port, syslog_buffer_bytes=64 * 1024)
        writer.open()
        writer.sink.backoff_s = (0.05, 0.1)  # type: ignore[union-attr]
        results = [writer.write(traffic(writer, 5, str(i))) for i in range(40)]
        assert not results[-1] and writer.stats.failures > 0
        queued = writer.seq
        assert writer.stats.pending_records == queued  # exactly what the chain holds
        collector.start()
        assert await writer.drain(10)
        assert writer.write(traffic(writer, 5, "after"))
        assert await writer.drain(5)
        writer.close()
        return results

    try:
        results = uvloop.run(main())
        ok = results.count(True)
        got = collector.wait_for(ok * 21 + 21)
    finally:
        collector.stop()
    assert 0 < ok < len(results)
    copy = tmp_path / "collected.jsonl"
    copy.write_bytes(b"".join(got))
    assert verify([str(copy)], KEY, no_head=True).records == ok * 21 + 21


def test_frame_is_octet_counted_rfc5424() -> None:
    sink = SyslogSink("127.0.0.1", 1, facility="auth", hostname="h")
    line = (b'{"ts":"2026-11-29T10:00:00.123456Z","seq":1,"event":"tls_failed","x":1,'
            b'"prev":"0","mac":"1"}\n')
    frame = sink.frame(line)
    length, msg = frame.split(b" ", 1)
    assert int(length) == len(msg)
    assert msg.startswith(b"<36>1 2026-11-29T10:00:00.123456Z h phiproxy ")
    assert msg.endswith(b" tls_failed - " + line.rstrip(b"\n"))


def test_write_without_open_or_after_close_fails() -> None:
    sink = SyslogSink("127.0.0.1", 1)
    assert not sink.write([b'{"ts":"x","seq":1,"event":"stop"}\n'])
