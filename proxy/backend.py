"""Backend connections: TLS to Redis with the proxy's own credentials, and a pre-warmed pool.

Each client session owns one BackendConnection for its whole life, so every stateful Redis
feature (MULTI, SELECT, pub/sub, blocking commands, RESP3) stays correct. The pool keeps a
few connections handshaken and authenticated ahead of time, so a new client does not wait
for the backend TLS handshake.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from typing import Any, Protocol

import hiredis

from proxy.config import BackendConfig
from proxy.resp.request import encode_command

log = logging.getLogger("phiproxy.backend")


class BackendUnavailable(Exception):
    """The backend could not be reached, or refused the proxy's credentials."""


class BackendUser(Protocol):
    """What a BackendConnection reports to (the Session)."""

    def backend_data(self, data: bytes) -> None: ...
    def backend_lost(self, exc: Exception | None) -> None: ...
    def backend_pause_writing(self) -> None: ...
    def backend_resume_writing(self) -> None: ...


def auth_command(cfg: BackendConfig) -> bytes | None:
    """The AUTH the proxy sends on every new backend connection (and after a client RESET)."""
    if cfg.password is None:
        return None
    argv = [b"AUTH", cfg.password] if cfg.username is None else [
        b"AUTH", cfg.username.encode(), cfg.password]
    return encode_command(argv)


class BackendConnection(asyncio.Protocol):
    """One TLS connection to the backend; handed to exactly one session."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.user: BackendUser | None = None
        self.closed = False
        self._handshake_buffer = bytearray()  # bytes no session has taken yet
        self._reader: Any = None  # hiredis.Reader for the proxy's own request, if any
        self._reply_waiter: asyncio.Future[Any] | None = None
        self._paused_by_us = False

    # --- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _tune_socket(sock)

    def data_received(self, data: bytes) -> None:
        if self.user is not None:
            self.user.backend_data(data)
            return
        # Before a session owns it, the only replies are to the proxy's own requests.
        waiter = self._reply_waiter
        if waiter is None or waiter.done():
            self._handshake_buffer += data
            return
        try:
            self._reader.feed(data)
            reply = self._reader.gets()
        except hiredis.ProtocolError as exc:
            waiter.set_exception(BackendUnavailable(f"backend sent malformed RESP: {exc}"))
            return
        if reply is not False:
            waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._reply_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(BackendUnavailable("backend closed the connection"))
        if self.user is not None:
            self.user.backend_lost(exc)

    def pause_writing(self) -> None:
        if self.user is not None:
            self.user.backend_pause_writing()

    def resume_writing(self) -> None:
        if self.user is not None:
            self.user.backend_resume_writing()

    # --- used by the pool and the session
    async def request(self, command: bytes, timeout: float) -> Any:
        """Send one of the proxy's own commands before a session owns the connection and
        return its decoded reply (hiredis: errors come back as hiredis.ReplyError)."""
        assert self.transport is not None and self.user is None
        self._reader = hiredis.Reader()
        self._reply_waiter = asyncio.get_running_loop().create_future()
        self.transport.write(command)
        try:
            return await asyncio.wait_for(self._reply_waiter, timeout)
        finally:
            self._reply_waiter = None
            self._reader = None

    async def authenticate(self, command: bytes, timeout: float) -> None:
        reply = await self.request(command, timeout)
        if reply != b"OK":
            # Never echo the password; Redis's error text does not contain it.
            raise BackendUnavailable(f"backend refused the proxy's AUTH: {reply!s:.200}")

    def attach(self, user: BackendUser) -> None:
        """Hand the connection to a session; bytes that arrived meanwhile are delivered."""
        self.user = user
        if self._handshake_buffer:
            data = bytes(self._handshake_buffer)
            self._handshake_buffer.clear()
            user.backend_data(data)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _tune_socket(sock: Any) -> None:
    import socket

    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass


class BackendPool:
    """Opens authenticated backend connections and keeps `pool_size` of them ready."""

    def __init__(self, cfg: BackendConfig, ssl_context: ssl.SSLContext) -> None:
        self.cfg = cfg
        self.ssl_context = ssl_context
        self._auth = auth_command(cfg)
        self._idle: deque[BackendConnection] = deque()
        self._filling: asyncio.Task[None] | None = None
        self._closed = False
        self.healthy = False  # last connection attempt succeeded (for /readyz and metrics)
        self.last_error: str | None = None

    @property
    def auth(self) -> bytes | None:
        return self._auth

    @property
    def idle_count(self) -> int:
        return sum(1 for conn in self._idle if not conn.closed)

    async def open(self) -> BackendConnection:
        """A fresh authenticated connection; BackendUnavailable if that fails."""
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    BackendConnection,
                    cfg.address,
                    cfg.port,
                    ssl=self.ssl_context,
                    server_hostname=cfg.server_name,
                    ssl_handshake_timeout=cfg.connect_timeout_s,
                ),
                cfg.connect_timeout_s,
            )
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            self._failed(f"cannot connect to {cfg.address}:{cfg.port}: {exc or type(exc).__name__}")
            raise BackendUnavailable(self.last_error) from exc
        if self._auth is not None:
            try:
                await conn.authenticate(self._auth, cfg.connect_timeout_s)
            except (TimeoutError, BackendUnavailable) as exc:
                conn.abort()
                self._failed(str(exc) or "AUTH timed out")
                raise BackendUnavailable(self.last_error) from exc
        if not self.healthy:
            log.info("backend %s:%s reachable", cfg.address, cfg.port)
        self.healthy = True
        self.last_error = None
        return conn

    def _failed(self, message: str) -> None:
        if self.healthy or self.last_error != message:
            log.warning("backend unavailable: %s", message)
        self.healthy = False
        self.last_error = message

    async def acquire(self) -> BackendConnection:
        """A ready connection from the pool, or a new one; the pool refills behind."""
        while self._idle:
            conn = self._idle.popleft()
            if not conn.closed:
                self._refill()
                return conn
        self._refill()
        return await self.open()

    def start(self) -> None:
        self._refill()

    def _refill(self) -> None:
        if self._closed or self.cfg.pool_size == 0:
            return
        if self._filling is None or self._filling.done():
            self._filling = asyncio.get_running_loop().create_task(self._fill())

    async def _fill(self) -> None:
        delay = 0.1
        while not self._closed and len(self._live_idle()) < self.cfg.pool_size:
            try:
                conn = await self.open()
            except BackendUnavailable:
                await asyncio.sleep(delay)  # back off while the backend is down
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            if self._closed:
                conn.close()
                return
            self._idle.append(conn)

    def _live_idle(self) -> deque[BackendConnection]:
        if any(c.closed for c in self._idle):
            self._idle = deque(c for c in self._idle if not c.closed)
        return self._idle

    async def close(self) -> None:
        self._closed = True
        if self._filling is not None:
            self._filling.cancel()
        while self._idle:
            self._idle.popleft().close()
