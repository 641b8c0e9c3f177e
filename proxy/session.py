"""One client connection: frame, decide, audit, send; hand replies back in order.

The Session is glue between narrow collaborators:
  - the request framer (`proxy.resp.request`) and the policy's `decide`;
  - the `AuditGate`, which decides a loop iteration's reads together and writes their
    records ahead of them (`run_queued` / `finish_queued`);
  - the client's `ReplyQueue` (`proxy.replies`: what the client is owed, in order, and
    its Redis state: db, protocol, subscriptions, MONITOR, CLIENT REPLY);
  - the `Router`: a shared pipelined backend connection for stateless requests, and a
    dedicated one, from a pool, while the client holds state a shared connection cannot
    carry (MULTI, WATCH, subscriptions, MONITOR, blocking commands, WAIT, CLIENT
    TRACKING/NO-EVICT/NO-TOUCH).

SELECT, HELLO, CLIENT SETNAME/GETNAME/SETINFO/ID/REPLY, AUTH, QUIT and (unpinned) RESET
are answered here, kept per client: a backend connection is put in the client's db and
protocol just before the client's requests (`BackendConnection.send`).

A client's requests are in flight on one backend connection at a time: moving between
the shared and a dedicated connection waits until nothing is in flight, holding what
comes meanwhile (already decided and audited), so Redis runs them in the client's order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from proxy.backend.connection import BackendConnection, BackendUnavailable
from proxy.backend.link import Pipeline, fail_entries
from proxy.backend.router import Router
from proxy.commands.table import default_table
from proxy.config import LimitsConfig
from proxy.gate import AuditGate, Batch, take_back
from proxy.identity import Identity
from proxy.metrics import CommandCounts
from proxy.policy.decision import Decision
from proxy.policy.errors import command_text, noperm_command, noperm_unfilterable_in_multi
from proxy.protect.transform import Plan, Protector, Refusal
from proxy.replies import (
    DENIED,
    EXEC,
    FILTER,
    MONITOR,
    MULTI,
    PLAIN,
    REPLACE,
    RESET,
    SILENT,
    SUB,
    SUB_KINDS,
    Pending,
    ReplyQueue,
    rewrite_exec,
    swallowed,
)
from proxy.resp import canned
from proxy.resp.request import ProtocolError, RequestFramer, encode_command
from proxy.resp.values import encode_hello, encode_nil, string2ll

log = logging.getLogger("phiproxy.session")

# Client bytes one session may have waiting for the end of the loop iteration (reads are
# batched per iteration so all their audit records go out in one write).
QUEUE_FLUSH_BYTES = 64 * 1024
# A dedicated connection is kept this long after the client's state is gone, so a
# worker looping on BLPOP or MULTI keeps one connection instead of churning the pool.
UNPIN_GRACE_S = 1.0

# Commands that block the connection they run on: never on a shared one.
_BLOCKING = frozenset(
    name for name, command in default_table().commands.items()
    if "blocking" in command.flags
) | {"wait", "waitaof"}
_BLOCK_OPTIONAL = frozenset({"xread", "xreadgroup"})  # only with BLOCK
_WAIT_MARKER = encode_command([b"PUBLISH", b"__phiproxy__:wait", b""])
_UNSUBSCRIBE = {b"unsubscribe", b"punsubscribe", b"sunsubscribe"}
# What Redis allows a RESP2 client in subscribed mode.
_SUBSCRIBED_OK = frozenset({b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe",
                            b"punsubscribe", b"sunsubscribe", b"ping", b"quit", b"reset"})
_RESET_REPLY = b"+RESET\r\n"


class SessionHooks(Protocol):
    """What a session reports (ServerState implements it: audit, events, metrics)."""

    def session_started(self, session: Session) -> None: ...
    def session_ended(self, session: Session, reason: str) -> None: ...
    def command_refused(self, session: Session, decision: Decision) -> None: ...
    def backend_lost(self, session: Session) -> None: ...
    def protocol_error(self, src: str, message: str) -> None: ...


class SessionContext:
    """What every session shares, and no more (ServerState builds it; a reload updates
    it in place)."""

    __slots__ = ("limits", "idle_timeout_s", "drain_timeout_s", "max_reply_buffer_bytes",
                 "is_phi", "gate", "router", "hooks", "observe_latency", "observe_rtt",
                 "deferred", "protector")

    def __init__(self, *, limits: LimitsConfig, idle_timeout_s: float,
                 drain_timeout_s: float, is_phi: Callable[[bytes], bool], gate: AuditGate,
                 router: Router, hooks: SessionHooks,
                 observe_latency: Callable[[float], None],
                 observe_rtt: Callable[[float], None], deferred: bool = True,
                 protector: Protector | None = None) -> None:
        self.limits = limits
        self.idle_timeout_s = idle_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.max_reply_buffer_bytes = limits.max_reply_buffer_bytes
        self.is_phi = is_phi
        self.gate = gate
        self.router = router
        self.hooks = hooks
        self.observe_latency = observe_latency
        self.observe_rtt = observe_rtt
        self.deferred = deferred  # False: each read is decided at once (no running loop)
        self.protector = protector  # [[protect]] rules and keys (None or falsy: none)


class Session(asyncio.Protocol):
    """The client side of one proxied connection (installed after the TLS handshake)."""

    # Slots: a Session has more attributes than CPython 3.11 shares dict keys for, so
    # without them each connection would carry its own ~3 KiB attribute dict.
    __slots__ = (
        "ctx", "counts", "conn_id", "audit_conn", "src", "identity", "role_name", "role",
        "_decide", "_framer", "queue", "transport", "bytes_in", "bytes_out", "peer_der",
        "tls_info", "close_reason", "commands", "started", "_records", "_batch",
        "_queued", "_queued_bytes", "_stop_reading", "_closing", "_shutting_down",
        "_paused_reasons", "_last_activity", "_idle_handle", "_received_at", "_rtt_start",
        "_pipeline", "_dedicated", "_pinned", "_held", "_acquiring", "_unpin_handle",
        "_in_multi", "_multi_dirty", "_multi_db", "_multi_selected", "_watching",
        "_multi_rewrites",
        "_tracking", "_flags", "name", "start_db",
    )

    def __init__(self, ctx: SessionContext, conn_id: int, audit_conn: Any, src: str,
                 identity: Identity, role_name: str, role: Any,
                 decide: Callable[[Any, list[bytes]], Decision], counts: CommandCounts,
                 start_db: int = 0) -> None:
        self.ctx = ctx
        self.counts = counts  # command name -> metrics slot [ok, error, denied]
        self.conn_id = conn_id
        self.audit_conn = audit_conn  # builds this connection's audit records
        self.src = src
        self.identity = identity
        self.role_name = role_name
        self.role = role
        self._decide = decide
        limits = ctx.limits
        self._framer: RequestFramer | None = RequestFramer(
            max_bulk_bytes=limits.max_bulk_bytes,
            max_query_buffer_bytes=limits.max_query_buffer_bytes,
            max_args=limits.max_args,
            max_inline_bytes=limits.max_inline_bytes,
        )
        self.queue = ReplyQueue(self._deliver)
        self.start_db = start_db  # a role without db 0 starts in its first allowed one
        self.queue.db = start_db
        self.transport: asyncio.Transport | None = None
        self.bytes_in = self.bytes_out = 0
        self.peer_der: bytes | None = None  # the client certificate, for reload checks
        self.tls_info: dict[str, str] = {}  # TLS version and cipher, for the connect record
        self.close_reason: str | None = None
        self.commands = 0
        self.started = time.monotonic()
        self._records: list[bytes] = []
        self._batch: Batch | None = None  # the read being decided
        self._queued: list[tuple[Any, Any, float]] = []  # (commands, raw, received_at)
        self._queued_bytes = 0
        self._stop_reading = False  # QUIT or a protocol error: later reads are ignored
        self._closing = False
        self._shutting_down = False
        self._paused_reasons: set[str] = set()
        self._last_activity = self.started
        self._idle_handle: asyncio.TimerHandle | None = None
        self._received_at = 0.0  # perf_counter() of the read being handled
        self._rtt_start = 0.0  # when requests went to Redis with none in flight
        # Where requests go.
        self._pipeline: Pipeline | None = None  # the shared connection slot
        self._dedicated: BackendConnection | None = None
        self._pinned = False  # requests decided from now on need a dedicated connection
        self._held: list[tuple[int, int, bytes, list[Pending], Any, int]] | None = None
        self._acquiring = False
        self._unpin_handle: asyncio.TimerHandle | None = None
        # Connection state the proxy cannot keep for the client (it pins).
        self._in_multi = False
        self._multi_dirty = False  # a command of the transaction was refused here
        self._multi_rewrites = False  # it holds protected values: EXEC's reply rewritten
        self._multi_db = 0  # the db when MULTI began (an aborted EXEC goes back to it)
        self._multi_selected = False  # a SELECT was queued in the transaction
        self._watching = False
        self._tracking = False
        self._flags: set[bytes] = set()  # CLIENT NO-EVICT / NO-TOUCH that are on
        self.name: bytes | None = None  # CLIENT SETNAME

    # ------------------------------------------------------------------ client side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._pipeline = self.ctx.router.pipeline()
        self._pipeline.users.add(self)
        if self._pipeline.paused:
            self.backend_paused(True)
        self.ctx.hooks.session_started(self)
        self._schedule_idle_check()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_activity = time.monotonic()
        self._received_at = time.perf_counter()
        self.bytes_in += len(data)
        framer = self._framer
        if framer is None:  # a protocol error is queued: nothing after it is read
            return
        try:
            commands = framer.feed(data)
        except ProtocolError as exc:
            if self._queued:  # reported after the reads queued before it, in order
                self._framer = None
                self._queued.append((None, str(exc).encode(), 0.0))
            else:
                self._protocol_error(str(exc))
            return
        if not commands:
            return
        raw = data if framer.verbatim else None
        if not self.ctx.deferred:
            self._handle(commands, raw)
            return
        if not self._queued:
            self.ctx.gate.defer(self)
        self._queued.append((commands, raw, self._received_at))
        self._queued_bytes += len(data)
        if self._queued_bytes > QUEUE_FLUSH_BYTES:
            # A big burst from one client: handle it now, so that flow control (pausing
            # this client when its replies back up) acts within the burst.
            self.ctx.gate.flush()

    def eof_received(self) -> bool | None:
        # Over TLS (always, here) uvloop closes the transport after a close_notify whatever
        # this returns: what was read before it still runs (queued reads are flushed), its
        # replies may be lost (tests/integration/test_faults.py, xfail). Returning True
        # would only make uvloop log "returning true from eof_received() has no effect
        # when using ssl" at WARNING once per client that closes cleanly.
        self._closing = True
        self._close_when_drained()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._queued:  # what the client sent before it went still goes to Redis
            self.ctx.gate.flush()
        self._closing = True
        for handle in (self._idle_handle, self._unpin_handle):
            if handle is not None:
                handle.cancel()
        if self._pipeline is not None:
            self._pipeline.users.discard(self)
        conn = self._dedicated
        if conn is not None and self._held is None:
            self._dedicated = None
            self.ctx.router.give_back(conn, reusable=not conn.busy and not self._has_state())
        self.transport = None
        self.ctx.hooks.session_ended(
            self, self.close_reason or ("client closed" if exc is None else str(exc)))
        # The queue's sink is this session (a cycle): replies still owed are dropped
        # anyway, and without it refcounting frees the session now, not a full collection
        # later (heap.Trimmer: after a storm, those collections were 100-200 ms).
        self.queue.detach()

    def pause_writing(self) -> None:
        # The client reads slower than replies come: stop reading its requests. Its own
        # dedicated connection is paused too; a shared one cannot be, so the replies it
        # owes are buffered, within max_reply_buffer_bytes (`_deliver`).
        self._pause("client-write")
        if self._dedicated is not None and self._dedicated.transport is not None:
            self._dedicated.transport.pause_reading()

    def resume_writing(self) -> None:
        self._resume("client-write")
        if self._dedicated is not None and self._dedicated.transport is not None:
            self._dedicated.transport.resume_reading()

    # ------------------------------------------------------------------ requests
    def _handle(self, commands: list[list[bytes]], raw: bytes | None = None) -> None:
        """Decide, audit (write-ahead) and send one read's commands at once (used where
        reads are not batched per loop iteration)."""
        batch = self._prepare(commands, raw, self._received_at)
        ok = self.ctx.gate.write(batch.records) if batch.records else True
        self._finish(batch, ok)
        self.ctx.router.flush()
        if self._closing:
            self._close_when_drained()

    def run_queued(self) -> list[Batch]:
        """Gate step 1: prepare every read queued in this loop iteration, in order."""
        queued, self._queued = self._queued, []
        self._queued_bytes = 0
        batches = []
        for commands, raw, received_at in queued:
            if self._stop_reading:  # after QUIT or a protocol error nothing more is read
                break
            if commands is None:  # the framer failed on this read (raw holds the message)
                self._protocol_error(raw.decode())
                break
            batches.append(self._prepare(commands, raw, received_at))
        return batches

    def finish_queued(self, batches: list[Batch], ok: bool) -> None:
        """Gate step 3: send each prepared read (or take back its audited commands)."""
        for batch in batches:
            self._finish(batch, ok)
        if self._closing:
            self._close_when_drained()

    def _prepare(self, commands: list[list[bytes]], raw: bytes | None,
                 received_at: float) -> Batch:
        """Decide one read's commands: requests for Redis, reply entries, audit records.
        `raw`: the read's bytes when they are exactly these commands in canonical form
        (RequestFramer.verbatim): sent as they are if every command goes unchanged."""
        queue = self.queue
        batch = self._batch = Batch(queue.db, queue.proto, self._pinned, received_at)
        batch.multi = self._in_multi
        self._records = batch.records
        items, entries, qidx = batch.items, batch.entries, batch.qidx
        decide, role, counts, is_phi = self._decide, self.role, self.counts, self.ctx.is_phi
        protector = self.ctx.protector
        plain = handled = 0
        for argv in commands:
            handled += 1
            special = _SPECIAL.get(argv[0].lower())
            if special is not None:
                special(self, argv)
                if self._closing:  # QUIT
                    self._stop_reading = True
                    break
                continue
            if queue.monitor:
                self._local(canned.error(
                    "phiproxy: only QUIT is allowed on a MONITOR connection"))
                continue
            decision = decide(role, argv)
            allowed, command, _, _, _, _, reply_filter, sensitive, keys = decision
            if not allowed:
                self._refuse(decision)
                continue
            if reply_filter is not None:
                self._forward_filtered(argv, decision)
                continue
            plan = None
            if protector and (keys or sensitive):
                try:
                    plan = protector.plan(command, argv, keys, sensitive)
                except Refusal as refusal:
                    self._refuse(decision._replace(
                        allowed=False, reason=refusal.reason, extra="protected",
                        error=refusal.error))
                    continue
                if plan is not None and self._in_multi and (plan.reply or plan.extra):
                    self._multi_rewrites = True  # EXEC's array needs rewriting
            if command in _BLOCKING and not self._pinned and self._blocks(command, argv):
                self._pin()
            if sensitive or (keys and (is_phi(keys[0]) if len(keys) == 1
                                       else any(map(is_phi, keys)))):
                batch.audited.append(len(items))
                self._records.append(self.audit_conn.command(command, keys, queue.db))
            if plan is not None:
                self._add_protected(plan, counts[command])
                if not plan.changes_request(command):
                    plain += 1  # the client's bytes can still go as they are
                continue
            items.append(argv)
            entries.append(queue.plain(counts[command]))
            qidx.append(len(queue.entries) - 1)
            plain += 1
        self.commands += handled
        batch.multi = batch.multi or self._in_multi
        if raw is not None and plain == len(items) == len(commands) \
                and len(batch.segments) == 1:
            batch.raw = raw
        self._batch = None
        return batch

    def _add_protected(self, plan: Plan, slot: list[int]) -> None:
        """A command on a protected key as `plan` rewrote it, then the proxy's own
        follow-ups (a default TTL) whose replies the client never sees."""
        batch, queue = self._batch, self.queue
        assert batch is not None
        batch.items.append(plan.argv)
        if plan.reply is None:
            batch.entries.append(queue.plain(slot))
        elif queue.silence:
            batch.entries.append(queue.special(FILTER, slot, filter=plan.reply))
        else:  # queue.special() without its keyword plumbing: one per protected read
            entry = Pending(queue, FILTER, slot, filter=plan.reply)
            queue.entries.append(entry)
            batch.entries.append(entry)
        batch.qidx.append(len(queue.entries) - 1)
        for extra in plan.extra:
            batch.items.append(extra)
            batch.entries.append(queue.special(SILENT))
            batch.qidx.append(len(queue.entries) - 1)

    def _finish(self, batch: Batch, ok: bool) -> None:
        """Send a prepared read once its records are written; if they could not be (and
        fail_closed), its audited commands are taken back first."""
        took_back = False
        if self.ctx.gate.must_take_back(batch, ok):
            take_back(batch, self.queue)
            if self._in_multi or batch.multi:
                self._multi_dirty = True
            took_back = True
        items = batch.items
        if items:
            now = time.perf_counter()
            self.ctx.observe_latency(now - batch.received_at)
            segments = batch.segments
            for n, (start, db, proto, dedicated, after) in enumerate(segments):
                end = segments[n + 1][0] if n + 1 < len(segments) else len(items)
                if start == end:
                    continue
                if batch.raw is not None and not took_back:
                    payload, entries = batch.raw, batch.entries
                else:
                    kept = [i for i in range(start, end) if items[i] is not None]
                    if not kept:
                        continue
                    payload = b"".join([encode_command(items[i]) if type(items[i]) is list
                                        else items[i] for i in kept])
                    entries = [batch.entries[i] for i in kept]
                self._send(db, proto, payload, entries, after, dedicated)
        if took_back:
            out: list[bytes] = []
            self.queue.release(out)
            self._write(out)

    def _send(self, db: int, proto: int, payload: bytes, entries: list[Pending],
              after: Any, dedicated: bool) -> None:
        owned = sum(1 for entry in entries if entry.queue is not None)
        if self._held is not None or (dedicated and self._dedicated is None):
            self._hold((db, proto, payload, entries, after, owned))
            return
        if not self.queue.in_flight:
            self._rtt_start = time.perf_counter()
        self.queue.in_flight += owned
        if dedicated:
            self._dedicated.send(db, proto, payload, entries, after)  # type: ignore[union-attr]
        else:
            self._pipeline.send(db, proto, payload, entries, after)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ pinning
    def _blocks(self, command: str, argv: list[bytes]) -> bool:
        if command in _BLOCK_OPTIONAL:
            return any(arg.lower() == b"block" for arg in argv[1:])
        return not self._in_multi

    def _pin(self) -> None:
        """Requests from here on need a dedicated connection."""
        if self._unpin_handle is not None:
            self._unpin_handle.cancel()
            self._unpin_handle = None
        if self._pinned:
            return
        self._pinned = True
        if self._batch is not None:
            self._batch.cut(self.queue.db, self.queue.proto, True)

    def _has_state(self) -> bool:
        """State only a dedicated connection can carry."""
        queue = self.queue
        return (self._in_multi or self._watching or self._tracking or bool(self._flags)
                or queue.monitor or queue.subscribed or (queue.entries
                                                         and queue.entries[0].kind == SUB))

    def _hold(self, request: tuple[int, int, bytes, list[Pending], Any, int]) -> None:
        """Wait for the move to a dedicated connection (nothing may be in flight on the
        shared one: Redis must run the client's requests in its order)."""
        if self._held is None:
            self._held = []
        self._held.append(request)
        self._move_when_ready()

    def _move_when_ready(self) -> None:
        if self._held is None or self._acquiring or self.queue.in_flight:
            return
        conn = self.ctx.router.take_dedicated()
        if conn is not None:
            self._attach(conn)
            return
        self._acquiring = True
        asyncio.get_running_loop().create_task(self._open_dedicated())

    async def _open_dedicated(self) -> None:
        try:
            conn = await self.ctx.router.open_dedicated()
        except BackendUnavailable:
            self._acquiring = False
            held, self._held = self._held or [], None
            self._pinned = False
            self._clear_state()
            for *_, entries, _, owned in held:
                # answer() counts each entry out of in_flight: count them in first (as
                # _attach does), or in_flight goes negative and the next move to a
                # dedicated connection waits forever (_move_when_ready)
                self.queue.in_flight += owned
                fail_entries(entries)
            return
        self._acquiring = False
        self._attach(conn)

    def _attach(self, conn: BackendConnection) -> None:
        held, self._held = self._held or [], None
        conn.owner = self
        conn.on_idle = self._dedicated_idle
        self._dedicated = conn
        if self.transport is None:  # the client left meanwhile: what it sent still runs
            conn.on_idle = lambda done: self.ctx.router.give_back(done, reusable=False)
            self._dedicated = None
        for db, proto, payload, entries, after, owned in held:
            self.queue.in_flight += owned
            conn.send(db, proto, payload, entries, after)
        if not held and self.transport is None:
            self.ctx.router.give_back(conn, reusable=False)

    def _dedicated_idle(self, conn: BackendConnection) -> None:
        """Nothing in flight on the dedicated connection: give it back once the client
        holds no state (after a grace period, so loops of MULTI or BLPOP keep it)."""
        if conn is not self._dedicated or self._has_state() or self._unpin_handle is not None:
            return
        self._unpin_handle = asyncio.get_running_loop().call_later(UNPIN_GRACE_S, self._unpin)

    def _unpin(self) -> None:
        self._unpin_handle = None
        conn = self._dedicated
        if conn is None or conn.busy or self._has_state() or self._held is not None:
            return
        self._dedicated = None
        self._pinned = False
        self.ctx.router.give_back(conn, reusable=True)

    def backend_lost(self, conn: BackendConnection, exc: Exception | None) -> None:
        """The dedicated connection is gone (what was in flight on it is answered
        `backend unavailable` already)."""
        if conn is not self._dedicated:
            return
        self._dedicated = None
        self.ctx.router.give_back(conn, reusable=False)
        self.ctx.hooks.backend_lost(self)
        if self._has_state() and self.transport is not None and not self._closing:
            # Its transaction, subscriptions or MONITOR are gone with it: answer what is
            # owed, then close, rather than silently go on without them.
            log.warning("dedicated backend connection of %s lost%s; closing the client",
                        self.src, f": {exc}" if exc else "")
            self._closing = True
            self._close_when_drained(force=True)
            return
        self._pinned = False

    def backend_paused(self, paused: bool) -> None:
        """Redis stopped (or resumed) reading the connection this client sends on."""
        if paused:
            self._pause("backend-write")
        else:
            self._resume("backend-write")

    def _clear_state(self) -> None:
        self._in_multi = self._multi_dirty = self._watching = self._tracking = False
        self._flags.clear()

    # ------------------------------------------------------------------ replies
    def _deliver(self, out: list[bytes]) -> None:
        """Reply bytes for this client (from a backend connection, in order)."""
        self._write(out)
        if self._held is not None and not self.queue.in_flight:
            self._move_when_ready()
        if self._rtt_start and not self.queue.in_flight:
            self.ctx.observe_rtt(time.perf_counter() - self._rtt_start)
            self._rtt_start = 0.0
        if self._closing and not self.queue.entries:
            self._close_when_drained()

    def _write(self, out: list[bytes]) -> None:
        transport = self.transport
        if not out or transport is None or transport.is_closing():
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        self.bytes_out += len(data)
        transport.write(data)
        if "client-write" in self._paused_reasons and \
                transport.get_write_buffer_size() > self.ctx.max_reply_buffer_bytes:
            log.warning("closing %s: it does not read its replies (%d bytes buffered, over "
                        "[limits] max_reply_buffer_bytes = %d)", self.src,
                        transport.get_write_buffer_size(), self.ctx.max_reply_buffer_bytes)
            self.close_reason = "reply buffer limit: the client does not read its replies"
            self.abort()

    def _local(self, reply: bytes) -> None:
        """A reply made here; it goes out once every earlier reply has."""
        data = self.queue.local(reply)
        if data:
            self._write([data])

    # ------------------------------------------------------------------ decisions
    def _add(self, argv: list[bytes] | bytes, entry: Pending, audited: str | None = None,
             keys: tuple[bytes, ...] = ()) -> None:
        """One request for Redis in the read being decided."""
        batch = self._batch
        assert batch is not None
        if audited is not None:
            batch.audited.append(len(batch.items))
            self._records.append(self.audit_conn.command(audited, keys, self.queue.db))
        batch.items.append(argv)
        batch.entries.append(entry)
        batch.qidx.append(len(self.queue.entries) - 1 if entry.queue is not None else -1)

    def _forward(self, argv: list[bytes], command: str, kind: int = PLAIN,
                 **fields: Any) -> Pending:
        slot = self.counts[command]
        entry = self.queue.plain(slot) if kind == PLAIN else \
            self.queue.special(kind, slot, **fields)
        self._add(argv, entry)
        return entry

    def _refuse(self, decision: Decision) -> None:
        self.counts[decision.command][DENIED] += 1
        self._records.append(self.audit_conn.denied(
            decision.command, decision.keys, self.queue.db, decision.reason))
        if self._in_multi:
            self._multi_dirty = True  # Redis aborts the transaction at EXEC
        self.ctx.hooks.command_refused(self, decision)
        self._local(decision.error)

    def _allowed(self, argv: list[bytes]) -> Decision | None:
        """Policy for a command the session also handles itself; refuses when denied."""
        decision = self._decide(self.role, argv)
        if not decision.allowed:
            self._refuse(decision)
            return None
        return decision

    def _answer_here(self, decision: Decision, reply: bytes) -> None:
        """A command the proxy answers itself (counted as Redis would count it)."""
        self.counts[decision.command][1 if reply[:1] == b"-" else 0] += 1
        if self._in_multi and reply[:1] != b"-":
            # Inside MULTI these would be queued by Redis; the proxy cannot: refuse.
            self._multi_dirty = True
            reply = canned.error(f"phiproxy: '{decision.command}' inside MULTI is not "
                                 "supported")
        self._local(reply)

    def _subscribed_refusal(self, argv: list[bytes]) -> bool:
        """A RESP2 client in subscribed mode may only (un)subscribe, PING, QUIT, RESET."""
        if self.queue.proto == 2 and self.queue.subscribed and \
                argv[0].lower() not in _SUBSCRIBED_OK:
            self._local(canned.error(
                f"Can't execute '{argv[0].decode('utf-8', 'replace').lower()}': only "
                "(P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in "
                "this context"))
            return True
        return False

    def _forward_filtered(self, argv: list[bytes], decision: Decision) -> None:
        """KEYS/SCAN/PUBSUB CHANNELS for a role that may only learn some names."""
        if self._in_multi:
            # Inside MULTI the reply comes back inside EXEC's array, out of the filter's
            # reach: refuse rather than leak names beyond the role's patterns.
            self._refuse(Decision(
                allowed=False, command=decision.command, extra="keyspace",
                reason=f"keyspace: '{decision.command}' inside MULTI cannot be filtered",
                error=noperm_unfilterable_in_multi(decision.command)))
            return
        entry = self.queue.special(FILTER, self.counts[decision.command],
                                   filter=decision.reply_filter)
        self._add(argv, entry, audited=decision.command, keys=decision.keys)

    # Special commands. Each is decided by the policy unless it never reaches Redis.
    def _cmd_auth(self, argv: list[bytes]) -> None:
        # The certificate is the identity; the client's password is never forwarded.
        if len(argv) not in (2, 3):
            self._local(canned.error("wrong number of arguments for 'auth' command"))
            return
        username = argv[1].decode("utf-8", "replace") if len(argv) == 3 else None
        self._records.append(self.audit_conn.auth(username=username, command="auth"))
        if self._in_multi:
            self._multi_dirty = True
            self._local(canned.error("phiproxy: AUTH inside MULTI is not supported"))
            return
        self._local(canned.OK)

    def _cmd_hello(self, argv: list[bytes]) -> None:
        # HELLO [protover [AUTH username password] [SETNAME name]], answered here: the
        # AUTH part is audited and never forwarded; the protocol is kept per client.
        stripped = argv[:2]
        name = None
        i = 2
        while i < len(argv):
            option = argv[i].lower()
            if option == b"auth" and i + 2 < len(argv):
                username = argv[i + 1].decode("utf-8", "replace")
                self._records.append(self.audit_conn.auth(username=username, command="hello"))
                i += 3
                continue
            if option == b"setname" and i + 1 < len(argv):
                name = argv[i + 1]
                stripped += argv[i:i + 2]
                i += 2
                continue
            option_text = argv[i].decode("utf-8", "replace")
            self._local(canned.error(f"Syntax error in HELLO option '{option_text}'"))
            return
        decision = self._allowed(stripped)
        if decision is None or self._subscribed_refusal(argv):
            return
        proto = self.queue.proto
        if len(argv) > 1:
            version = string2ll(argv[1])
            if version is None:
                self._answer_here(decision, canned.error(
                    "Protocol version is not an integer or out of range"))
                return
            if version not in (2, 3):
                self._answer_here(decision, b"-NOPROTO unsupported protocol version\r\n")
                return
            proto = version
        if name is not None:
            problem = _name_problem(name)
            if problem:
                self._answer_here(decision, canned.error(problem))
                return
        info = self.ctx.router.server_info
        if info is None:
            self._answer_here(decision, canned.BACKEND_UNAVAILABLE)
            return
        if self._in_multi:
            self._answer_here(decision, canned.OK)  # refused: not supported inside MULTI
            return
        if name is not None:
            self.name = name or None
        self.queue.proto = proto
        self._cut()
        self._answer_here(decision, encode_hello(info, proto, self.conn_id))

    def _cmd_select(self, argv: list[bytes]) -> None:
        decision = self._allowed(argv)
        if decision is None or self._subscribed_refusal(argv):
            return
        if len(argv) != 2:
            self._answer_here(decision, canned.error(
                "wrong number of arguments for 'select' command"))
            return
        db = string2ll(argv[1])
        if db is None:
            self._answer_here(decision, canned.error(
                "value is not an integer or out of range"))
            return
        databases = self.ctx.router.databases
        if databases is None:
            self._answer_here(decision, canned.BACKEND_UNAVAILABLE)
            return
        if not 0 <= db < databases:
            self._answer_here(decision, canned.error("DB index is out of range"))
            return
        if self._in_multi:
            # Queued in the transaction by Redis; the connection is in that db after it.
            self._multi_selected = True
            self._forward(argv, decision.command)
            self.queue.db = db
            self._cut(after=(db, self.queue.proto))
            return
        self.queue.db = db
        self._cut()
        self._answer_here(decision, canned.OK)

    def _cut(self, after: tuple[int, int] | None = None) -> None:
        if self._batch is not None:
            self._batch.cut(self.queue.db, self.queue.proto, self._pinned, after)

    def _cmd_subscribe(self, argv: list[bytes]) -> None:
        decision = self._allowed(argv)
        if decision is None:
            return
        name = argv[0].lower()
        sub_kind = SUB_KINDS[name]
        if name in _UNSUBSCRIBE and not self._pinned:
            # Not subscribed to anything: Redis confirms each argument (or one nil) with
            # a count of 0. Answered here, so no connection is taken for it.
            self._answer_here(decision, _unsubscribed(name, argv[1:], self.queue.proto))
            return
        self._pin()
        # Redis confirms each argument; without arguments, each current subscription
        # (at least one), which is only known when this entry reaches the head.
        remaining = len(argv) - 1 if len(argv) > 1 else -1
        self._forward(argv, decision.command, SUB, remaining=remaining, sub_kind=sub_kind)

    def _cmd_multi(self, argv: list[bytes]) -> None:
        decision = self._allowed(argv)
        if decision is None:
            return
        if len(argv) == 1 and not self._in_multi:
            self._pin()
            self._multi_dirty = self._multi_selected = self._multi_rewrites = False
            self._multi_db = self.queue.db
            self._in_multi = True
            if self._batch is not None:
                self._batch.multi = True
            self._forward(argv, decision.command, MULTI)
            return
        self._forward(argv, decision.command)

    def _cmd_exec(self, argv: list[bytes]) -> None:
        decision = self._allowed(argv)
        if decision is None:
            return
        if not self._in_multi or len(argv) != 1:
            self._forward(argv, decision.command)  # Redis answers the error
            return
        self._in_multi = self._watching = False
        after = (-1, self.queue.proto) if self._multi_selected else None
        if self._multi_dirty:
            # A command of this transaction was refused here, so Redis never queued it:
            # discard the rest and answer as Redis does for a transaction with errors.
            self._multi_dirty = False
            self._forward([b"DISCARD"], decision.command, REPLACE, data=canned.EXECABORT)
            self.queue.db = self._multi_db
        else:
            queue = self.queue
            # With protected values inside, EXEC's array is rewritten element by element
            # (decrypted, the proxy's own follow-ups dropped) from what Redis queued.
            rewrite = (lambda frame: rewrite_exec(queue.queued, frame)) \
                if self._multi_rewrites else None
            self._forward(argv, decision.command, EXEC, arg=queue.db,
                          data=str(self._multi_db).encode(), filter=rewrite)
        self._cut(after=after)

    def _cmd_discard(self, argv: list[bytes]) -> None:
        decision = self._allowed(argv)
        if decision is None:
            return
        self._forward(argv, decision.command)
        if self._in_multi and len(argv) == 1:
            self._in_multi = self._multi_dirty = self._watching = False
            self.queue.db = self._multi_db
            self._cut(after=(-1, self.queue.proto) if self._multi_selected else None)

    def _cmd_watch(self, argv: list[bytes]) -> None:
        decision = self._allowed(argv)
        if decision is None:
            return
        if not self._in_multi:
            self._pin()
            self._watching = True
        keys = decision.keys
        audited = decision.command if any(map(self.ctx.is_phi, keys)) else None
        entry = self.queue.plain(self.counts[decision.command])
        self._add(argv, entry, audited=audited, keys=keys)

    def _cmd_unwatch(self, argv: list[bytes]) -> None:
        decision = self._allowed(argv)
        if decision is None:
            return
        if not self._in_multi:
            self._watching = False
        self._forward(argv, decision.command)

    def _cmd_reset(self, argv: list[bytes]) -> None:
        decision = self._allowed(argv)
        if decision is None:
            return
        self._in_multi = self._multi_dirty = self._watching = self._tracking = False
        self._flags.clear()
        self.name = None
        self.queue.silence = 0
        if not self._pinned:
            self.queue.reset_state(self.start_db)
            self._cut()
            self._answer_here(decision, _RESET_REPLY)
            return
        # RESET also logs the dedicated connection out: authenticate again in the same
        # write, so nothing a client sends can leave it with another identity.
        self._forward(argv, decision.command, RESET, arg=self.start_db)
        auth = self.ctx.router.auth
        if auth is not None:
            self._add(auth, swallowed())
        self.queue.db, self.queue.proto = self.start_db, 2
        self._cut(after=(0, 2))

    def _cmd_quit(self, argv: list[bytes]) -> None:
        # Answered here; the rest of the read is ignored (as Redis does), and the
        # connection ends once every earlier reply is out.
        self.queue.silence = 0
        self._local(canned.OK)
        self._closing = True

    def _cmd_client(self, argv: list[bytes]) -> None:
        sub = argv[1].lower() if len(argv) > 1 else b""
        if sub == b"setinfo" and self.role.table.lookup(argv) is None:
            # Redis 7.2's CLIENT SETINFO (client libraries send it on every connection),
            # answered here; a 7.0 command table does not know it. Decided as CLIENT
            # SETNAME, which has the same categories (@slow @connection) in 7.2.
            decision = self._decide(self.role, [argv[0], b"SETNAME", b"x"])
            if not decision.allowed:
                self._refuse(decision._replace(
                    command="client|setinfo", reason=command_text("client|setinfo"),
                    error=noperm_command("client|setinfo")))
                return
            self._client_setinfo(argv, decision._replace(command="client|setinfo"))
            return
        decision = self._allowed(argv)
        if decision is None:
            return
        if sub in _CLIENT_HERE:
            if self._subscribed_refusal(argv):
                return
            _CLIENT_HERE[sub](self, argv, decision)
            return
        if sub in (b"tracking", b"no-evict", b"no-touch") and len(argv) > 2:
            on = argv[2].lower() == b"on"
            if sub == b"tracking":
                self._tracking = on
            elif on:
                self._flags.add(sub)
            else:
                self._flags.discard(sub)
            if on:
                self._pin()
        self._forward(argv, decision.command)

    def _client_reply(self, argv: list[bytes], decision: Decision) -> None:
        mode = argv[2].lower() if len(argv) == 3 else b""
        if mode not in (b"on", b"off", b"skip"):
            self._answer_here(decision, canned.error("syntax error"))
            return
        if mode == b"on":
            self.queue.silence = 0
            self._answer_here(decision, canned.OK)
            return
        # Redis sends no reply to these, nor to what they silence.
        self.counts[decision.command][0] += 1
        self.queue.silence = 1 if mode == b"off" else 2

    def _client_setname(self, argv: list[bytes], decision: Decision) -> None:
        if len(argv) != 3:
            self._answer_here(decision, canned.error(
                "wrong number of arguments for 'client|setname' command"))
            return
        problem = _name_problem(argv[2])
        if problem:
            self._answer_here(decision, canned.error(problem))
            return
        self.name = argv[2] or None
        self._answer_here(decision, canned.OK)

    def _client_getname(self, argv: list[bytes], decision: Decision) -> None:
        name = self.name
        self._answer_here(decision, encode_nil(self.queue.proto) if name is None
                          else b"$%d\r\n%s\r\n" % (len(name), name))

    def _client_id(self, argv: list[bytes], decision: Decision) -> None:
        self._answer_here(decision, b":%d\r\n" % self.conn_id)

    def _client_setinfo(self, argv: list[bytes], decision: Decision) -> None:
        if len(argv) != 4:
            self._answer_here(decision, canned.error(
                "wrong number of arguments for 'client|setinfo' command"))
            return
        option = argv[2].lower()
        if option not in (b"lib-name", b"lib-ver"):
            self._answer_here(decision, canned.error(
                f"Unrecognized option '{argv[2].decode('utf-8', 'replace')}'"))
            return
        if any(c < 0x21 or c > 0x7E for c in argv[3]):
            self._answer_here(decision, canned.error(
                f"{option.decode()} cannot contain spaces, newlines or special characters."))
            return
        self._answer_here(decision, canned.OK)

    def _cmd_monitor(self, argv: list[bytes]) -> None:
        decision = self._allowed(argv)
        if decision is None:
            return
        self._pin()
        entry = self.queue.special(MONITOR, self.counts[decision.command])
        # MONITOR shows every key and value
        self._add(argv, entry, audited=decision.command, keys=decision.keys)

    def _cmd_wait(self, argv: list[bytes]) -> None:
        decision = self._allowed(argv)
        if decision is None:
            return
        if not self._in_multi:
            self._pin()
            # WAIT counts the writes of the connection it runs on. The client's earlier
            # writes ran on the shared connection (and are done: a move waits for that),
            # so a propagated no-op first carries this connection's offset past them.
            self._add(_WAIT_MARKER, swallowed())
        self._forward(argv, decision.command)

    # ------------------------------------------------------------------ lifecycle
    def _pause(self, reason: str) -> None:
        if not self._paused_reasons and self.transport is not None:
            self.transport.pause_reading()
        self._paused_reasons.add(reason)

    def _resume(self, reason: str) -> None:
        self._paused_reasons.discard(reason)
        if not self._paused_reasons and self.transport is not None and \
                not self.transport.is_closing():
            self.transport.resume_reading()

    def _protocol_error(self, message: str) -> None:
        self.ctx.hooks.protocol_error(self.src, message)
        # Nothing of this read reaches the backend, not even the well-formed commands
        # before the bad one (SPEC §7; Redis would run them): a client that sends garbage
        # is not trusted with the rest. Replies owed for earlier reads still go out first.
        self._closing = self._stop_reading = True
        self._framer = None
        self.queue.silence = 0  # Redis sends protocol errors even with CLIENT REPLY OFF
        self._local(canned.protocol_error(message))
        self._close_when_drained()

    def _close_when_drained(self, force: bool = False) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._queued and not force:
            return  # reads not decided yet (finish_queued comes back here once they are)
        if force or not self.queue.entries:
            if self.queue.entries:
                out: list[bytes] = []
                self.queue.fail_all(out)
                self._write(out)
            transport.close()
            return
        if self._shutting_down:
            return  # the server's drain deadline bounds the wait
        asyncio.get_running_loop().call_later(
            self.ctx.drain_timeout_s, self._close_when_drained, True)

    def abort(self) -> None:
        """Drop the connection at once (nothing of it is sent any more)."""
        self._closing = self._stop_reading = True
        self._queued.clear()
        conn, self._dedicated = self._dedicated, None
        if conn is not None:
            conn.owner = None
            self.ctx.router.give_back(conn, reusable=False)
        if self.transport is not None:
            self.transport.abort()

    def _schedule_idle_check(self) -> None:
        timeout = self.ctx.idle_timeout_s
        if timeout > 0:
            self._idle_handle = asyncio.get_running_loop().call_later(timeout, self._idle_check)

    def _idle_check(self) -> None:
        timeout = self.ctx.idle_timeout_s
        idle_for = time.monotonic() - self._last_activity
        # Like Redis's `timeout`: blocked, subscribed and monitoring clients are not idle.
        busy = self.queue.entries or self.queue.pubsub
        if timeout > 0 and idle_for >= timeout and not busy and self.transport is not None:
            log.info("closing idle connection from %s after %.0f s", self.src, idle_for)
            self._closing = True
            self.transport.close()
            return
        if timeout <= 0:
            return
        delay = timeout - idle_for if idle_for < timeout else timeout
        self._idle_handle = asyncio.get_running_loop().call_later(delay, self._idle_check)

    def set_role(self, role_name: str, role: Any, decide: Any, counts: CommandCounts,
                 audit_conn: Any) -> None:
        """Reload: the new role's rules apply from the next command on."""
        self.role_name, self.role, self._decide, self.counts = role_name, role, decide, counts
        self.audit_conn = audit_conn

    def close_for(self, reason: str) -> None:
        """Close now (reload found the certificate or mapping no longer valid)."""
        self.close_reason = reason
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def drain(self) -> None:
        """Shutdown: stop reading; close once owed replies are out (the server bounds it)."""
        self._shutting_down = True
        self._closing = True
        self._pause("shutdown")
        self._close_when_drained()


def _name_problem(name: bytes) -> str:
    """Redis's check on CLIENT SETNAME / HELLO SETNAME names ('' is no problem)."""
    if any(c < 0x21 or c > 0x7E for c in name):
        return "Client names cannot contain spaces, newlines or special characters."
    return ""


def _unsubscribed(name: bytes, channels: list[bytes], proto: int) -> bytes:
    """Redis's confirmations of an UNSUBSCRIBE-family command with no subscriptions."""
    head = b">3\r\n" if proto == 3 else b"*3\r\n"
    kind = b"$%d\r\n%s\r\n" % (len(name), name)
    if not channels:
        return head + kind + encode_nil(proto) + b":0\r\n"
    return b"".join(head + kind + b"$%d\r\n%s\r\n:0\r\n" % (len(c), c) for c in channels)


_SPECIAL: dict[bytes, Callable[[Session, list[bytes]], None]] = {
    b"auth": Session._cmd_auth,
    b"hello": Session._cmd_hello,
    b"select": Session._cmd_select,
    b"subscribe": Session._cmd_subscribe,
    b"psubscribe": Session._cmd_subscribe,
    b"ssubscribe": Session._cmd_subscribe,
    b"unsubscribe": Session._cmd_subscribe,
    b"punsubscribe": Session._cmd_subscribe,
    b"sunsubscribe": Session._cmd_subscribe,
    b"multi": Session._cmd_multi,
    b"exec": Session._cmd_exec,
    b"discard": Session._cmd_discard,
    b"watch": Session._cmd_watch,
    b"unwatch": Session._cmd_unwatch,
    b"reset": Session._cmd_reset,
    b"quit": Session._cmd_quit,
    b"client": Session._cmd_client,
    b"monitor": Session._cmd_monitor,
    b"wait": Session._cmd_wait,
    b"waitaof": Session._cmd_wait,
}

_CLIENT_HERE: dict[bytes, Callable[[Session, list[bytes], Decision], None]] = {
    b"reply": Session._client_reply,
    b"setname": Session._client_setname,
    b"getname": Session._client_getname,
    b"id": Session._client_id,
    b"setinfo": Session._client_setinfo,
}
