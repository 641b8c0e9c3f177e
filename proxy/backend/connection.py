"""One connection to a backend Redis node (TLS, or a unix socket), with the proxy's own
credentials.

A connection carries requests for many clients (shared) or for one client (dedicated, an
`owner` set). Either way it keeps, in `fifo`, one `Pending` entry per request it sent, in
order, and hands each reply frame to the entry's client (`ReplyQueue.answer`). It also
knows the database and protocol it is in, so a client's requests are preceded by the
SELECT or HELLO that puts it where that client is (`send`); those replies are the
proxy's own and never shown.

Before it carries clients' requests, the proxy asks its own questions on it (`request`:
AUTH, HELLO, ...), decoded with hiredis.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import hiredis

from proxy.config import BackendConfig
from proxy.replies import FILTER, LOCAL, PLAIN, SILENT, WHOLE, Pending, swallowed
from proxy.resp import canned
from proxy.resp.reply import PUSH, REPLY, ReplyFramer
from proxy.resp.request import ProtocolError, encode_command

log = logging.getLogger("phiproxy.backend")

_MINUS = 0x2D
# Errors pass unfiltered; simple strings (+QUEUED inside MULTI) go through answer().
_NOT_FILTERED = frozenset(b"-+")


class BackendUnavailable(Exception):
    """The backend could not be reached, or refused the proxy's credentials."""


class Owner(Protocol):
    """The one client of a dedicated connection (the Session)."""

    def backend_lost(self, conn: BackendConnection, exc: Exception | None) -> None: ...
    def backend_paused(self, paused: bool) -> None: ...


def auth_command(cfg: BackendConfig) -> bytes | None:
    """The AUTH the proxy sends on every new backend connection (and after a RESET)."""
    if cfg.password is None:
        return None
    argv = [b"AUTH", cfg.password] if cfg.username is None else [
        b"AUTH", cfg.username.encode(), cfg.password]
    return encode_command(argv)


_SELECT = {db: encode_command([b"SELECT", str(db).encode()]) for db in range(16)}
_HELLO = {2: encode_command([b"HELLO", b"2"]), 3: encode_command([b"HELLO", b"3"])}


def select_command(db: int) -> bytes:
    return _SELECT.get(db) or encode_command([b"SELECT", str(db).encode()])


