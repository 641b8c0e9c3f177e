"""The seam between client sessions and backend nodes.

A Session asks its Router for two things only: the shared `Pipeline` its stateless
requests go to, and a dedicated connection while it holds connection state (given back
when it no longer does). Where those lead is the Router's business: one node
(`StandaloneRouter`, TCP+TLS or a unix socket), and later the primary that Sentinel
names, or a Redis Cluster's nodes by slot. Every connection's bytes of one loop iteration
leave in one write (`flush`), whichever clients they came from.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Protocol

from proxy.backend.connection import BackendConnection, BackendUnavailable
from proxy.backend.link import NodeLink, Pipeline
from proxy.config import BackendConfig


class Router(Protocol):
    healthy: bool
    last_error: str | None

    @property
    def idle_count(self) -> int: ...
    @property
    def databases(self) -> int | None: ...
    @property
    def server_info(self) -> list[Any] | None: ...
    @property
    def auth(self) -> bytes | None: ...

    def pipeline(self) -> Pipeline: ...
    def take_dedicated(self) -> BackendConnection | None: ...
    async def open_dedicated(self) -> BackendConnection: ...
    def give_back(self, conn: BackendConnection, reusable: bool) -> None: ...
    async def open(self) -> BackendConnection: ...
    def flush(self) -> None: ...
    def start(self) -> None: ...
    def reconfigure(self, cfg: BackendConfig, ssl_context: ssl.SSLContext | None) -> None: ...
    async def close(self) -> None: ...


class WriteCoalescer:
    """Connections with bytes to send in this loop iteration; written once each."""

    def __init__(self) -> None:
        self._dirty: list[BackendConnection] = []
        self._scheduled = False

    def mark(self, conn: BackendConnection) -> None:
        self._dirty.append(conn)
        if not self._scheduled:
            # Bytes queued outside a read batch (a reply released held requests, a
            # dedicated connection arrived) still leave in this iteration's tail.
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush()


class StandaloneRouter:
    """One Redis node."""

    def __init__(self, cfg: BackendConfig, ssl_context: ssl.SSLContext | None) -> None:
        self._writes = WriteCoalescer()
        self.link = NodeLink(cfg, ssl_context, self._writes.mark)

    # Health and what the proxy answers itself.
    @property
    def healthy(self) -> bool:
        return self.link.healthy

    @property
    def last_error(self) -> str | None:
        return self.link.last_error

    @property
    def idle_count(self) -> int:
        return self.link.idle_count

    @property
    def connections(self) -> int:
        return self.link.connections

    @property
    def dedicated_out(self) -> int:
        return self.link.dedicated_out

    @property
    def databases(self) -> int | None:
        return self.link.databases

    @property
    def server_info(self) -> list[Any] | None:
        return self.link.server_info

    @property
    def auth(self) -> bytes | None:
        return self.link.auth

    # Where requests go.
    def pipeline(self) -> Pipeline:
        return self.link.pipeline()

    def take_dedicated(self) -> BackendConnection | None:
        conn = self.link.take_dedicated()
        if conn is not None:
            conn.on_dirty = self._writes.mark
        return conn

    async def open_dedicated(self) -> BackendConnection:
        conn = await self.link.open_dedicated()
        conn.on_dirty = self._writes.mark
        return conn

    def give_back(self, conn: BackendConnection, reusable: bool) -> None:
        self.link.give_back(conn, reusable)

    async def open(self) -> BackendConnection:
        """A connection for the proxy's own use (learn_commands); the caller closes it."""
        return await self.link.open()

    def flush(self) -> None:
        self._writes.flush()

    def start(self) -> None:
        self.link.start()

    def reconfigure(self, cfg: BackendConfig, ssl_context: ssl.SSLContext | None) -> None:
        self.link.reconfigure(cfg, ssl_context)

    async def close(self) -> None:
        await self.link.close()


def make_router(cfg: BackendConfig, ssl_context: ssl.SSLContext | None) -> StandaloneRouter:
    """The router for `[backend] mode`: standalone, or the primary Sentinel names."""
    if cfg.mode == "sentinel":
        from proxy.backend.sentinel import SentinelRouter

        return SentinelRouter(cfg, ssl_context)
    return StandaloneRouter(cfg, ssl_context)


__all__ = ["BackendUnavailable", "Router", "StandaloneRouter", "make_router"]
