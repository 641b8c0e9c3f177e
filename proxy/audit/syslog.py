"""Syslog sink: RFC 5424 messages over TCP with octet-counting framing (RFC 6587).

Each record line (without its newline) is the MSG of one message:

    LEN SP <PRI>1 TIMESTAMP HOSTNAME phiproxy PROCID EVENT - {"ts":...,"mac":"..."}

PRI = facility * 8 + severity (warning for denied/tls_failed/identity_refused/recovered/lockout,
info otherwise); TIMESTAMP is the record's own `ts`; MSGID is the event name.

It never blocks the event loop: the socket is non-blocking; what the kernel does not take
at once waits in a bounded in-memory queue, flushed by loop.add_writer when the socket
is writable. While the collector is unreachable the sink reconnects with exponential
backoff (0.1 s .. 5 s) and keeps queueing; write() returns False (the caller fails closed)
only when a batch does not fit in the queue. All of a batch or none of it is queued.

Limit (as with any plain TCP syslog, which has no acknowledgements): frames the kernel had
accepted when a connection breaks may be lost; a frame only partly sent is sent again in
full on the next connection. Such a loss shows as a seq gap when the collector's copy is
verified. RELP would close that gap; it is not implemented.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque

from proxy.audit.record import WARNING_EVENTS, event_of
from proxy.audit.target import SYSLOG_FACILITIES

log = logging.getLogger("phiproxy.audit")

_WARNING, _INFO = 4, 6
_IOV_MAX = 512  # frames per sendmsg (Linux IOV_MAX is 1024)


def _header_name(text: str) -> bytes:
    """A HOSTNAME/APP-NAME field: printable US-ASCII without spaces, at most 255 bytes."""
    clean = "".join(c for c in text if 33 <= ord(c) <= 126)[:255]
    return clean.encode("ascii") if clean else b"-"


class SyslogSink:
    kind = "syslog"
    regular = False

    def __init__(self, host: str, port: int, *, facility: str = "authpriv",
                 buffer_bytes: int = 4 * 1024 * 1024, hostname: str | None = None,
                 app_name: str = "phiproxy", connect_timeout_s: float = 2.0,
                 backoff_s: tuple[float, float] = (0.1, 5.0)):
        self.host, self.port = host, port
        self.path = f"syslog+tcp://{host}:{port}"
        self.facility = SYSLOG_FACILITIES[facility]
        self.buffer_bytes = buffer_bytes
        self.connect_timeout_s = connect_timeout_s
        self.backoff_s = backoff_s
        self._after_ts = (b" " + _header_name(hostname or socket.gethostname()) + b" "
                          + _header_name(app_name) + b" " + str(os.getpid()).encode() + b" ")
        self._pri: dict[str, bytes] = {}
        self._queue: deque[bytes] = deque()
        self._offset = 0  # bytes of _queue[0] the kernel already took
        self.pending_bytes = 0
        self.size = 0
        self.rotations = 0
        self.first_seq = 0
        self.reconnects = 0
        self.sent_records = 0
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._writing = False
        self._closed = False
        self._down_since: float | None = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def pending_records(self) -> int:
        return len(self._queue)

    # --- framing ------------------------------------------------------------------------
    def frame(self, line: bytes) -> bytes:
        event = event_of(line)
        start = self._pri.get(event)
        if start is None:
            severity = _WARNING if event in WARNING_EVENTS else _INFO
            start = b"<%d>1 " % (self.facility * 8 + severity)
            self._pri[event] = start
        ts = line[7:line.index(b'"', 7)]  # the line starts with {"ts":"
        msg = (start + ts + self._after_ts + (event.encode() or b"-") + b" - "
               + line.rstrip(b"\n"))
        return str(len(msg)).encode() + b" " + msg

    # --- lifecycle --------------------------------------------------------------------
    def open(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start connecting in the background on `loop` (default: the running loop)."""
        self._loop = loop or asyncio.get_running_loop()
        self._closed = False
        self._task = self._loop.create_task(self._connect())

    def write(self, lines: list[bytes]) -> bool:
        if self._closed or self._loop is None:
            return False
        frames = [self.frame(line) for line in lines]
        size = sum(map(len, frames))
        if self.pending_bytes + size > self.buffer_bytes:
            return False  # fail closed: the collector is too slow or gone for too long
        self._queue.extend(frames)
        self.pending_bytes += size
        if self._sock is not None and not self._writing:
            self._flush()
        return True

    async def drain(self, timeout_s: float = 5.0) -> bool:
        """Wait until the kernel took everything queued; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._queue and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return not self._queue

    def close(self, timeout_s: float = 2.0) -> None:
        """Send what is queued (blocking, at most timeout_s: this is shutdown), then close."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None and not self._task.done():
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                self._task.cancel()
        sock, self._sock = self._sock, None
        if sock is not None:
            self._unwatch(sock)
        elif self._queue:
            with contextlib.suppress(OSError):
                sock = socket.create_connection((self.host, self.port), timeout_s)
        if sock is None:
            if self._queue:
                log.error("audit: %d records for %s were never delivered", len(self._queue),
                          self.path)
            return
        try:
            sock.settimeout(timeout_s)
            if self._queue:
                self._queue[0] = self._queue[0][self._offset:]
                sock.sendall(b"".join(self._queue))
                self.sent_records += len(self._queue)
                self._queue.clear()
                self.pending_bytes = 0
        except OSError as e:
            log.error("audit: %d records for %s not delivered at shutdown: %s",
                      len(self._queue), self.path, e)
        finally:
            sock.close()

    # --- connection -------------------------------------------------------------------
    async def _connect(self) -> None:
        assert self._loop is not None
        delay = self.backoff_s[0]
        while not self._closed:
            try:
                self._connected(await self._try_connect())
                return
            except (OSError, TimeoutError) as e:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.error("audit: syslog collector %s unreachable (%s); queueing up to "
                              "%d bytes, retrying", self.path, e, self.buffer_bytes)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_s[1])

    async def _try_connect(self) -> socket.socket:
        assert self._loop is not None
        infos = await self._loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        error: BaseException = OSError(f"no address for {self.host}")
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(self._loop.sock_connect(sock, address),
                                       self.connect_timeout_s)
                return sock
            except (OSError, TimeoutError) as e:
                sock.close()
                error = e
        raise error

    def _connected(self, sock: socket.socket) -> None:
        assert self._loop is not None
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._closed:
            sock.close()
            return
        if self._down_since is not None:
            log.warning("audit: syslog collector %s reachable again", self.path)
            self._down_since = None
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._on_readable)
        self._flush()

    def _unwatch(self, sock: socket.socket) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.remove_reader(sock.fileno())
        if self._writing:
            self._loop.remove_writer(sock.fileno())
            self._writing = False

    def _lost(self, reason: object) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._unwatch(sock)
        sock.close()
        self.pending_bytes += self._offset
        self._offset = 0  # the collector drops a half frame: send it again in full
        self.reconnects += 1
        self._down_since = time.monotonic()
        log.error("audit: lost the syslog collector %s (%s); queueing, reconnecting",
                  self.path, reason)
        if not self._closed and self._loop is not None:
            self._task = self._loop.create_task(self._connect())

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(4096)  # a collector says nothing; this only notices a close
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lost(e)
            return
        if not data:
            self._lost("closed by the collector")

    def _flush(self) -> None:
        sock = self._sock
        queue = self._queue
        while queue and sock is not None:
            chunk = [memoryview(queue[0])[self._offset:]]
            chunk.extend(queue[i] for i in range(1, min(len(queue), _IOV_MAX)))
            try:
                sent = sock.sendmsg(chunk)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._lost(e)
                return
            self.pending_bytes -= sent
            sent += self._offset
            while queue and sent >= len(queue[0]):
                sent -= len(queue.popleft())
                self.sent_records += 1
            self._offset = sent
        if self._loop is None or sock is None:
            return
        if queue and not self._writing:
            self._loop.add_writer(sock.fileno(), self._flush)
            self._writing = True
        elif not queue and self._writing:
            self._loop.remove_writer(sock.fileno())
            self._writing = False
