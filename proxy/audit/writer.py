"""AuditWriter: seals records into the HMAC chain and writes them ahead of the command.

Usage (per process, then per connection):

    writer = AuditWriter(config.audit)      # loads the key; AuditError if unusable
    writer.open()                           # inside the running loop (syslog needs it)
    writer.write_one(writer.records.start(version=..., pid=os.getpid()))
    conn = writer.records.connection(conn_id, peername, identity, role)
    ok = writer.write([conn.command("set", [b"app:phi:1"], 0), ...])  # one client read
    ...
    writer.write_one(writer.records.stop(reason="SIGTERM")); writer.close()

write() is synchronous and returns False instead of raising when the sink failed; the
caller then refuses the commands (`-ERR audit unavailable`) when fail_closed. The chain only
moves when the sink took the batch, so a lost batch never becomes `prev`, and the next call
simply tries the sink again.

Restart: open() continues the chain from the last record on disk (the current file, or
`.1` when the current file is empty). What it finds decides:

- a torn last line (a crash or power loss during a write; never left by a failed write,
  which the file sink cuts back at once) whose preceding record agrees with the head file:
  a crash artifact. Nothing was forwarded for a torn batch (write-ahead), so the fragment
  documents nothing that happened; it is moved, byte for byte, to `<trail>.torn-<seq>`,
  the trail is cut back to its last complete record, and a `recovered` record (warning)
  naming that file, its size and SHA-256 is the first record of the run. The trail stays
  verifiable end to end and the repair is itself in the chain.
- everything that a crash cannot explain refuses to start with AuditError naming the
  files: the head file missing while records exist, a head that does not verify, a head
  *ahead* of the trail (records were cut off the end), the last record's MAC failing
  (altered, or a different key). The operator runs `phiproxy audit verify`, keeps the
  trail as evidence, and moves it aside to start a new chain.

Durability (`[audit] fsync`, file trails only; stdout and syslog have nothing to sync here,
their durability is the reader's or the collector's), as Redis's appendfsync:

- "always": group commit. The gate calls write_ahead() once per loop iteration with every
  record of the iteration; it writes them and fdatasyncs the file (one call for all of
  them) before any command of the iteration is released to the backend. If the fsync
  fails, the batch is cut back off the file and the chain rolled back to where it was, and
  write_ahead() returns False: the gate takes the commands back (`-ERR audit unavailable`)
  exactly as for a failed write. Records written outside the gate (connect, disconnect,
  start...) are synced at the end of their iteration. Caveat (Linux "fsyncgate"): after a
  failed fsync, earlier records not yet synced may be lost although a later fsync
  succeeds; the batch of commands that failed never runs, which is what write-ahead needs.
- "everysec" (default): a daemon thread (Redis's bio thread) fdatasyncs the file about
  once a second when there were writes, off the event loop; the hot path never waits for
  the disk. A failure is logged, counted (stats.fsync_failures) and shows in /readyz
  (stats.fsync_failing) until an fsync succeeds; commands are not refused for it. A host
  crash loses at most about the last second (and two if the disk is slow).
- "no": page cache only; the kernel writes back when it likes.
Rotation and close sync the file before they rename or close it (everysec, always).

The head file and fsync: the head names the last record that is *on disk*, never one that
is only written. The trail is append-only and the head is rewritten in place, and after a
power loss the kernel may have persisted either file's pages without the other's: a head
that names a record the data file lost would look, at restart, like records cut off the
end, and the proxy would refuse to start on an honest crash. So with everysec/always the
head is rewritten with the position of the last successful fdatasync (`_durable`), never
the position just written; whatever of it reaches the disk, it is never ahead of the data
there. It may lag (it is not fsynced on the hot path: the "always" loop only pwrites it;
the everysec thread fsyncs it after the data, and close() does), which restart and verify
accept: a trail ahead of its head is a crash artifact, not tampering. With "no" the head
follows the writes as before (it may be ahead after a power loss: restart then refuses
and names the files, and `phiproxy audit verify` shows where the trail ends).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from proxy.audit import files
from proxy.audit.chain import (
    GENESIS,
    HEAD_SIZE,
    AuditError,
    Chain,
    Head,
    Mac,
    check_line,
    decode_head,
    encode_head,
    load_key,
    open_head,
)
from proxy.audit.record import AuditRecords
from proxy.audit.sinks import FileSink, StreamSink, oldest_first_seq
from proxy.audit.syslog import SyslogSink
from proxy.audit.target import is_syslog, parse_syslog_url

if TYPE_CHECKING:
    from proxy.config import AuditConfig

log = logging.getLogger("phiproxy.audit")


class AuditStats:
    """Plain counters for the metrics module (read at scrape time)."""

    __slots__ = ("records", "batches", "failures", "head_failures", "fsyncs", "fsync_failures",
                 "fsync_failing", "_sink")

    def __init__(self, sink: Any):
        self.records = 0  # records written
        self.batches = 0  # write() calls that succeeded
        self.failures = 0  # write() calls that returned False
        self.head_failures = 0  # head file updates that failed (records were written)
        self.fsyncs = 0  # fdatasyncs of the trail that succeeded
        self.fsync_failures = 0  # ... and that failed
        self.fsync_failing = False  # the last fsync failed (everysec: /readyz says so)
        self._sink = sink

    @property
    def pending_bytes(self) -> int:
        """Bytes accepted but not yet handed to the kernel (syslog queue; 0 for files)."""
        return self._sink.pending_bytes

    @property
    def pending_records(self) -> int:
        return getattr(self._sink, "pending_records", 0)

    @property
    def rotations(self) -> int:
        return self._sink.rotations

    @property
    def connected(self) -> int:
        """1 when the sink can take records now (always 1 for files and stdout)."""
        return int(getattr(self._sink, "connected", True))

    @property
    def reconnects(self) -> int:
        return getattr(self._sink, "reconnects", 0)


def fsync_mode(config: AuditConfig) -> str:
    """The effective `[audit] fsync`: "no" where the sink is not a file (nothing to sync)."""
    if config.path == "-" or is_syslog(config.path):
        return "no"
    return getattr(config, "fsync", "everysec")


def make_sink(config: AuditConfig, *, hostname: str | None = None,
              check_interval_s: float = 1.0) -> FileSink | StreamSink | SyslogSink:
    path = config.path
    if path == "-":
        return StreamSink(1)
    if is_syslog(path):
        host, port = parse_syslog_url(path)
        return SyslogSink(host, port, facility=config.syslog_facility,
                          buffer_bytes=config.syslog_buffer_bytes, hostname=hostname)
    return FileSink(path, max_bytes=config.max_bytes, keep=config.keep,
                    check_interval_s=check_interval_s, fsync=fsync_mode(config) != "no")


class AuditWriter:
    def __init__(self, config: AuditConfig, *, key: bytes | None = None,
                 hostname: str | None = None, check_interval_s: float = 1.0):
        """The key comes from config.key_file unless given; AuditError if it is unusable."""
        if key is None:
            if config.key_file is None:
                raise AuditError("[audit] key_file is not set: the trail's HMAC chain needs a "
                                 "key; add key_file = \"secrets/audit.key\" (chmod 600)")
            key = load_key(config.key_file)
        self.config = config
        self.records = AuditRecords(config.environment, config.instance)
        self.sink = make_sink(config, hostname=hostname, check_interval_s=check_interval_s)
        self.stats = AuditStats(self.sink)
        self.recovery: str | None = None  # what open() repaired, if anything
        self._mac = Mac(key)
        self._chain = Chain(key)
        self._head_path: str | None = None
        self._head_fd: int | None = None
        self._open = False
        self._sec = -1
        self._sec_text = b""
        # Inside an event loop the head is rewritten once per loop iteration (after every
        # read of that iteration was handled), not once per batch; see write().
        self._loop: asyncio.AbstractEventLoop | None = None
        self._head_due = False
        # [audit] fsync (see the module docstring): the head names `_durable`, the last
        # position known to be on disk; `_written` is the last position written (the
        # everysec thread reads both tuples whole, so no lock is needed for them).
        self.fsync = fsync_mode(config)
        self._written: tuple[int, bytes, int] = (0, GENESIS, 0)
        self._durable: tuple[int, bytes, int] = (0, GENESIS, 0)
        self._syncer: _Syncer | None = None

    # --- state ----------------------------------------------------------------------
    @property
    def seq(self) -> int:
        """The seq of the last record written (0 before the first)."""
        return self._chain.seq

    @property
    def mac(self) -> bytes:
        return self._chain.mac

    @property
    def head_path(self) -> str | None:
        return self._head_path

    @property
    def in_loop(self) -> bool:
        """Opened inside an event loop: callers may batch their writes per iteration."""
        return self._loop is not None

    # --- lifecycle ------------------------------------------------------------------
    def open(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Open the sink and continue the chain; AuditError says what to do if it cannot.

        A syslog sink attaches to `loop` (default: the running loop); call this from
        inside the loop, e.g. at the start of the server's main coroutine.
        """
        try:
            self._loop = loop or asyncio.get_running_loop()
        except RuntimeError:  # no loop (tools, tests): the head follows every batch
            self._loop = None
        if isinstance(self.sink, SyslogSink):
            try:
                self.sink.open(loop)
            except RuntimeError:  # no running loop
                raise AuditError(f"[audit] path = {self.sink.path}: the syslog sink needs the "
                                 "event loop; call AuditWriter.open() inside it") from None
        else:
            self.sink.open()
        try:
            self._resume()
        except BaseException:
            self._open = False
            if self._syncer is not None:
                self._syncer.stop()
                self._syncer = None
            self.sink.close()
            raise

    def _resume(self) -> None:
        """Continue the chain where the trail (or the head file) says it ends."""
        torn: tuple[str, int, str] | None = None
        if isinstance(self.sink, FileSink) and self.sink.regular:
            self._head_path = files.head_path(self.sink.path)
        elif self.config.head_file:
            self._head_path = self.config.head_file
        if self._head_path is not None:
            self._lock_head(self._head_path)
            if isinstance(self.sink, FileSink):
                torn = self._recover_file(self.sink)
            else:
                self._recover_head_only()
        self._open = True
        # What open() found is on disk (or as good as it gets: it was read back).
        self._written = self._durable = self._position()
        self._write_head()
        if self.fsync == "everysec" and isinstance(self.sink, FileSink):
            self._syncer = _Syncer(self)
            self._syncer.start()
        if torn is not None:
            name, size, digest = torn
            self.recovery = (f"torn last line ({size} bytes, crash during a write) moved to "
                             f"{name}")
            log.warning("audit: %s: %s", self.sink.path, self.recovery)
            if not self.write_one(self.records.recovered(
                    reason=self.recovery, torn_file=os.path.basename(name), torn_bytes=size,
                    torn_sha256=digest)):
                raise AuditError(f"{self.sink.path}: cannot write to the audit trail")

    def _lock_head(self, path: str) -> None:
        """Open the head file and hold an exclusive lock on it while the trail is ours.

        Two writers on one trail would interleave two chains into a broken one; the second
        process is refused instead (flock: released by the kernel when the process dies).
        A head file that was just created here is empty, which reads as missing.
        """
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            fd = open_head(path)
        except OSError as e:
            raise AuditError(f"{path}: cannot open the audit head file ({e.strerror}); make "
                             "its directory writable by this user") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise AuditError(f"{path}: another process is writing this audit trail; give each "
                             "proxy instance its own [audit] path") from None
        self._head_fd = fd

    def _read_head(self) -> Head | None:
        assert self._head_fd is not None and self._head_path is not None
        try:
            return decode_head(self._mac, os.pread(self._head_fd, HEAD_SIZE * 4, 0))
        except OSError as e:
            raise self._refuse(f"{self._head_path}: the audit head file cannot be read "
                               f"({e.strerror})") from None
        except ValueError as e:
            raise self._refuse(f"{self._head_path}: the audit head file is {e}") from None

    def close(self) -> None:
        """Flush (syslog: blocking, at most 2 s: call it at shutdown), sync and close."""
        if self._syncer is not None:
            self._syncer.stop()
            self._syncer = None
        if self.fsync != "no" and self._open and self._written != self._durable:
            self.sync()
        if self._head_due or self.fsync != "no":
            self._write_head()
            if self.fsync != "no" and self._head_fd is not None:
                try:
                    os.fdatasync(self._head_fd)
                except OSError as e:
                    log.error("audit: cannot fsync %s: %s", self._head_path, e.strerror)
        self._open = False
        self.sink.close()
        if self._head_fd is not None:
            try:
                os.close(self._head_fd)
            except OSError:
                pass
            self._head_fd = None

    async def drain(self, timeout_s: float = 5.0) -> bool:
        """Wait until a syslog sink's queue is in the kernel; True at once for files."""
        if isinstance(self.sink, SyslogSink):
            return await self.sink.drain(timeout_s)
        return True

    # --- writing --------------------------------------------------------------------
    def _now(self) -> bytes:
        """RFC 3339 UTC with microseconds; the strftime part is cached per second."""
        ns = time.time_ns()
        sec, rest = divmod(ns, 1_000_000_000)
        if sec != self._sec:
            self._sec = sec
            self._sec_text = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec)).encode()
        return self._sec_text + b"%06dZ" % (rest // 1000)

    def write(self, records: list[bytes]) -> bool:
        """Write a batch of record bodies (one client read) in one go; False if not written."""
        if not self._append(records):
            return False
        if self.fsync == "no":
            if self._head_fd is not None:
                if self._loop is None:
                    self._write_head()
                elif not self._head_due:
                    # Once per loop iteration: with many clients (or pipelining), one HMAC
                    # and one pwrite serve every batch written in it. The head already
                    # lagged the trail between a write and its update; a crash in between
                    # is accepted at restart and by verify (trail ahead of the head).
                    self._head_due = True
                    self._loop.call_soon(self._write_head)
        elif self.fsync == "always":
            self._iteration_done()  # records outside the gate: synced this iteration
        return True

    def write_one(self, record: bytes) -> bool:
        return self.write([record])

    def write_ahead(self, records: list[bytes]) -> bool:
        """The gate's write: the records of commands about to be forwarded. With fsync =
        "always" they are on disk when this returns True (group commit); if the fsync
        fails they are cut back off the trail, the chain is rolled back, and False."""
        if self.fsync != "always" or not records:
            return self.write(records)
        before = (self._chain.seq, self._chain.mac)
        if not self._append(records):
            return False
        if not self.sync():
            if isinstance(self.sink, FileSink):
                self.sink.cut_back()
            self._chain.advance(*before)
            self._written = self._position()
            self.stats.records -= len(records)
            self.stats.batches -= 1
            self.stats.failures += 1
            return False
        self._iteration_done()  # the head, once per iteration
        return True

    def _append(self, records: list[bytes]) -> bool:
        """Seal and hand to the sink; the chain moves only if the sink took them."""
        if not records:
            return True
        if not self._open:
            self.stats.failures += 1
            return False
        lines, seq, mac = self._chain.seal(self._now(), records)
        if not self.sink.write(lines):
            self.stats.failures += 1
            return False
        self._chain.advance(seq, mac)
        self.stats.records += len(lines)
        self.stats.batches += 1
        if self.fsync != "no":
            self._written = self._position()
        return True

    def _iteration_done(self) -> None:
        """fsync = "always": at the end of this loop iteration (at once without a loop)."""
        if self._loop is None:
            self._end_iteration()
        elif not self._head_due:
            self._head_due = True
            self._loop.call_soon(self._end_iteration)

    def sync(self) -> bool:
        """fdatasync the trail now (on the calling thread); True if it is on disk."""
        position = self._written
        if not isinstance(self.sink, FileSink) or not self.sink.sync():
            self._synced(False)
            return False
        self._synced(True, position)
        return True

    def _synced(self, ok: bool, position: tuple[int, bytes, int] | None = None) -> None:
        """Count an fsync (either thread: the counters are the loop's view, plain ints)."""
        stats = self.stats
        if not ok:
            stats.fsync_failures += 1
            if not stats.fsync_failing:
                stats.fsync_failing = True
                log.error("audit: fsync of %s failed: records may not survive a host crash "
                          "until an fsync succeeds", self.sink.path)
            return
        stats.fsyncs += 1
        if position is not None and position[0] >= self._durable[0]:
            self._durable = position
        if stats.fsync_failing:
            stats.fsync_failing = False
            log.warning("audit: fsync of %s works again", self.sink.path)

    def _end_iteration(self) -> None:
        """fsync = "always": sync what this iteration wrote outside the gate; then the head."""
        self._head_due = False
        if self._open and self._written != self._durable:
            self.sync()
        self._write_head()

    def _position(self) -> tuple[int, bytes, int]:
        return self._chain.seq, self._chain.mac, self.sink.first_seq

    def _write_head(self) -> None:
        self._head_due = False
        if self._head_fd is None:
            return
        if self.fsync == "no":
            seq, last, first = self._position()
        else:
            seq, last, first = self._durable
        data = encode_head(self._mac, seq, last, first)
        try:
            os.pwrite(self._head_fd, data, 0)
        except OSError as e:
            self.stats.head_failures += 1
            log.error("audit: cannot update %s: %s", self._head_path, e.strerror)

    # --- recovery -------------------------------------------------------------------
    def _refuse(self, problem: str) -> AuditError:
        key = getattr(self.config, "key_file", None) or "KEY"
        return AuditError(
            f"{problem}. The proxy will not continue this trail. Check it with: phiproxy audit "
            f"verify {self.sink.path} --key-file {key}; keep the files as evidence, then move "
            f"{self.sink.path}* aside to start a new chain")

    def _recover_file(self, sink: FileSink) -> tuple[str, int, str] | None:
        base = sink.path
        line, fragment = files.read_tail(base)
        where = base
        if line is None:  # nothing complete in the current file: the head is in .1
            where = files.rotated(base, 1)
            line, older_fragment = files.read_tail(where)
            if older_fragment:
                raise self._refuse(f"{where} ends in a torn line although it was rotated")
        last = None
        if line is not None:
            try:
                last = check_line(self._mac, line)
            except ValueError as e:
                raise self._refuse(f"{where}: the last record does not verify: {e}") from None
        seq, mac = (last.seq, last.mac) if last is not None else (0, GENESIS)
        head_path = files.head_path(base)
        head = self._read_head()
        if head is None and last is not None:
            raise self._refuse(f"{head_path} is missing although {where} holds records, so "
                               "records cut off the end could not be detected")
        if head is not None and head.seq > seq:
            raise self._refuse(f"{base}: the trail ends at seq {seq} but its head file says "
                               f"seq {head.seq} was written: records were removed from the end")
        if head is not None and head.seq == seq and head.mac != mac:
            raise self._refuse(f"{base}: the last record (seq {seq}) is not the one the head "
                               f"file names")
        torn = self._set_aside(sink, fragment, seq) if fragment else None
        self._chain.advance(seq, mac)
        sink.first_seq = oldest_first_seq(base, sink.keep) if last is not None else seq + 1
        return torn

    def _set_aside(self, sink: FileSink, fragment: bytes, seq: int) -> tuple[str, int, str]:
        """Move a torn tail into its own file, then cut the trail back to whole records."""
        name = f"{sink.path}.torn-{seq + 1}"
        n = 1
        while os.path.exists(name):
            n += 1
            name = f"{sink.path}.torn-{seq + 1}-{n}"
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, fragment)
                os.fsync(fd)
            finally:
                os.close(fd)
            size = os.stat(sink.path).st_size
            os.truncate(sink.path, size - len(fragment))
            sink.size = size - len(fragment)
        except OSError as e:
            raise AuditError(f"{sink.path}: its last line is torn and cannot be set aside into "
                             f"{name} ({e.strerror}); make the directory writable") from None
        return name, len(fragment), hashlib.sha256(fragment).hexdigest()

    def _recover_head_only(self) -> None:
        head = self._read_head()
        if head is not None:
            self._chain.advance(head.seq, head.mac)


