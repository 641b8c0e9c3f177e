"""A real Session and real BackendConnections over fake transports: the sharing, pinning
and reply-ordering logic driven with plain bytes, in milliseconds (as uvicorn tests its
protocols with a MockTransport)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from proxy.audit.record import AuditRecords
from proxy.backend.connection import BackendConnection
from proxy.backend.link import Pipeline
from proxy.commands.table import default_table
from proxy.config import LimitsConfig, RoleConfig
from proxy.gate import AuditGate
from proxy.identity import Identity
from proxy.metrics import CommandCounts
from proxy.policy.engine import compile_roles, decide
from proxy.policy.glob import compile_patterns
from proxy.session import Session, SessionContext

SERVER_INFO = [b"server", b"redis", b"version", b"7.0.15", b"proto", 2, b"id", 999,
               b"mode", b"standalone", b"role", b"master", b"modules", []]


class FakeTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.reading = True
        self.buffered = 0  # what get_write_buffer_size reports

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.data += data

    def take(self) -> bytes:
        data = bytes(self.data)
        self.data.clear()
        return data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class FakeLink:
    """What a Pipeline needs of its NodeLink."""

    closed = False
    lost_count = 0

    def __init__(self, router: FakeRouter) -> None:
        self.router = router

    def mark_dirty(self, conn: BackendConnection) -> None:
        self.router.dirty.append(conn)

    async def open(self) -> BackendConnection:
        return self.router.new_conn()


class FakeRouter:
    """A Router whose connections write to FakeTransports."""

    databases = 16
    server_info = SERVER_INFO

    def __init__(self, auth: bytes | None = None) -> None:
        self.auth = auth
        self.dirty: list[BackendConnection] = []
        self.conns: list[BackendConnection] = []
        self.given_back: list[tuple[BackendConnection, bool]] = []
        self.link = FakeLink(self)
        self.shared = Pipeline(self.link, 0)  # type: ignore[arg-type]
        self.shared._attach(self.new_conn())

    def new_conn(self) -> BackendConnection:
        conn = BackendConnection("fake:6379")
        conn.connection_made(FakeTransport())  # type: ignore[arg-type]
        conn.on_dirty = lambda c: self.dirty.append(c)
        self.conns.append(conn)
        return conn

    def pipeline(self) -> Pipeline:
        return self.shared

    def take_dedicated(self) -> BackendConnection | None:
        return self.new_conn()

    async def open_dedicated(self) -> BackendConnection:
        return self.new_conn()

    def give_back(self, conn: BackendConnection, reusable: bool) -> None:
        conn.owner = None
        self.given_back.append((conn, reusable))

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            conn.flush()


def wire(conn: BackendConnection) -> bytes:
    """What the proxy has written to a backend connection so far (taken)."""
    return conn.transport.take()  # type: ignore[union-attr]


class Hooks:
    def __init__(self) -> None:
        self.refused: list[str] = []
        self.lost = 0

    def session_started(self, session: Session) -> None: ...
    def session_ended(self, session: Session, reason: str) -> None: ...

    def command_refused(self, session: Session, decision: Any) -> None:
        self.refused.append(decision.command)

    def backend_lost(self, session: Session) -> None:
        self.lost += 1

    def protocol_error(self, src: str, message: str) -> None: ...


class Audit:
    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.fail = False

    def __call__(self, records: list[bytes]) -> bool:
        if self.fail:
            return False
        self.records.extend(records)
        return True


def identity() -> Identity:
    now = datetime.now(UTC)
    return Identity(subject="CN=app", cn="app", ous=(), san_dns=(), san_uris=(),
                    san_emails=(), fingerprint="ab" * 32, serial=1,
                    not_after=now + timedelta(days=1), not_before=now)


_ids = iter(range(1, 10**9))


def make_session(router: FakeRouter, acl: str = "+@all ~* &*", *, audit: Audit | None = None,
                 deferred: bool = False, hooks: Hooks | None = None,
                 limits: LimitsConfig | None = None) -> Session:
    role = compile_roles({"r": RoleConfig("r", acl)})["r"]
    audit = audit or Audit()
    ctx = SessionContext(
        limits=limits or LimitsConfig(), idle_timeout_s=0, drain_timeout_s=1,
        is_phi=compile_patterns([b"app:phi:*"]),
        gate=AuditGate(audit, fail_closed=True, after_release=router.flush),
        router=router, hooks=hooks or Hooks(),  # type: ignore[arg-type]
        observe_latency=lambda s: None, observe_rtt=lambda s: None, deferred=deferred)
    conn_id = next(_ids)
    src = f"127.0.0.1:{40000 + conn_id}"
    session = Session(ctx, conn_id, AuditRecords("test", "p").connection(
        conn_id, src, identity(), "r"), src, identity(), "r", role, decide,
        CommandCounts("r", "i", frozenset(default_table().commands)))
    session.connection_made(FakeTransport())  # type: ignore[arg-type]
    return session


def sent(session: Session) -> bytes:
    """What the client has received so far (taken)."""
    return session.transport.take()  # type: ignore[union-attr]


def cmd(*args: str | bytes) -> bytes:
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