class BackendConnection(asyncio.Protocol):
    """One connection to one backend node."""

    def __init__(self, node: str = "") -> None:
        self.node = node  # "host:port" or the socket path, for logs and audit
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.fifo: deque[Pending] = deque()  # one entry per request sent, in order
        self.db = 0  # where the requests written so far leave the connection
        self.proto = 2
        self.owner: Owner | None = None  # set while dedicated to one client
        self.on_lost: Callable[[BackendConnection, Exception | None], None] | None = None
        self.on_pause: Callable[[bool], None] | None = None  # shared: pause its clients
        self.on_idle: Callable[[BackendConnection], None] | None = None  # fifo drained
        self.on_dirty: Callable[[BackendConnection], None] | None = None  # wbuf got bytes
        self._wbuf: list[bytes] = []
        self._framer = ReplyFramer()
        self._first = 0  # first byte of the frame in progress
        self._streamed = False  # the frame in progress was partly handed on already
        self._hold: list[bytes] | None = None  # ... or is held until complete
        self._reader: Any = None  # hiredis.Reader for the proxy's own request, if any
        self._waiter: asyncio.Future[Any] | None = None
        self._early = bytearray()  # bytes that arrived before anyone asked

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._own_reply(waiter, data)
            return
        try:
            if self.owner is None:
                self._shared_data(data)
            else:
                self._dedicated_data(data)
        except ProtocolError as exc:
            log.error("backend %s sent malformed RESP (%s); closing it", self.node, exc)
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(BackendUnavailable("backend closed the connection"))
        self._fail_fifo()
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.backend_lost(self, exc)
        if self.on_lost is not None:
            self.on_lost(self, exc)

    def pause_writing(self) -> None:
        self._paused(True)

    def resume_writing(self) -> None:
        self._paused(False)

    def _paused(self, paused: bool) -> None:
        if self.owner is not None:
            self.owner.backend_paused(paused)
        elif self.on_pause is not None:
            self.on_pause(paused)

    # ------------------------------------------------------------ sending
    def send(self, db: int, proto: int, payload: bytes, entries: list[Pending],
             after: tuple[int, int] | None = None) -> None:
        """Queue one client's requests (encoded in `payload`, one entry each), preceded by
        what puts this connection in the client's db and protocol. `after`: the db and
        protocol the payload itself leaves the connection in (SELECT inside MULTI, RESET).
        Written by `flush`, once per loop iteration for every client."""
        wbuf = self._wbuf
        if not wbuf and self.on_dirty is not None:
            self.on_dirty(self)
        if proto != self.proto:
            wbuf.append(_HELLO[proto])
            self.fifo.append(swallowed())
            self.proto = proto
        if db != self.db:
            wbuf.append(select_command(db))
            self.fifo.append(swallowed())
            self.db = db
        wbuf.append(payload)
        self.fifo.extend(entries)
        if after is not None:
            self.db, self.proto = after

    def send_own(self, payload: bytes, replies: int) -> None:
        """The proxy's own requests, answered silently (RESET and AUTH when a dedicated
        connection is given back)."""
        if not self._wbuf and self.on_dirty is not None:
            self.on_dirty(self)
        self._wbuf.append(payload)
        self.fifo.extend(swallowed() for _ in range(replies))

    def flush(self) -> None:
        wbuf = self._wbuf
        if not wbuf:
            return
        self._wbuf = []
        if self.transport is None or self.closed:
            return  # connection_lost answers the entries
        self.transport.write(wbuf[0] if len(wbuf) == 1 else b"".join(wbuf))

    @property
    def busy(self) -> bool:
        return bool(self.fifo) or bool(self._wbuf)

    # ------------------------------------------------------------ replies
    def owner_queue_pubsub(self) -> bool:
        queue = getattr(self.owner, "queue", None)
        return queue is not None and queue.pubsub

    def _shared_data(self, data: bytes) -> None:
        """Every frame answers the oldest entry; consecutive frames of one client are
        handed over in one piece."""
        framer = self._framer
        fifo = self.fifo
        framer.subscribed = False
        continuing = not framer.at_boundary
        events = framer.feed(data)
        pos = 0
        queue = None
        out: list[bytes] = []
        for end, kind, confirm in events:
            if kind == PUSH:  # nobody on a shared connection asked for pushes
                log.warning("backend %s sent a push on a shared connection; dropped", self.node)
                pos = end
                continuing = False
                continue
            if not fifo:  # the stream is out of step: no reply can be matched any more
                raise ProtocolError("a reply nobody asked for")
            entry = fifo.popleft()
            q = entry.queue
            if q is not queue:
                if out and queue is not None and queue.sink is not None:
                    queue.sink(out)
                out = []
                queue = q
            if continuing:
                continuing = False
                first = self._first
                hold = self._hold
                if hold is not None:
                    hold.append(data[:end])
                    chunk = b"".join(hold)
                    self._hold = None
                    whole = True
                else:
                    chunk = data[:end]
                    whole = not self._streamed
                self._streamed = False
                if q is None:
                    self._own_done(first, chunk)
                else:
                    q.answer(kind, confirm, chunk, whole, first, out)
            elif q is None:
                self._own_done(data[pos], data[pos:end])
            elif entry.kind == PLAIN:
                # The common case, inlined: relay and count.
                q.entries.popleft()
                q.in_flight -= 1
                entry.slot[data[pos] == _MINUS] += 1  # type: ignore[index]
                out.append(data[pos:end])
                if q.entries and q.entries[0].kind == LOCAL:
                    q.release(out)
            elif entry.kind == FILTER and kind == REPLY and data[pos] not in _NOT_FILTERED:
                # A whole reply to rewrite (a protected value to decrypt), inlined too.
                q.entries.popleft()
                q.in_flight -= 1
                if entry.slot is not None:
                    entry.slot[0] += 1
                out.append(entry.filter(data[pos:end]))  # type: ignore[misc]
                if q.entries and q.entries[0].kind == LOCAL:
                    q.release(out)
            else:
                q.answer(kind, confirm, data[pos:end], True, data[pos], out)
            pos = end
        if out and queue is not None and queue.sink is not None:
            queue.sink(out)
        if pos < len(data):
            self._partial(data, pos, continuing)
        elif not fifo and self.on_idle is not None:
            self.on_idle(self)

    def _partial(self, data: bytes, pos: int, continuing: bool) -> None:
        """The rest of `data` begins (or continues) a frame that ends in a later chunk:
        stream it to its client, or hold it where the entry needs the whole frame."""
        if not continuing:
            self._first = data[pos]
        tail = data[pos:]
        if self._hold is not None:
            self._hold.append(tail)
            return
        entry = self.fifo[0] if self.fifo else None
        if entry is None or (self.owner is not None and self.owner_queue_pubsub()
                             and entry.kind not in WHOLE):
            # A dedicated connection's stream (pub/sub, MONITOR): relayed as it comes.
            queue = getattr(self.owner, "queue", None)
            if queue is not None and queue.sink is not None:
                queue.sink([tail])
            self._streamed = True
            return
        if entry.queue is None or entry.kind in WHOLE or entry.filter is not None:
            self._hold = [tail]  # (a filtered EXEC too: its array is rewritten whole)
            return
        self._streamed = True
        if entry.kind != SILENT and entry.queue.sink is not None:
            entry.queue.sink([tail])

    def _dedicated_data(self, data: bytes) -> None:
        """One client's stream: frame by frame, since a reply can change how the next
        frame is read (the first SUBSCRIBE confirmation, MONITOR's +OK)."""
        owner = self.owner
        queue = owner.queue  # type: ignore[union-attr]
        framer = self._framer
        fifo = self.fifo
        out: list[bytes] = []
        pos, size = 0, len(data)
        while pos < size:
            continuing = not framer.at_boundary
            framer.subscribed = queue.proto == 2 and queue.pubsub
            events = framer.feed(data, pos, 1)
            if not events:
                if out and queue.sink is not None:
                    queue.sink(out)
                    out = []
                self._partial(data, pos, continuing)
                return
            end, kind, confirm = events[0]
            first = self._first if continuing else data[pos]
            chunk = data[pos:end]
            if continuing and self._hold is not None:
                self._hold.append(chunk)
                chunk = b"".join(self._hold)
                self._hold = None
                whole = True
            else:
                whole = not (continuing and self._streamed)
            self._streamed = False
            pos = end
            entry = fifo[0] if fifo else None
            if entry is not None and entry.queue is None and kind == REPLY \
                    and not queue.monitor:
                fifo.popleft()
                self._own_done(first, chunk)
                continue
            if queue.push(kind, confirm, chunk, out):
                continue
            if entry is None:
                log.warning("backend %s sent a reply nobody asked for; relayed", self.node)
                out.append(chunk)
                continue
            if queue.answer(kind, confirm, chunk, whole, first, out):
                fifo.popleft()
        if out and queue.sink is not None:
            queue.sink(out)
        if not fifo and self.on_idle is not None:
            self.on_idle(self)

    def _own_done(self, first: int, chunk: bytes) -> None:
        """A reply to the proxy's own request (SELECT/HELLO prefix, AUTH, RESET)."""
        if first == _MINUS:
            # The connection is not in the state the proxy believes: never use it again.
            log.error("backend %s refused the proxy's own request: %s; closing it", self.node,
                      chunk[:200].decode("utf-8", "replace").strip())
            self.abort()

    def _fail_fifo(self) -> None:
        """Answer every request in flight `backend unavailable`, each client in order."""
        fifo, self.fifo = self.fifo, deque()
        self._wbuf = []
        self._hold = None
        self._streamed = False
        by_queue: dict[int, tuple[Any, list[bytes]]] = {}
        for entry in fifo:
            queue = entry.queue
            if queue is None:
                continue
            _, out = by_queue.setdefault(id(queue), (queue, []))
            if queue.entries:  # the entry is its queue's head: requests are in order
                queue.answer(REPLY, None, canned.BACKEND_UNAVAILABLE, True, _MINUS, out)
        for queue, out in by_queue.values():
            if out and queue.sink is not None:
                queue.sink(out)

    # ------------------------------------------------------------ the proxy's own requests
    def _own_reply(self, waiter: asyncio.Future[Any], data: bytes) -> None:
        try:
            self._reader.feed(data)
            reply = self._reader.gets()
        except hiredis.ProtocolError as exc:
            if not waiter.done():
                waiter.set_exception(BackendUnavailable(f"backend sent malformed RESP: {exc}"))
            return
        if reply is not False and not waiter.done():
            waiter.set_result(reply)

    async def request(self, command: bytes, timeout: float) -> Any:
        """Send one of the proxy's own commands on an unused connection and return its
        decoded reply (errors come back as hiredis.ReplyError)."""
        assert self.transport is not None and not self.fifo
        self._reader = hiredis.Reader()
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(command)
        try:
            return await asyncio.wait_for(self._waiter, timeout)
        finally:
            self._waiter = None
            self._reader = None

    async def authenticate(self, command: bytes, timeout: float) -> None:
        reply = await self.request(command, timeout)
        if reply != b"OK":
            # Never echo the password; Redis's error text does not contain it.
            raise BackendUnavailable(f"backend refused the proxy's AUTH: {reply!s:.200}")

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