class _Syncer(threading.Thread):
    """fsync = "everysec": about once a second, if records were written since the last
    sync, fdatasync the trail (a duplicate of its fd), then rewrite and fsync the head
    with that position. Never on the event loop; the loop only publishes `_written`.
    It holds the writer weakly: a writer dropped without close() (tools, tests) ends it."""

    def __init__(self, writer: AuditWriter, interval_s: float = 1.0) -> None:
        super().__init__(name="audit-fsync", daemon=True)
        self._writer = weakref.ref(writer)
        self.interval_s = interval_s
        self._stopping = threading.Event()
        self._mac = Mac(writer._mac.key)  # its own HMAC state: the loop uses the writer's

    def stop(self) -> None:
        self._stopping.set()
        if self is not threading.current_thread():
            self.join(5.0)

    def run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            writer = self._writer()
            if writer is None:
                return
            self._tick(writer)
            del writer

    def _tick(self, writer: AuditWriter) -> None:
        sink = writer.sink
        assert isinstance(sink, FileSink)
        position = writer._written  # read before the fd: those records are in it
        if position == writer._durable:
            return
        try:
            fd = sink.dup_fd()
        except OSError:
            fd = None
        if fd is None:  # closed meanwhile (a failed write): try again next second
            return
        try:
            os.fdatasync(fd)
            ok = True
        except OSError as e:
            log.error("audit: cannot fsync %s: %s", sink.path, e.strerror or e)
            ok = False
        finally:
            os.close(fd)
        writer._synced(ok, position)
        if ok:
            self._write_head(writer, position)

    def _write_head(self, writer: AuditWriter, position: tuple[int, bytes, int]) -> None:
        fd = writer._head_fd
        if fd is None or self._stopping.is_set():  # close() owns the head from now on
            return
        try:
            os.pwrite(fd, encode_head(self._mac, *position), 0)
            os.fdatasync(fd)
        except OSError as e:
            writer.stats.head_failures += 1
            log.error("audit: cannot update %s: %s", writer._head_path, e.strerror)
