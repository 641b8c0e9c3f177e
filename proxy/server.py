"""The listener: network allowlist and limits before the handshake, mutual TLS, identity,
one Session per client, and signal handling (SIGTERM/SIGINT drain and exit 0).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import itertools
import logging
import os
import signal
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

from proxy import __version__, heap
from proxy.audit.writer import AuditWriter
from proxy.backend import BackendUnavailable, make_router
from proxy.clientcert import ClientCertChecks, strict_refusal, verified_chain
from proxy.commands import table as command_tables
from proxy.commands.table import CommandTable
from proxy.config import Config, backend_node
from proxy.events import Events
from proxy.gate import AuditGate
from proxy.identity import Identity, identity_from_der, map_role
from proxy.lockout import FAILURE_REASONS, Lockout
from proxy.metrics import Metrics, identity_label
from proxy.policy.decision import Decision
from proxy.policy.glob import compile_patterns
from proxy.protect.transform import make_protector
from proxy.reload import expiry_warnings, reload
from proxy.session import Session, SessionContext
from proxy.tls import backend_context, listener_context, strictness_warning

log = logging.getLogger("phiproxy.server")

Decide = Callable[[Any, list[bytes]], Decision]


class ServerState:
    """Everything the listener and sessions share: configuration, policy, the backend
    router, the audit gate, events. Sessions see only `session_context` and the hooks."""

    def __init__(self, config: Config, decide: Decide, roles: dict[str, Any],
                 events: Events | None = None, *, reuse_port: bool = False) -> None:
        self.config = config
        self.reuse_port = reuse_port  # --workers: several processes share the port
        self.decide = decide
        self.roles = roles
        # [encryption] keyring, loaded with the configuration; replaced on reload (the
        # [[protect]] rules are config.protection)
        self.cipher = config.encryption.cipher
        self.metrics = Metrics(roles=config.roles)
        self.events = events or Events(self.metrics)
        self.audit = AuditWriter(config.audit)
        self.is_phi_key = compile_patterns([p.encode() for p in config.audit.phi_keys])
        self.metrics.watch_audit(_AuditStatsView(self.audit.stats))
        self._conn_ids = itertools.count(1)
        self.listener_ssl = listener_context(config.listener)
        self.cert_checks = ClientCertChecks.load(config.listener.crl)
        self.router = make_router(config.backend, backend_context(config.backend))
        if hasattr(self.router, "on_failover"):
            self.router.on_failover = self._failover
        self.gate = AuditGate(self.audit.write_ahead, config.audit.fail_closed,
                              after_release=self.router.flush, on_failing=self._audit_failing)
        self.session_context = SessionContext(
            limits=config.limits, idle_timeout_s=config.listener.idle_timeout_s,
            drain_timeout_s=config.listener.drain_timeout_s, is_phi=self.is_phi_key,
            gate=self.gate, router=self.router, hooks=self,
            observe_latency=self.metrics.proxy_latency.observe,
            observe_rtt=self.metrics.backend_rtt.observe, deferred=False,
            protector=make_protector(config, self.command_table))
        lock = config.lockout
        # Two lockouts: failures without a usable certificate count against the source
        # address, failures with a trusted one against that certificate (proxy.lockout).
        self.lockout = Lockout(lock.failures, lock.window_s, lock.block_s) if lock.enabled \
            else None
        self.cert_lockout = Lockout(lock.failures, lock.window_s, lock.block_s) \
            if lock.enabled else None
        self.metrics.set_server_cert(config.listener.cert)
        self.metrics.set_client_ca(config.listener.client_ca)
        self.metrics.watch_backend(lambda: (self.router.healthy, self.router.idle_count))
        if self.lockout is not None and self.cert_lockout is not None:
            self.metrics.watch_lockout(self.lockout.blocked_count,
                                       self.cert_lockout.blocked_count)
        self.networks = config.listener.allow_networks
        self.sessions: set[Session] = set()
        self.trimmer = heap.Trimmer()  # memory back to the system after connection storms
        self.handshaking = 0
        self.drain_timeout_s = config.listener.drain_timeout_s

    def readiness(self) -> tuple[bool, str]:
        """For /readyz (called from the metrics thread): backend reachable, audit writable."""
        if not self.router.healthy:
            return False, f"backend unavailable: {self.router.last_error or 'not connected yet'}"
        if self.gate.failing:
            return False, "audit unavailable: the last audit write failed"
        if self.audit.stats.fsync_failing:
            return False, "audit not durable: the last fsync of the audit trail failed"
        return True, "ready"

    @property
    def command_table(self) -> CommandTable:
        """The table the live roles use (with learn_commands, the extended copy)."""
        role = next(iter(self.roles.values()), None)
        return role.table if role is not None else command_tables.default_table()

    def apply_to_sessions(self, config: Config) -> None:
        """Reload: the settings sessions read live."""
        ctx = self.session_context
        ctx.protector = make_protector(config, self.command_table)
        ctx.limits = config.limits
        ctx.max_reply_buffer_bytes = config.limits.max_reply_buffer_bytes
        ctx.idle_timeout_s = config.listener.idle_timeout_s
        ctx.drain_timeout_s = self.drain_timeout_s = config.listener.drain_timeout_s
        self.gate.fail_closed = config.audit.fail_closed

    @property
    def audit_failing(self) -> bool:
        return self.gate.failing

    def flush_reads(self) -> None:
        self.gate.flush()

    def next_conn_id(self) -> int:
        return next(self._conn_ids)

    def _audit_failing(self, failing: bool) -> None:
        """The write-ahead audit write started (or stopped) failing."""
        if failing:
            log.error("audit write failed: PHI commands are refused until the audit sink "
                      "works again (%s)", self.config.audit.path)
        else:
            log.warning("audit sink works again")

    @property
    def connections(self) -> int:
        return len(self.sessions) + self.handshaking

    def source_allowed(self, host: str) -> bool:
        return _in_networks(host, self.networks)

    def source_exempt(self, host: str) -> bool:
        """`[lockout] exempt_networks`: never blocked as a source."""
        exempt = self.config.lockout.exempt_networks
        return bool(exempt) and _in_networks(host, exempt)

    def start_session(self, tls: asyncio.Transport, src: str) -> None:
        """A completed handshake: certificate -> identity -> role -> Session, or close."""
        ssl_object = tls.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:  # cannot happen with CERT_REQUIRED; fail closed anyway
            self.refused("no_client_cert", src)
            tls.abort()
            return
        fingerprint = hashlib.sha256(der).hexdigest()
        if self.cert_lockout is not None and self.cert_lockout.blocked(fingerprint):
            self.refused("lockout", src)  # before any parsing or identity work
            tls.abort()
            return
        try:
            refusal = self.cert_checks.check(verified_chain(ssl_object))
        except (AttributeError, ValueError) as exc:  # no chain to check: fail closed
            self.refused("tls_error", src, f"verified chain unavailable: {exc}")
            tls.abort()
            return
        if refusal is not None:
            self.refused(refusal.reason, src, refusal.detail, subject=refusal.subject,
                         fingerprint=fingerprint)
            tls.abort()
            return
        identity = identity_from_der(der)
        mapped = map_role(self.config.identities, identity)
        if mapped is None or mapped[0] not in self.roles:
            problem: str | None = "no [[identities]] rule matches this certificate"
        else:
            problem = self.certificate_problem(identity, mapped[0])
        if problem is not None or mapped is None:
            self.events.identity_refused(src, identity.subject, identity.fingerprint, problem)
            self.audit.write_one(self.audit.records.identity_refused(
                conn=None, src=src, identity=identity, subject=identity.subject,
                reason=problem))
            self._certificate_failed(src, identity.subject, fingerprint)
            tls.close()
            return
        role_name, rule_index = mapped
        if self.cert_lockout is not None:
            self.cert_lockout.success(fingerprint)
        # A source's failures are not forgiven by a success from the same address: the
        # healthy service next to an attacker (or behind the same NAT) would launder
        # the attacker's failures. Use [lockout] exempt_networks for shared gateways.
        tls_info = {"version": ssl_object.version(), "cipher": ssl_object.cipher()[0]}
        self.events.connected(src, identity.subject, role_name, tls_info, identity.not_after)
        start_db = start_db_of(self.config.roles.get(role_name))
        databases = self.router.databases
        if databases is not None and start_db >= databases:
            problem = (f"role {role_name} starts in db {start_db} (its lowest in dbs), but the "
                       f"backend has {databases} databases")
            log.error("refusing %s: %s", src, problem)
            tls.close()
            return
        counts = self.metrics.command_counter(
            role_name, identity_label(self.config.identities[rule_index]))
        conn_id = self.next_conn_id()
        session = Session(self.session_context, conn_id,
                          self.audit.records.connection(conn_id, src, identity, role_name),
                          src, identity, role_name, self.roles[role_name], self.decide,
                          counts, start_db)
        session.tls_info = tls_info
        session.peer_der = der
        tls.set_protocol(session)
        session.connection_made(tls)

    def certificate_problem(self, identity: Identity, role_name: str) -> str | None:
        """Why this role may not use this certificate (max_cert_validity_h), or None."""
        role_cfg = self.config.roles.get(role_name)
        limit = role_cfg.max_cert_validity_h if role_cfg is not None else None
        hours = identity.validity_hours
        if limit is not None and (hours is None or hours > limit):
            return (f"certificate valid for {hours:.1f} h; role {role_name} accepts at most "
                    f"{limit:g} h (max_cert_validity_h)")
        return None

    def refused(self, reason: str, src: str, detail: str = "", *,
                subject: str | None = None, fingerprint: str | None = None) -> None:
        """A connection refused before a session; TLS and identity failures feed the lockout:
        with `fingerprint` (a certificate that chained to a trusted CA) against that
        certificate, without it against the source address."""
        self.events.refused(reason, src, detail, quiet=reason == "lockout")
        self.trimmer.closed()
        if reason not in ("client_closed", "lockout"):
            self.audit.write_one(self.audit.records.tls_failed(
                conn=None, src=src, reason=f"{reason}: {detail}" if detail else reason,
                subject=subject, fingerprint=fingerprint))
        if reason not in FAILURE_REASONS:
            return
        if fingerprint is not None:
            self._certificate_failed(src, subject or "", fingerprint)
            return
        host = src.rsplit(":", 1)[0]
        if self.lockout is not None and not self.source_exempt(host) \
                and self.lockout.failure(host):
            self._locked_out(src)

    def _certificate_failed(self, src: str, subject: str, fingerprint: str) -> None:
        lockout = self.cert_lockout
        if lockout is None or not lockout.failure(fingerprint):
            return
        self.events.certificate_locked_out(src, subject, fingerprint, lockout.failures,
                                           lockout.block_s)
        self.audit.write_one(self.audit.records.lockout(
            src=src, identity={"cn": None, "san_uri": None, "fingerprint": fingerprint},
            blocked={"kind": "certificate", "fingerprint": fingerprint, "subject": subject},
            failures=lockout.failures, window_s=lockout.window_s, block_s=lockout.block_s,
            reason=f"lockout: certificate blocked for {lockout.block_s:g} s after "
                   f"{lockout.failures} failures (revoked, expired, unmapped or over "
                   "max_cert_validity_h); its source address is not blocked"))

    def _locked_out(self, src: str) -> None:
        """A source just crossed the failure threshold: logged once and audited."""
        assert self.lockout is not None
        lockout = self.lockout
        self.events.locked_out(src, lockout.failures, lockout.block_s)
        self.audit.write_one(self.audit.records.lockout(
            src=src, identity=None,
            blocked={"kind": "source", "address": src.rsplit(":", 1)[0]},
            failures=lockout.failures, window_s=lockout.window_s, block_s=lockout.block_s,
            reason=f"lockout: source blocked for {lockout.block_s:g} s after "
                   f"{lockout.failures} TLS/identity failures"))

    def _failover(self, old: tuple[str, int], new: tuple[str, int]) -> None:
        """Sentinel moved the primary: on record, and counted (an alert watches it)."""
        self.metrics.backend_failovers += 1
        self.audit.write_one(self.audit.records.failover(
            old=f"{old[0]}:{old[1]}", new=f"{new[0]}:{new[1]}",
            master_name=self.config.backend.master_name))

    def l4_probe(self, src: str) -> None:
        """Connected and closed (or reset) before sending a byte: a health check."""
        self.events.l4_probe(src)

    # Session callbacks (the audit issue records these).
    def session_started(self, session: Session) -> None:
        self.sessions.add(session)
        info = session.tls_info
        self.audit.write_one(session.audit_conn.connect(
            tls_version=info.get("version"), cipher=info.get("cipher")))

    def session_ended(self, session: Session, reason: str) -> None:
        self.trimmer.closed()
        if session in self.sessions:
            self.sessions.discard(session)
            self.audit.write_one(session.audit_conn.disconnect(
                duration_s=round(time.monotonic() - session.started, 6),
                commands=session.commands, bytes_in=session.bytes_in,
                bytes_out=session.bytes_out, reason=reason))
            self.events.disconnected(session.src, session.identity.subject, session.commands,
                                     reason)

    def command_refused(self, session: Session, decision: Decision) -> None:
        self.metrics.denied(session.role_name, session.counts.identity,
                            decision.extra or "acl")

    def backend_lost(self, session: Session) -> None:
        self.events.backend_lost()

    def protocol_error(self, src: str, message: str) -> None:
        self.events.protocol_error(src, message)


def _in_networks(host: str, networks: tuple[Any, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


def start_db_of(role: Any) -> int:
    """A role without database 0 starts in its lowest allowed one (Redis would put every
    client in db 0, where that role may not be)."""
    dbs = getattr(role, "dbs", None)
    return min(dbs) if dbs and 0 not in dbs else 0


def _tls_failure_reason(exc: BaseException) -> tuple[str, str]:
    """A short machine reason and the detail, for a failed client handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        strict = strict_refusal(exc)
        if strict is not None:  # name the RFC 5280 rule and the option that admits it
            return "cert_untrusted", strict
        message = exc.verify_message or str(exc)
        if "expired" in message:
            return "cert_expired", message
        if "revoked" in message:
            return "cert_revoked", message
        return "cert_untrusted", message
    if isinstance(exc, TimeoutError) or "taking longer" in str(exc):
        return "handshake_timeout", "no TLS handshake within the timeout"
    text = str(exc)
    lowered = text.lower()
    if "peer did not return a certificate" in lowered or "certificate required" in lowered:
        return "no_client_cert", text
    if "unsupported protocol" in lowered or "version too low" in lowered \
            or "no protocols available" in lowered:
        return "tls_version", text
    if "wrong version number" in lowered or "http request" in lowered \
            or "unknown protocol" in lowered or "record layer failure" in lowered:
        return "not_tls", text
    if "no shared cipher" in lowered:
        return "no_shared_cipher", text
    if isinstance(exc, ConnectionError):
        return "client_closed", text or type(exc).__name__
    return "tls_error", text or type(exc).__name__