async def open_connection(cfg: BackendConfig, ssl_context: ssl.SSLContext | None,
                          auth: bytes | None) -> BackendConnection:
    """A new connection to the configured standalone node, authenticated;
    BackendUnavailable if that fails."""
    loop = asyncio.get_running_loop()
    unix_socket = cfg.unix_socket
    node = str(unix_socket) if unix_socket else f"{cfg.address}:{cfg.port}"
    try:
        if unix_socket:
            connect = loop.create_unix_connection(lambda: BackendConnection(node),
                                                  str(unix_socket))
        else:
            connect = loop.create_connection(
                lambda: BackendConnection(node), cfg.address, cfg.port, ssl=ssl_context,
                server_hostname=cfg.server_name if ssl_context is not None else None,
                ssl_handshake_timeout=cfg.connect_timeout_s if ssl_context is not None
                else None)
        _, conn = await asyncio.wait_for(connect, cfg.connect_timeout_s)
    except (TimeoutError, OSError, ssl.SSLError) as exc:
        # a timeout's text is empty (an exception is always true: `exc or ...` was not
        # enough): say which limit ran out
        reason = str(exc) or (f"no answer within connect_timeout_s = {cfg.connect_timeout_s:g} s"
                              if isinstance(exc, TimeoutError) else type(exc).__name__)
        raise BackendUnavailable(f"cannot connect to {node}: {reason}") \
            from exc
    if auth is not None:
        try:
            await conn.authenticate(auth, cfg.connect_timeout_s)
        except (TimeoutError, BackendUnavailable) as exc:
            conn.abort()
            raise BackendUnavailable(str(exc) or "AUTH timed out") from exc
    return conn
