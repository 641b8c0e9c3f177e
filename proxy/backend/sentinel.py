"""`[backend] mode = "sentinel"`: the primary that Redis Sentinel names, followed across
failovers (SPEC §10).

The router asks the sentinels (TLS, the backend's ca/cert/key; each verified against
`server_name`, or its own address when none is set) `SENTINEL GET-MASTER-ADDR-BY-NAME`,
confirms the answer with `ROLE` on that node (a node still being promoted, or a demoted
old primary, is not used), and moves its one `NodeLink` there. It follows failovers two
ways: a subscription to `+switch-master` on a sentinel (at once), and the same question
every `health_interval_s` (a missed message, a partition). A move answers what was in
flight on the old primary `backend unavailable` (it may have run there: never retried),
sends new commands to the new one, and closes clients whose connection state lived on
the old one (NodeLink.move_to). Each move after the first is reported to `on_failover`
(the server writes a `failover` audit record and counts it).

Sessions see none of this: they keep their Pipeline, whose connection is replaced.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import hiredis

from proxy.backend.connection import BackendUnavailable, open_connection
from proxy.backend.router import StandaloneRouter
from proxy.config import BackendConfig
from proxy.resp.request import encode_command

log = logging.getLogger("phiproxy.backend")

Address = tuple[str, int]


class SentinelClient:
    """Questions to one sentinel over TLS, decoded with hiredis."""

    def __init__(self, address: Address, cfg: BackendConfig,
                 ssl_context: ssl.SSLContext | None) -> None:
        self.address = address
        self.cfg = cfg
        self.ssl_context = ssl_context

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self.address
        return await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=self.ssl_context,
            server_hostname=(self.cfg.server_name or host) if self.ssl_context else None),
            self.cfg.connect_timeout_s)

    async def ask(self, *argv: bytes) -> Any:
        reader, writer = await self.connect()
        try:
            writer.write(encode_command(list(argv)))
            return await asyncio.wait_for(_read_reply(reader), self.cfg.connect_timeout_s)
        finally:
            writer.close()


async def _read_reply(reader: asyncio.StreamReader, parser: Any = None) -> Any:
    parser = parser or hiredis.Reader()
    while True:
        reply = parser.gets()
        if reply is not False:
            return reply
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("the sentinel closed the connection")
        parser.feed(data)


class SentinelRouter(StandaloneRouter):
    """The primary of `master_name`, wherever the sentinels say it is."""

    def __init__(self, cfg: BackendConfig, ssl_context: ssl.SSLContext | None) -> None:
        super().__init__(cfg, ssl_context)
        self.sentinel_cfg = cfg
        self.primary: Address | None = None
        self.on_failover: Callable[[Address, Address], None] | None = None
        self.failovers = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()  # a +switch-master arrived: ask now
        self._closed = False
        self._linked = False

    @property
    def sentinels(self) -> list[SentinelClient]:
        cfg = self.sentinel_cfg
        return [SentinelClient(address, cfg, self.link.ssl_context) for address in cfg.sentinels]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow()), loop.create_task(self._listen())]

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await super().close()

    def reconfigure(self, cfg: BackendConfig, ssl_context: ssl.SSLContext | None) -> None:
        self.sentinel_cfg = cfg
        node = self.link.cfg
        super().reconfigure(replace(cfg, address=node.address, port=node.port,
                                    server_name=cfg.server_name or node.address),
                            ssl_context)
        self._changed.set()

    # ------------------------------------------------------------------ following
    async def _follow(self) -> None:
        """Ask at once, then every health_interval_s or when a switch was announced."""
        while not self._closed:
            try:
                await self.check()
            except Exception:  # a bug here must not stop the following for good
                log.exception("sentinel: checking the primary failed")
            try:
                await asyncio.wait_for(self._changed.wait(),
                                       self.sentinel_cfg.health_interval_s)
            except TimeoutError:
                pass
            self._changed.clear()

    async def check(self) -> Address | None:
        """Ask the sentinels for the primary and move there if it changed. Returns the
        primary in use."""
        address = await self.find()
        if address is not None and address != self.primary:
            self._move(address)
        return self.primary

    async def find(self) -> Address | None:
        """The primary the first sentinel that answers names, once ROLE on that node
        confirms it (the one in use is not asked again); None if there is none."""
        cfg = self.sentinel_cfg
        name = (cfg.master_name or "").encode()
        errors = []
        for sentinel in self.sentinels:
            try:
                reply = await sentinel.ask(b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME", name)
            except (OSError, TimeoutError, ssl.SSLError, ConnectionError) as exc:
                errors.append(f"{sentinel.address[0]}:{sentinel.address[1]}: {exc}")
                continue
            if not isinstance(reply, list) or len(reply) != 2:
                errors.append(f"{sentinel.address[0]}:{sentinel.address[1]} does not know "
                              f"'{cfg.master_name}' ({reply!r:.100})")
                continue
            address = (reply[0].decode(), int(reply[1]))
            if address == self.primary or await self._is_primary(address):
                return address
            return None  # named, but not (yet) a primary: ask again at the next check
        if errors and self.primary is None:
            self.link._failed("no sentinel named the primary: " + "; ".join(errors))
        return None

    async def _is_primary(self, address: Address) -> bool:
        node = self._node_cfg(address)
        try:
            conn = await open_connection(node, self.link.ssl_context, self.link.auth)
        except BackendUnavailable as exc:
            log.warning("sentinel named %s:%d as primary, but: %s", *address, exc)
            return False
        try:
            role = await conn.request(encode_command([b"ROLE"]), node.connect_timeout_s)
        except (BackendUnavailable, TimeoutError) as exc:
            log.warning("ROLE on %s:%d failed: %s", *address, exc)
            return False
        finally:
            conn.close()
        if isinstance(role, list) and role and role[0] == b"master":
            return True
        log.warning("sentinel named %s:%d as primary, but it says it is %r; asking again",
                    *address, role[0] if isinstance(role, list) and role else role)
        return False

    def _node_cfg(self, address: Address) -> BackendConfig:
        host, port = address
        cfg = self.sentinel_cfg
        return replace(cfg, address=host, port=port, server_name=cfg.server_name or host)

    def _move(self, address: Address) -> None:
        old, self.primary = self.primary, address
        if not self._linked:
            self.link.cfg = self._node_cfg(address)
            self._linked = True
            log.info("sentinel: primary of '%s' is %s:%d", self.sentinel_cfg.master_name,
                     *address)
            self.link.start()
            return
        log.warning("sentinel: failover of '%s': primary %s:%d -> %s:%d",
                    self.sentinel_cfg.master_name, *(old or ("?", 0)), *address)
        self.failovers += 1
        self.link.move_to(self._node_cfg(address))
        if self.on_failover is not None and old is not None:
            self.on_failover(old, address)

    async def _listen(self) -> None:
        """`+switch-master` from any sentinel that takes the subscription: ask at once."""
        delay = 0.1
        while not self._closed:
            for sentinel in self.sentinels:
                try:
                    reader, writer = await sentinel.connect()
                except (OSError, TimeoutError, ssl.SSLError):
                    continue
                try:
                    writer.write(encode_command([b"SUBSCRIBE", b"+switch-master"]))
                    parser = hiredis.Reader()
                    delay = 0.1
                    while not self._closed:
                        message = await _read_reply(reader, parser)
                        if isinstance(message, list) and len(message) == 3 \
                                and message[0] == b"message":
                            fields = message[2].split()
                            if fields and fields[0].decode() == self.sentinel_cfg.master_name:
                                self._changed.set()
                except (OSError, ConnectionError, ssl.SSLError):
                    pass
                finally:
                    writer.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def resolve_primary(cfg: BackendConfig,
                          ssl_context: ssl.SSLContext | None) -> BackendConfig:
    """For one-shot tools (scan-backend, keys rewrap): `cfg` as a standalone configuration
    of the primary the sentinels name now, confirmed with ROLE. BackendUnavailable when
    no sentinel names a primary that says it is one."""
    router = SentinelRouter(cfg, ssl_context)
    try:
        primary = await router.find()
    finally:
        await router.close()
    if primary is None:
        raise BackendUnavailable(router.last_error or
                                 f"no sentinel named a primary for '{cfg.master_name}'")
    return replace(router._node_cfg(primary), mode="standalone", sentinels=(),
                   master_name=None)