class _AuditStatsView:
    """The audit writer's stats under the names the metrics module reads."""

    def __init__(self, stats: Any) -> None:
        self._stats = stats

    @property
    def written(self) -> int:
        return self._stats.records

    @property
    def failures(self) -> int:
        return self._stats.failures

    @property
    def writes(self) -> int:
        return self._stats.batches

    @property
    def depth(self) -> int:
        return self._stats.pending_records

    @property
    def fsyncs(self) -> int:
        return self._stats.fsyncs

    @property
    def fsync_failures(self) -> int:
        return self._stats.fsync_failures


TLS_SHUTDOWN_TIMEOUT_S = 1.0


class _Handshake(asyncio.Protocol):
    """Stands in until the TLS handshake is done; then the Session takes the transport."""

    def __init__(self, state: ServerState, src: str) -> None:
        self.state = state
        self.src = src

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called once the handshake has completed: map the identity and hand over at
        # once, so no client byte can arrive before the Session is in place.
        self.state.handshaking -= 1
        _ack_now(transport)
        self.state.start_session(transport, self.src)  # type: ignore[arg-type]


class Acceptor:
    """Accepts TCP connections itself, so a source is refused before any TLS byte is read."""

    def __init__(self, state: ServerState, sock: socket.socket) -> None:
        self.state = state
        self.sock = sock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._accept_forever())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.sock.close()

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(self.sock)
            except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                log.error("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            self._admit(conn, peer)

    def _admit(self, conn: socket.socket, peer: Any) -> None:
        state = self.state
        src = f"{peer[0]}:{peer[1]}"
        if not state.source_allowed(str(peer[0])):
            state.refused("network", src, "source address not in allow_networks")
            _reset(conn)
            return
        if state.lockout is not None and state.lockout.blocked(str(peer[0])):
            state.refused("lockout", src)
            _reset(conn)
            return
        if state.connections >= state.config.listener.max_connections:
            state.refused("max_connections", src)
            _reset(conn)
            return
        conn.setblocking(False)
        _tune_client_socket(conn, state.config.listener.tcp_keepalive)
        state.handshaking += 1
        asyncio.get_running_loop().create_task(self._handshake(conn, src))

    async def _handshake(self, conn: socket.socket, src: str) -> None:
        state = self.state
        handshake = _Handshake(state, src)
        loop = asyncio.get_running_loop()
        timeout = state.config.listener.handshake_timeout_s
        started = loop.time()
        try:
            if not await _first_byte(conn, timeout):
                state.handshaking -= 1
                state.l4_probe(src)
                conn.close()
                return
            await loop.connect_accepted_socket(
                lambda: handshake, conn, ssl=state.listener_ssl,
                ssl_handshake_timeout=max(0.1, timeout - (loop.time() - started)),
                # Closing waits this long for our last bytes and the client's close_notify,
                # then drops the connection: a client that keeps writing and never reads
                # (Redis's test suite after a protocol error) is gone within a second, as
                # Redis closes at once; a well-behaved one answers in microseconds.
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT_S)
        except (TimeoutError, ssl.SSLError, OSError, ConnectionError) as exc:
            state.handshaking -= 1
            reason, detail = _tls_failure_reason(exc)
            state.refused(reason, src, detail)
            _reset(conn)
        except asyncio.CancelledError:
            state.handshaking -= 1
            _reset(conn)
            raise


async def _first_byte(conn: socket.socket, timeout: float) -> bool:
    """Wait until the client sends its first byte (peeked, left for the TLS layer): True;
    False when it closes or resets first (an L4 health check); TimeoutError when neither
    happens in time. A ClientHello is usually queued already: then one recv, no wait."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    fd = conn.fileno()
    while True:
        try:
            return bool(conn.recv(1, socket.MSG_PEEK))
        except (BlockingIOError, InterruptedError):
            pass
        except ConnectionError:
            return False
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError
        readable = loop.create_future()
        loop.add_reader(fd, _set_once, readable)
        try:
            await asyncio.wait_for(readable, left)
        finally:
            loop.remove_reader(fd)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _reset(conn: socket.socket) -> None:
    """Close at once with a reset: a refused client is owed nothing."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    conn.close()


def _ack_now(transport: asyncio.BaseTransport) -> None:
    """ACK the client's TLS 1.3 Finished now rather than after the kernel's delayed-ACK
    timer (up to 40 ms on Linux). The server sends nothing after that message (no session
    tickets), so a client whose socket uses Nagle (redis-benchmark's does) would hold its
    first command until that ACK came: a 40 ms stall on every new connection."""
    sock = transport.get_extra_info("socket")
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if sock is not None and quickack is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
        except OSError:
            pass


def _tune_client_socket(sock: Any, keepalive: bool) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if hasattr(socket, "TCP_KEEPIDLE"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
    except OSError:
        pass


async def learn_backend_commands(state: ServerState) -> None:
    """`backend.learn_commands`: add the backend's own commands that the shipped table lacks
    (a newer Redis), then compile the roles again so their rules cover them."""
    from proxy.commands.table import extend_from_command_reply
    from proxy.policy.engine import compile_roles
    from proxy.resp.request import encode_command

    try:
        conn = await state.router.open()
    except BackendUnavailable as exc:
        log.warning("learn_commands: backend unreachable (%s); using the shipped command "
                    "table (unknown commands stay refused)", exc)
        return
    try:
        reply = await conn.request(encode_command([b"COMMAND"]), 10.0)
    except (BackendUnavailable, TimeoutError) as exc:
        log.warning("learn_commands: COMMAND failed (%s); using the shipped table", exc)
        return
    finally:
        conn.close()
    if not isinstance(reply, list):
        log.warning("learn_commands: COMMAND was refused (%s); using the shipped table", reply)
        return
    # A copy: default_table() is cached and shared (other states, tests, explain).
    table = command_tables.default_table().copy()
    added = extend_from_command_reply(table, reply)
    state.roles = compile_roles(state.config.roles, table)
    state.metrics.add_commands(added)
    state.session_context.protector = make_protector(state.config, table)
    log.info("learn_commands: %d commands learned from the backend%s", len(added),
             f": {', '.join(added[:20])}" if added else "")


def listen_socket(address: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening TCP socket (IPv4 or IPv6 by the address); with reuse_port
    the kernel spreads connections over every process that listens on the port."""
    infos = socket.getaddrinfo(address or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, socktype, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(state: ServerState, *, ready: Callable[[], None] | None = None) -> int:
    """Listen until SIGTERM/SIGINT, then drain and return 0."""
    loop = asyncio.get_running_loop()
    cfg = state.config.listener
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: reload(state))
    state.audit.open(loop)
    state.session_context.deferred = state.audit.in_loop  # batch reads per loop iteration
    state.audit.write_one(state.audit.records.start(
        version=__version__, pid=os.getpid(), config=str(state.config.path)))
    if state.audit.recovery:
        log.warning("audit: %s", state.audit.recovery)
    for warning in expiry_warnings(state.config):
        log.warning("%s", warning)
    strictness = strictness_warning(state.config.listener)
    if strictness is not None:
        log.warning("%s", strictness)
    if state.config.backend.learn_commands:
        await learn_backend_commands(state)
    state.router.start()
    log.debug("heap settled in %.1f ms", heap.settle() * 1000)
    acceptor = Acceptor(state, listen_socket(cfg.address, cfg.port, state.reuse_port))
    acceptor.start()
    log.info("phiproxy listening on %s:%s (mutual TLS, min %s), backend %s",
             cfg.address, cfg.port, cfg.min_tls, backend_node(state.config.backend))
    if ready is not None:
        ready()
    await stop.wait()
    log.info("shutting down: no new connections, draining %d", len(state.sessions))
    acceptor.close()
    draining = len(state.sessions)
    for session in list(state.sessions):
        session.drain()

    def busy() -> list[Session]:  # not yet closing: still owed replies
        return [s for s in state.sessions
                if s.transport is not None and not s.transport.is_closing()]

    idle_closed = draining - len(busy())
    deadline = loop.time() + state.drain_timeout_s
    while busy() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    forced = len(busy())
    for session in list(state.sessions):
        if session.transport is not None and not session.transport.is_closing():
            session.close_reason = "shutdown: drain timeout"
        if session.transport is not None:
            session.transport.abort()  # also skips waiting for the peer's TLS close_notify
    await asyncio.sleep(0.1)  # let connection_lost record each disconnect
    await state.router.close()
    summary = (f"signal; {draining} connections: {idle_closed} idle closed at once, "
               f"{draining - idle_closed - forced} finished in-flight work, {forced} forced "
               f"after drain_timeout_s={state.drain_timeout_s:g}")
    log.info("stop: %s", summary)
    state.audit.write_one(state.audit.records.stop(reason=summary))
    await state.audit.drain(2.0)
    state.audit.close()
    log.info("stopped")
    return 0
