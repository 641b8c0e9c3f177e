"""One backend node: a few shared, pipelined connections for clients without connection
state, and a pool of dedicated connections for clients that hold some (MULTI, WATCH,
subscriptions, blocking commands, ...).

A client is given one `Pipeline` (a shared connection slot) for its whole life, so its
requests stay in order. A Pipeline whose connection is lost answers what was in flight
`backend unavailable` (the connection does that) and sends what comes next on a new one.
Dedicated connections are taken from the pool, and given back after RESET (and the
proxy's AUTH): never opened per transaction.

Health (`health_interval_s`): a node is checked even with no traffic. A lost connection is
noticed at once (the shared slot reconnects, and a failed attempt marks the node down); a
node that keeps its connections but stops answering (paused, overloaded, a partition that
sends no reset) is found by a PING on an idle pooled connection every half interval, with
half an interval to answer: down within `health_interval_s` either way, and up again as
fast, at which point shared slots waiting out a back-off reconnect at once.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from proxy.backend.connection import (
    BackendConnection,
    BackendUnavailable,
    auth_command,
    open_connection,
)
from proxy.config import BackendConfig
from proxy.replies import Pending
from proxy.resp import canned
from proxy.resp.reply import REPLY
from proxy.resp.request import encode_command

log = logging.getLogger("phiproxy.backend")

_RESET = encode_command([b"RESET"])
_PING = encode_command([b"PING"])
_MAX_BACKOFF_S = 2.0


def fail_entries(entries: list[Pending]) -> None:
    """Answer requests that never reached Redis `backend unavailable`, in order."""
    outs: dict[int, tuple[Any, list[bytes]]] = {}
    for entry in entries:
        queue = entry.queue
        if queue is None or not queue.entries:
            continue
        _, out = outs.setdefault(id(queue), (queue, []))
        queue.answer(REPLY, None, canned.BACKEND_UNAVAILABLE, True, 0x2D, out)
    for queue, out in outs.values():
        if out and queue.sink is not None:
            queue.sink(out)


class Pipeline:
    """One shared connection slot: the connection now behind it, and what waits for a
    new one while there is none."""

    def __init__(self, link: NodeLink, index: int) -> None:
        self.link = link
        self.index = index
        self.conn: BackendConnection | None = None
        self.users: set[Any] = set()  # sessions sending here (paused when Redis is slow)
        self._waiting: list[tuple[int, int, bytes, list[Pending], Any]] = []
        self._connecting: asyncio.Task[None] | None = None
        self._retiring = False  # settings changed: reconnect once nothing is in flight
        self.paused = False

    def send(self, db: int, proto: int, payload: bytes, entries: list[Pending],
             after: tuple[int, int] | None = None) -> None:
        conn = self.conn
        if conn is not None and not conn.closed and not self._retiring:
            conn.send(db, proto, payload, entries, after)
            return
        self._waiting.append((db, proto, payload, entries, after))
        if not self._retiring:
            self.connect()

    def connect(self) -> None:
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        delay = 0.1
        while not self.link.closed:
            try:
                conn = await self.link.open()
            except BackendUnavailable:
                waiting, self._waiting = self._waiting, []
                for *_, entries, _ in waiting:
                    fail_entries(entries)
                await self.link.back_off(delay)  # while the backend is down
                delay = min(delay * 2, _MAX_BACKOFF_S)
                continue
            if self.link.closed:
                conn.close()
                return
            self._attach(conn)
            return

    def _attach(self, conn: BackendConnection) -> None:
        conn.on_lost = self._lost
        conn.on_pause = self._pause
        conn.on_dirty = self.link.mark_dirty
        self.conn = conn
        self._retiring = False
        waiting, self._waiting = self._waiting, []
        for db, proto, payload, entries, after in waiting:
            conn.send(db, proto, payload, entries, after)

    def _lost(self, conn: BackendConnection, exc: Exception | None) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        self._pause(False)
        if not self.link.closed:
            log.warning("shared backend connection %d to %s lost%s; reconnecting",
                        self.index, conn.node, f": {exc}" if exc else "")
            self.link.lost_count += 1
            self.connect()

    def _pause(self, paused: bool) -> None:
        """Redis stops reading this connection: stop reading its clients (crosswise)."""
        if paused == self.paused:
            return
        self.paused = paused
        for user in list(self.users):
            user.backend_paused(paused)

    def retire(self) -> None:
        """Backend settings changed: the next requests go on a new connection, once the
        current one has answered what is in flight (a client's order is kept)."""
        conn = self.conn
        if conn is None:
            return
        self._retiring = True

        def swap(done: BackendConnection) -> None:
            if done is self.conn and self._retiring:
                done.on_lost = None
                done.close()
                self.conn = None
                self.connect()

        if conn.busy:
            conn.on_idle = swap
        else:
            swap(conn)

    @property
    def in_flight(self) -> int:
        return len(self.conn.fifo) if self.conn is not None else 0


class NodeLink:
    """The connections to one backend node."""

    def __init__(self, cfg: BackendConfig, ssl_context: ssl.SSLContext | None,
                 mark_dirty: Callable[[BackendConnection], None]) -> None:
        self.cfg = cfg
        self.ssl_context = ssl_context
        self.mark_dirty = mark_dirty
        self.auth = auth_command(cfg)
        self.pipelines = [Pipeline(self, i) for i in range(max(1, cfg.shared_connections))]
        self._next = 0
        self._idle: deque[BackendConnection] = deque()
        self._filling: asyncio.Task[None] | None = None
        self.closed = False
        self.healthy = False  # the last connection attempt succeeded (/readyz, metrics)
        self.last_error: str | None = None
        self.dedicated_out = 0  # dedicated connections held by clients now
        self.lost_count = 0
        self.server_info: list[Any] | None = None  # HELLO's reply (RESP2 form)
        self.databases: int | None = None  # how many databases SELECT accepts
        self._watching: asyncio.Task[None] | None = None
        self._up_again = asyncio.Event()  # set when the node comes back: ends back-offs
        self.checks = 0  # health checks run (tests, metrics)
        self._checking = 0  # a pooled connection out for a health check's PING
        self._out: weakref.WeakSet[BackendConnection] = weakref.WeakSet()  # dedicated, held

    @property
    def node(self) -> str:
        unix_socket = self.cfg.unix_socket
        return str(unix_socket) if unix_socket else f"{self.cfg.address}:{self.cfg.port}"

    # ------------------------------------------------------------ connections
    async def open(self) -> BackendConnection:
        """A new authenticated connection; BackendUnavailable if that fails."""
        try:
            conn = await open_connection(self.cfg, self.ssl_context, self.auth)
            if self.server_info is None or self.databases is None:
                await self._learn(conn)
        except BackendUnavailable as exc:
            self._failed(str(exc))
            raise
        except TimeoutError as exc:
            self._failed(f"{self.node} did not answer within connect_timeout_s")
            raise BackendUnavailable(self.last_error) from exc
        self._reachable()
        return conn

    def _reachable(self) -> None:
        if not self.healthy:
            log.info("backend %s reachable", self.node)
            self.healthy = True
            self._up_again.set()
            self._up_again = asyncio.Event()
        self.last_error = None

    async def back_off(self, delay: float) -> None:
        """Wait `delay` before trying again, or less if the node is seen up meanwhile."""
        try:
            await asyncio.wait_for(self._up_again.wait(), delay)
        except TimeoutError:
            pass

    def _failed(self, message: str) -> None:
        if self.healthy or self.last_error != message:
            log.warning("backend unavailable: %s", message)
        self.healthy = False
        self.last_error = message

    async def _learn(self, conn: BackendConnection) -> None:
        """What the proxy answers for Redis without asking it each time: HELLO's server
        fields, and how many databases SELECT accepts."""
        timeout = self.cfg.connect_timeout_s
        info = await conn.request(encode_command([b"HELLO"]), timeout)
        if isinstance(info, list):
            self.server_info = info
        reply = await conn.request(encode_command([b"CONFIG", b"GET", b"databases"]), timeout)
        if isinstance(reply, list) and len(reply) == 2:
            self.databases = int(reply[1])
        else:  # the proxy's user may not run CONFIG: find the count with SELECT
            self.databases = await _count_databases(conn, timeout)
        if self.databases:
            await conn.request(encode_command([b"SELECT", b"0"]), timeout)

    def start(self) -> None:
        for pipeline in self.pipelines:
            pipeline.connect()
        self._refill()
        self._watching = asyncio.get_running_loop().create_task(self._watch())

    # ------------------------------------------------------------ health
    async def _watch(self) -> None:
        while not self.closed:
            half = self.cfg.health_interval_s / 2
            await asyncio.sleep(half)
            try:
                await self.check(half)
            except Exception:  # a bug here must not end the checks for good
                log.exception("backend %s: health check failed", self.node)

    async def check(self, timeout: float) -> bool:
        """One health check: PING on an idle pooled connection (a new one if none is
        idle); False, and the node marked down, when it does not answer PONG in time."""
        self.checks += 1
        for pipeline in self.pipelines:  # shared slots come back without traffic
            if pipeline.conn is None or pipeline.conn.closed:
                pipeline.connect()
        self._refill()
        conn = self._take_idle()
        if conn is None:
            try:
                conn = await self.open()
            except BackendUnavailable:
                return False  # open() marked the node down
        else:
            self._checking += 1  # still the pool's: the refill must not replace it
        try:
            reply = await conn.request(_PING, timeout)
        except (TimeoutError, BackendUnavailable) as exc:
            conn.abort()
            self._failed(f"{self.node} did not answer PING within {timeout:g} s"
                         if isinstance(exc, TimeoutError) else str(exc))
            return False
        finally:
            self._checking = 0
        if reply != b"PONG":
            conn.abort()
            self._failed(f"{self.node} answered PING with {reply!s:.200}")
            return False
        self._reachable()
        if self.closed or len(self._idle) >= self.cfg.pool_size:
            conn.close()  # pool_size = 0: the check's own connection is not kept
        else:
            self._idle.append(conn)
        return True

    def _take_idle(self) -> BackendConnection | None:
        while self._idle:
            conn = self._idle.popleft()
            if not conn.closed and not conn.busy:
                return conn
        return None

    def pipeline(self) -> Pipeline:
        """The shared slot for a new client (round robin)."""
        pipeline = self.pipelines[self._next % len(self.pipelines)]
        self._next += 1
        return pipeline

    # ------------------------------------------------------------ dedicated pool
    def take_dedicated(self) -> BackendConnection | None:
        """A ready dedicated connection, or None (then `open_dedicated`)."""
        conn = self._take_idle()
        if conn is not None:
            self.dedicated_out += 1
            self._out.add(conn)
        self._refill()
        return conn

    async def open_dedicated(self) -> BackendConnection:
        conn = await self.open()
        self.dedicated_out += 1
        self._out.add(conn)
        return conn

    def give_back(self, conn: BackendConnection, reusable: bool) -> None:
        """A client is done with its dedicated connection: RESET (and AUTH again, since
        RESET logs out) and keep it, or close it."""
        self.dedicated_out -= 1
        self._out.discard(conn)
        conn.owner = None
        conn.on_pause = None
        if not reusable or conn.closed or conn.busy or self.closed \
                or len(self._idle) >= max(self.cfg.pool_size, 1):
            conn.close()
            return
        conn.on_dirty = self.mark_dirty
        conn.send_own(_RESET + (self.auth or b""), 2 if self.auth else 1)
        conn.db, conn.proto = 0, 2

        def reset_done(done: BackendConnection) -> None:
            done.on_idle = None
            if not done.closed:
                self._idle.append(done)

        conn.on_idle = reset_done

    def _refill(self) -> None:
        if self.closed or self.cfg.pool_size == 0:
            return
        if self._filling is None or self._filling.done():
            self._filling = asyncio.get_running_loop().create_task(self._fill())

    async def _fill(self) -> None:
        delay = 0.1
        while not self.closed and self.idle_count + self._checking < self.cfg.pool_size:
            try:
                conn = await self.open()
            except BackendUnavailable:
                await self.back_off(delay)
                delay = min(delay * 2, _MAX_BACKOFF_S)
                continue
            delay = 0.1
            if self.closed:
                conn.close()
                return
            self._idle.append(conn)

    @property
    def idle_count(self) -> int:
        if any(c.closed for c in self._idle):
            self._idle = deque(c for c in self._idle if not c.closed)
        return len(self._idle)

    @property
    def connections(self) -> int:
        """Open backend connections: shared, idle in the pool, held by clients."""
        shared = sum(1 for p in self.pipelines if p.conn is not None and not p.conn.closed)
        return shared + self.idle_count + self.dedicated_out

    def move_to(self, cfg: BackendConfig) -> None:
        """The node moved (a Sentinel failover): from now on every connection goes to
        `cfg`'s address. What was in flight on the old node is answered `backend
        unavailable` at once (it may have run there: never retried), shared slots
        reconnect to the new node, and clients holding a dedicated connection (their
        transaction, subscriptions or blocking call lived on the old node) are told and
        closed (Session.backend_lost)."""
        self.cfg = cfg
        self.server_info = None
        self._failed(f"{self.node}: the primary moved here; reconnecting")
        while self._idle:
            self._idle.popleft().abort()
        for conn in list(self._out):
            conn.abort()
        for pipeline in self.pipelines:
            if pipeline.conn is not None:
                pipeline.conn.abort()  # connection_lost: fail the FIFO, reconnect
            else:
                pipeline.connect()
        self._refill()

    def reconfigure(self, cfg: BackendConfig, ssl_context: ssl.SSLContext | None) -> None:
        """Reload changed the backend settings: every new connection uses them; shared
        connections are replaced once idle, pooled ones at once."""
        self.cfg, self.ssl_context, self.auth = cfg, ssl_context, auth_command(cfg)
        self.server_info = self.databases = None
        while self._idle:
            self._idle.popleft().close()
        for pipeline in self.pipelines:
            pipeline.retire()
        self._refill()

    async def close(self) -> None:
        self.closed = True
        for task in (self._filling, self._watching):
            if task is not None:
                task.cancel()
        while self._idle:
            self._idle.popleft().close()
        for pipeline in self.pipelines:
            if pipeline._connecting is not None:
                pipeline._connecting.cancel()
            if pipeline.conn is not None:
                pipeline.conn.on_lost = None
                pipeline.conn.close()


async def _count_databases(conn: BackendConnection, timeout: float) -> int:
    """The number of databases, found with SELECT alone (it fails past the last one)."""

    async def exists(db: int) -> bool:
        return await conn.request(encode_command([b"SELECT", str(db).encode()]),
                                  timeout) == b"OK"

    if not await exists(0):
        return 0
    low, high = 0, 1  # low exists; find a high that does not
    while high < 2**31 and await exists(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if await exists(middle):
            low = middle
        else:
            high = middle
    return low + 1
