"""One client connection: frame, decide, forward; relay replies in order.

The pending queue holds one entry per request still owed a reply, in request order:
  - a list (the command's metrics slot, [ok, error, denied], shared by every command of
    that name): the backend's next reply is relayed as it is, and counted;
  - bytes: a reply the proxy made itself (a refusal, AUTH's +OK), released when it
    reaches the head, so the client sees replies in the order it asked;
  - a Pending object for the few commands whose replies change session state or are
    rewritten (SUBSCRIBE family, HELLO, SELECT, RESET, EXEC turned into DISCARD, KEYS/SCAN
    filtering, the proxy's own AUTH after RESET).
Pushes (pub/sub messages, RESP3 `>` frames) answer no request and pop nothing.

Reads are framed as they arrive and decided once per event loop iteration (queued, then
`run_queued` / `finish_queued` from ServerState.flush_reads): the audit records of every
client read of that iteration are written in one write-ahead, then the reads are forwarded
in order. A session with more than QUEUE_FLUSH_BYTES waiting flushes at once, so a burst
meets flow control as it arrives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from proxy.backend import BackendConnection, BackendUnavailable
from proxy.identity import Identity
from proxy.metrics import CommandCounts
from proxy.policy.decision import Decision
from proxy.resp import canned
from proxy.resp.reply import PUSH, REPLY, SUB_CONFIRM, ReplyFramer, SubConfirm
from proxy.resp.request import ProtocolError, RequestFramer, encode_command

if TYPE_CHECKING:
    from proxy.server import ServerState

log = logging.getLogger("phiproxy.session")

OK, ERROR, DENIED = 0, 1, 2  # indexes into a metrics slot
# Client bytes one session may have waiting for the end of the loop iteration (reads are
# batched per iteration so all their audit records go out in one write).
QUEUE_FLUSH_BYTES = 64 * 1024

# Pending kinds for special entries.
K_SUB = 1  # SUBSCRIBE family: `remaining` confirmations (or -1: computed at the head)
K_HELLO = 2  # switch protocol when the reply is not an error
K_SELECT = 3  # track the db when the reply is not an error
K_RESET = 4  # reset tracked state
K_SWALLOW = 5  # the proxy's own AUTH after RESET: never shown to the client
K_REPLACE = 6  # send `data` instead of the backend's reply (EXEC turned into DISCARD)
K_FILTER = 7  # rewrite the complete reply (KEYS/SCAN/PUBSUB CHANNELS filtering)
K_MONITOR = 8  # after +OK the connection relays a MONITOR stream

SUB_NAMES = {
    b"subscribe": "channels", b"unsubscribe": "channels",
    b"psubscribe": "patterns", b"punsubscribe": "patterns",
    b"ssubscribe": "shard", b"sunsubscribe": "shard",
}


class Pending:
    __slots__ = ("kind", "remaining", "data", "filter", "sub_kind", "arg", "slot")

    def __init__(self, kind: int, remaining: int = 1, data: bytes = b"",
                 filter: Callable[[bytes], bytes] | None = None,
                 sub_kind: str = "", arg: int = 0, slot: list[int] | None = None) -> None:
        self.slot = slot
        self.kind = kind
        self.remaining = remaining
        self.data = data
        self.filter = filter
        self.sub_kind = sub_kind
        self.arg = arg


class Batch:
    """One client read, decided and waiting for its audit records to be written."""

    __slots__ = ("out", "raw", "records", "audited", "pending_start", "pending_end", "multi",
                 "received_at")

    def __init__(self, out: list[Any], raw: bytes | None, records: list[bytes],
                 audited: list[tuple[int, int]], pending_start: int, pending_end: int,
                 multi: bool, received_at: float) -> None:
        self.out = out  # what goes to Redis: argv lists (encoded on sending) and bytes
        self.raw = raw  # the read's bytes, when they can go instead of `out`
        self.records = records  # audit record bodies, written before anything is sent
        self.audited = audited  # (index in out, index in pending or -1) per audited command
        self.pending_start, self.pending_end = pending_start, pending_end
        self.multi = multi  # a transaction was open: a failed write takes back everything
        self.received_at = received_at


class Session(asyncio.Protocol):
    """The client side of one proxied connection (installed after the TLS handshake)."""

    # Slots: a Session has more attributes than CPython 3.11 shares dict keys for, so
    # without them each connection would carry its own ~3 KiB attribute dict.
    __slots__ = (
        "state", "counts", "conn_id", "_audit", "_audit_conn", "_is_phi", "_records",
        "_audited", "_batch_multi", "_defer", "_queued", "_queued_bytes", "_stop_reading",
        "bytes_in", "bytes_out", "peer_der", "tls_info", "close_reason", "_shutting_down",
        "src", "identity", "role_name", "role", "_decide", "_framer", "_replies", "_pending",
        "_special", "transport", "backend", "_backend_used", "_connecting", "_early",
        "_proto", "_db", "_audit_db", "_subs", "_in_multi", "_multi_dirty", "_reply_mode",
        "_monitor", "_frame_buf", "_frame_streamed", "_frame_first", "_client_paused_reasons",
        "_backend_reading_paused", "_closing", "commands", "started", "_last_activity",
        "_idle_handle", "_received_at", "_rtt_start", "_observe_latency", "_observe_rtt",
    )

    def __init__(self, state: ServerState, src: str, identity: Identity, role_name: str,
                 role: Any, counts: CommandCounts) -> None:
        self.state = state
        self.counts = counts  # command name -> metrics slot [ok, error, denied]
        self.conn_id = state.next_conn_id()
        # Audit: records of one client read are written together, before it is forwarded.
        self._audit = state.audit
        self._audit_conn = state.audit.records.connection(self.conn_id, src, identity, role_name)
        self._is_phi = state.is_phi_key
        self._records: list[bytes] = []
        self._audited: list[tuple[int, int]] = []  # (index in out, index in pending or -1)
        self._batch_multi = False  # a transaction was open when the current read started
        # Loop-level batching: reads of one loop iteration are decided together after it,
        # so every client's audit records go out in one write (ServerState.flush_reads).
        self._defer = state.defer_reads if state.audit.in_loop else None
        self._queued: list[tuple[Any, Any, float]] = []  # (commands, raw, received_at)
        self._queued_bytes = 0
        self._stop_reading = False  # QUIT or a protocol error: later reads are ignored
        self.bytes_in = self.bytes_out = 0
        self.peer_der: bytes | None = None  # the client certificate, for reload checks
        self.tls_info: dict[str, str] = {}  # TLS version and cipher, for the connect record
        self.close_reason: str | None = None
        self._shutting_down = False
        self.src = src
        self.identity = identity
        self.role_name = role_name
        self.role = role
        self._decide = state.decide
        limits = state.config.limits
        self._framer = RequestFramer(
            max_bulk_bytes=limits.max_bulk_bytes,
            max_query_buffer_bytes=limits.max_query_buffer_bytes,
            max_args=limits.max_args,
            max_inline_bytes=limits.max_inline_bytes,
        )
        self._replies = ReplyFramer()
        self._pending: deque[Any] = deque()
        self._special = 0  # entries in _pending that are not slots: 0 = the fast reply path
        self.transport: asyncio.Transport | None = None
        self.backend: BackendConnection | None = None
        self._backend_used = False
        self._connecting: asyncio.Task[None] | None = None
        self._early: list[bytes] = []  # commands waiting for the backend connection
        # Tracked Redis connection state.
        self._proto = 2
        self._db = 0  # confirmed by Redis's reply to SELECT
        self._audit_db = 0  # as of the command being handled: SELECT counts when sent
        self._subs: dict[str, set[bytes]] = {"channels": set(), "patterns": set(), "shard": set()}
        self._in_multi = False
        self._multi_dirty = False
        self._reply_mode = 0  # 0 on, 1 off, 2 skip the next command's reply
        self._monitor = False
        # Partial reply state (a frame that started in an earlier chunk).
        self._frame_buf: list[bytes] | None = None  # collected bytes when the head needs them
        self._frame_streamed = False  # the current frame's first bytes were already relayed
        self._frame_first = 0  # first byte of the current frame ('-' marks an error)
        # Flow control.
        self._client_paused_reasons: set[str] = set()
        self._backend_reading_paused = False
        self._closing = False
        self.commands = 0
        self.started = time.monotonic()
        self._last_activity = self.started
        self._idle_handle: asyncio.TimerHandle | None = None
        self._received_at = 0.0  # perf_counter() of the read being handled
        self._rtt_start = 0.0  # when a batch went to an idle backend (for the RTT histogram)
        metrics = state.metrics
        self._observe_latency = metrics.proxy_latency.observe
        self._observe_rtt = metrics.backend_rtt.observe

    # ------------------------------------------------------------------ client side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state.session_started(self)
        self._schedule_idle_check()
        self._connect_backend()

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
                self._framer = None  # type: ignore[assignment]
                self._queued.append((None, str(exc).encode(), 0.0))
            else:
                self._protocol_error(str(exc))
            return
        if commands:
            raw = data if framer.verbatim else None
            if self._defer is None:
                self._handle(commands, raw)
                return
            if not self._queued:
                self._defer(self)
            self._queued.append((commands, raw, self._received_at))
            self._queued_bytes += len(data)
            if self._queued_bytes > QUEUE_FLUSH_BYTES:
                # A big burst from one client: handle it now, so that flow control (pausing
                # this client when its replies back up) acts within the burst.
                self.state.flush_reads()

    def eof_received(self) -> bool | None:
        # Asks to keep the connection for the replies still owed. Over TLS (always, here)
        # uvloop closes the transport after a close_notify whatever this returns: what was
        # read before it still runs (queued reads are flushed), its replies may be lost.
        self._closing = True
        self._close_when_drained()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._queued:  # what the client sent before it went still goes to Redis
            self.state.flush_reads()
        self._closing = True
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        if self.backend is not None:
            self.backend.user = None
            self.backend.close()
        self.state.session_ended(
            self, self.close_reason or ("client closed" if exc is None else str(exc)))

    def pause_writing(self) -> None:
        # The client reads slower than we produce: stop both sources of its replies.
        self._pause_client("client-write")
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.pause_reading()
            self._backend_reading_paused = True

    def resume_writing(self) -> None:
        self._resume_client("client-write")
        if self._backend_reading_paused and self.backend is not None and \
                self.backend.transport is not None:
            self._backend_reading_paused = False
            self.backend.transport.resume_reading()

    # ------------------------------------------------------------------ requests
    def _handle(self, commands: list[list[bytes]], raw: bytes | None = None) -> None:
        """Decide, audit (write-ahead) and forward one read's commands at once."""
        batch = self._prepare(commands, raw, self._received_at)
        ok = self._audit.write(batch.records) if batch.records else True
        if self._finish(batch, ok):
            self._release_refusals()
        if self._closing:
            self._close_when_drained()

    def run_queued(self) -> list[Batch]:
        """Loop-level batching, step 1 (ServerState.flush_reads): prepare every read queued
        in this loop iteration, in order; their records are then written in one go."""
        queued, self._queued = self._queued, []
        self._queued_bytes = 0
        batches = []
        for commands, raw, received_at in queued:
            if self._stop_reading:  # after QUIT or a protocol error nothing more is read
                break
            if commands is None:  # the framer failed on this read (raw holds the message)
                self._protocol_error(raw.decode())  # type: ignore[union-attr]
                break
            batches.append(self._prepare(commands, raw, received_at))
        return batches

    def finish_queued(self, batches: list[Batch], ok: bool) -> None:
        """Step 3: forward each prepared read (or take back its audited commands)."""
        took_back = False
        for batch in batches:
            took_back |= self._finish(batch, ok)
        if took_back:
            self._release_refusals()
        if self._closing:
            self._close_when_drained()

    def _prepare(self, commands: list[list[bytes]], raw: bytes | None,
                 received_at: float) -> Batch:
        """Decide one read's commands: what goes to Redis, the pending replies, the audit
        records to write ahead. `raw`: the read's bytes when they are exactly these
        commands in canonical form (RequestFramer.verbatim); if every command goes to Redis
        unchanged, they are forwarded as they are."""
        # `out` holds what goes to Redis, in order: an argv list for a command forwarded
        # unchanged (encoded at the end, unless `raw` can go instead), bytes otherwise.
        out: list[Any] = []
        pending = self._pending
        decide = self._decide
        role = self.role
        counts = self.counts
        is_phi = self._is_phi
        self._records, self._audited = [], []
        audit_command = self._audit_command
        monitor = self._monitor  # only a reply changes it, never a command of this read
        batch_start = len(pending)
        self._batch_multi = self._in_multi
        plain = handled = 0
        for argv in commands:
            handled += 1
            special = _SPECIAL.get(argv[0].lower())
            if special is not None:
                special(self, argv, out)
                if self._closing:  # QUIT
                    self._stop_reading = True
                    break
                continue
            if monitor:
                self._local(canned.error("phiproxy: only QUIT is allowed on a MONITOR connection"))
                continue
            decision = decide(role, argv)
            allowed, command, _, _, _, _, reply_filter, sensitive, keys = decision
            if not allowed:
                self._refuse(decision)
                continue
            if reply_filter is not None:
                self._forward_filtered(argv, decision, out)
                continue
            if sensitive or (keys and (is_phi(keys[0]) if len(keys) == 1
                                       else any(map(is_phi, keys)))):
                audit_command(command, keys, out)
            out.append(argv)
            plain += 1
            if self._reply_mode == 0:
                pending.append(counts[command])
            elif self._reply_mode == 2:
                self._reply_mode = 0
        self.commands += handled
        verbatim = raw is not None and plain == len(out) == len(commands)
        return Batch(out, raw if verbatim else None, self._records, self._audited, batch_start,
                     len(pending), self._batch_multi or self._in_multi, received_at)

    def _finish(self, batch: Batch, ok: bool) -> bool:
        """Forward a prepared read once its records are written. If they could not be
        (and fail_closed), its audited commands are taken back: refused in place with
        `-ERR audit unavailable`, never sent. True if something was taken back."""
        out = batch.out
        took_back = False
        if batch.records:
            if ok:
                if self.state.audit_failing:
                    self.state.audit_ok()
            elif self.state.config.audit.fail_closed and batch.audited:
                self._take_back(batch)
                out = [chunk for chunk in out if chunk]
                took_back = True
        if out:
            if batch.raw is not None and not took_back:
                self._send(batch.raw, batch.received_at)  # the bytes as read
            else:
                self._send(b"".join([encode_command(chunk) if type(chunk) is list else chunk
                                     for chunk in out]), batch.received_at)
        return took_back

    def _take_back(self, batch: Batch) -> None:
        out, pending = batch.out, self._pending
        if batch.multi:
            # A transaction was open in this read: taking back only the audited commands
            # would let EXEC run the rest. Take back the whole read; a transaction left
            # open ends in EXECABORT, as in Redis after a queueing error.
            out[:] = [b""] * len(out)
            takeback: Any = range(batch.pending_start, batch.pending_end)
            self._multi_dirty = True
        else:
            for out_index, _ in batch.audited:
                out[out_index] = b""
            takeback = [index for _, index in batch.audited if index >= 0]
        for pending_index in takeback:
            entry = pending[pending_index]
            if type(entry) is bytes:
                continue  # already answered here (a refusal)
            if type(entry) is list:  # a plain entry becomes a local one
                entry[ERROR] += 1
                self._special += 1
            pending[pending_index] = canned.AUDIT_UNAVAILABLE
        self.state.audit_failed(self)

    def _release_refusals(self) -> None:
        """Refusals now at the head of the pending queue go out at once."""
        if self.transport is not None:
            head: list[bytes] = []
            self._release_locals(head)
            if head:
                self.transport.write(b"".join(head))

    # ------------------------------------------------------------------ audit
    def _audit_command(self, command: str, keys: tuple[bytes, ...], out: list[Any]) -> None:
        """A `command` record for what is about to be forwarded (out and pending positions
        kept, so a failed write can take exactly these commands back)."""
        self._records.append(self._audit_conn.command(command, keys, self._audit_db))
        self._audited.append((len(out), len(self._pending) if self._reply_mode == 0 else -1))

    def _send(self, data: bytes, received_at: float) -> None:
        backend = self.backend
        if backend is not None and not backend.closed:
            now = time.perf_counter()
            self._observe_latency(now - received_at)
            if not self._rtt_start:
                self._rtt_start = now
            backend.write(data)
            return
        self._early.append(data)
        if backend is None:
            self._pause_client("backend-connect")
            self._connect_backend()
        else:
            self._fail_pending()

    def _push_pending(self, entry: Any) -> None:
        self._pending.append(entry)
        self._special += 1

    def _local(self, reply: bytes) -> None:
        """Queue a reply the proxy made itself; it goes out once earlier replies have."""
        if self._reply_mode != 0:
            if self._reply_mode == 2:
                self._reply_mode = 0
            return
        if self._pending:
            self._push_pending(reply)
        elif self.transport is not None:
            self.transport.write(reply)

    def _refuse(self, decision: Decision) -> None:
        self.counts[decision.command][DENIED] += 1
        self._records.append(self._audit_conn.denied(
            decision.command, decision.keys, self._audit_db, decision.reason))
        if self._in_multi:
            self._multi_dirty = True  # Redis aborts the transaction at EXEC
        self.state.command_refused(self, decision)
        self._local(decision.error)

    def _forward_filtered(self, argv: list[bytes], decision: Decision, out: list[bytes]) -> None:
        """KEYS/SCAN/PUBSUB CHANNELS for a role that may only learn some names."""
        if self._in_multi:
            # Inside MULTI the reply comes back inside EXEC's array, out of the filter's
            # reach: refuse rather than leak names beyond the role's patterns.
            self._refuse(Decision(
                allowed=False, command=decision.command, extra="keyspace",
                reason=f"keyspace: '{decision.command}' inside MULTI cannot be filtered",
                error=canned.error(
                    f"phiproxy: '{decision.command}' cannot be filtered inside MULTI; "
                    "run it outside the transaction", prefix="NOPERM")))
            return
        # KEYS/SCAN read names without naming them
        self._audit_command(decision.command, decision.keys, out)
        self._forward_tracked(argv, out, Pending(K_FILTER, filter=decision.reply_filter))

    def _decide_special(self, argv: list[bytes]) -> Decision | None:
        """Policy for a command the session also handles itself; refuses when denied."""
        decision = self._decide(self.role, argv)
        if not decision.allowed:
            self._refuse(decision)
            return None
        return decision

    def _forward_tracked(self, argv: list[bytes], out: list[bytes], entry: Pending) -> None:
        out.append(encode_command(argv))
        entry.slot = self.counts[argv[0].lower().decode("ascii", "replace")]
        if self._reply_mode == 0:
            self._push_pending(entry)
        elif self._reply_mode == 2:
            self._reply_mode = 0

    # Special commands. Each is decided by the policy unless it never reaches the backend.
    def _cmd_auth(self, argv: list[bytes], out: list[bytes]) -> None:
        # The certificate is the identity; the client's password is never forwarded.
        if len(argv) not in (2, 3):
            self._local(canned.error("wrong number of arguments for 'auth' command"))
            return
        username = argv[1].decode("utf-8", "replace") if len(argv) == 3 else None
        self._records.append(self._audit_conn.auth(username=username, command="auth"))
        if self._in_multi:
            self._multi_dirty = True
            self._local(canned.error("phiproxy: AUTH inside MULTI is not supported"))
            return
        self._local(canned.OK)

    def _cmd_hello(self, argv: list[bytes], out: list[bytes]) -> None:
        # HELLO [protover [AUTH username password] [SETNAME name]]: the AUTH part is
        # answered here (audited, never forwarded); the rest goes to Redis.
        stripped = argv[:2]
        i = 2
        while i < len(argv):
            if argv[i].lower() == b"auth":
                if i + 2 >= len(argv):
                    self._local(canned.error("Syntax error in HELLO option 'auth'"))
                    return
                username = argv[i + 1].decode("utf-8", "replace")
                self._records.append(self._audit_conn.auth(username=username, command="hello"))
                i += 3
                continue
            stripped.append(argv[i])
            i += 1
        if not self._decide_special(stripped):
            return
        try:
            proto = int(stripped[1]) if len(stripped) > 1 else self._proto
        except ValueError:
            proto = self._proto
        self._forward_tracked(stripped, out, Pending(K_HELLO, arg=proto))

    def _cmd_select(self, argv: list[bytes], out: list[bytes]) -> None:
        if not self._decide_special(argv):
            return
        try:
            db = int(argv[1]) if len(argv) == 2 else -1
        except ValueError:
            db = -1
        self._forward_tracked(argv, out, Pending(K_SELECT, arg=db))
        if db >= 0:
            self._audit_db = db  # commands behind it in this pipeline run there

    def _cmd_subscribe(self, argv: list[bytes], out: list[bytes]) -> None:
        if not self._decide_special(argv):
            return
        sub_kind = SUB_NAMES[argv[0].lower()]
        # Redis confirms each argument; without arguments, each current subscription
        # (at least one), which is only known when this entry reaches the head.
        remaining = len(argv) - 1 if len(argv) > 1 else -1
        self._forward_tracked(argv, out, Pending(K_SUB, remaining=remaining, sub_kind=sub_kind))

    def _cmd_multi(self, argv: list[bytes], out: list[bytes]) -> None:
        if not self._decide_special(argv):
            return
        if len(argv) == 1:
            if not self._in_multi:
                self._multi_dirty = False
            self._in_multi = self._batch_multi = True
        self._forward_raw(argv, out)

    def _cmd_exec(self, argv: list[bytes], out: list[bytes]) -> None:
        if not self._decide_special(argv):
            return
        if self._in_multi and self._multi_dirty and len(argv) == 1:
            # A command of this transaction was refused here, so Redis never queued it:
            # discard the rest and answer as Redis does for a transaction with errors.
            self._in_multi = self._multi_dirty = False
            self._forward_tracked([b"DISCARD"], out, Pending(K_REPLACE, data=canned.EXECABORT))
            return
        if len(argv) == 1:
            self._in_multi = self._multi_dirty = False
        self._forward_raw(argv, out)

    def _cmd_discard(self, argv: list[bytes], out: list[bytes]) -> None:
        if not self._decide_special(argv):
            return
        if len(argv) == 1:
            self._in_multi = self._multi_dirty = False
        self._forward_raw(argv, out)

    def _cmd_reset(self, argv: list[bytes], out: list[bytes]) -> None:
        if not self._decide_special(argv):
            return
        # RESET also logs the backend connection out: re-authenticate in the same write,
        # so nothing a client sends can leave it with another identity.
        self._forward_tracked(argv, out, Pending(K_RESET))
        self._reply_mode = 0
        self._in_multi = self._multi_dirty = False
        auth = self.state.pool.auth
        if auth is not None:
            out.append(auth)
            self._push_pending(Pending(K_SWALLOW))

    def _cmd_quit(self, argv: list[bytes], out: list[bytes]) -> None:
        # Answered here; the rest of the read is ignored (as Redis does), and the
        # connection ends once every earlier reply is out.
        self._local(canned.OK)
        self._closing = True

    def _cmd_client(self, argv: list[bytes], out: list[bytes]) -> None:
        if not self._decide_special(argv):
            return
        if len(argv) == 3 and argv[1].lower() == b"reply":
            mode = argv[2].lower()
            if mode in (b"off", b"skip"):
                # Redis sends no reply to these, nor to what they silence.
                out.append(encode_command(argv))
                self._reply_mode = 1 if mode == b"off" else 2
                return
            if mode == b"on":
                self._reply_mode = 0
        self._forward_raw(argv, out)

    def _cmd_monitor(self, argv: list[bytes], out: list[bytes]) -> None:
        decision = self._decide_special(argv)
        if decision is None:
            return
        # MONITOR shows every key and value
        self._audit_command(decision.command, decision.keys, out)
        self._forward_tracked(argv, out, Pending(K_MONITOR))

    def _forward_raw(self, argv: list[bytes], out: list[bytes]) -> None:
        out.append(encode_command(argv))
        if self._reply_mode == 0:
            self._pending.append(self.counts[argv[0].lower().decode("ascii", "replace")])
        elif self._reply_mode == 2:
            self._reply_mode = 0

    # ------------------------------------------------------------------ replies
    def backend_data(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        self.bytes_out += len(data)
        framer = self._replies
        if self._rtt_start:
            self._observe_rtt(time.perf_counter() - self._rtt_start)
            self._rtt_start = 0.0
        try:
            if not self._special and self._frame_buf is None and not self._pubsub_context():
                # Fast path: every reply answers a plain entry; relay the chunk as it is and
                # count each reply as ok or error by its first byte.
                framer.subscribed = False
                pending = self._pending
                continuing = not framer.at_boundary
                first = self._frame_first
                start = 0
                for end, kind, _ in framer.feed(data):
                    if start or not continuing:
                        first = data[start]
                    start = end
                    if kind == REPLY:
                        if pending:
                            pending.popleft()[ERROR if first == 0x2D else OK] += 1
                        else:
                            log.warning("unexpected reply from the backend for %s", self.src)
                if not framer.at_boundary:
                    self._frame_streamed = True
                    if start or not continuing:
                        self._frame_first = data[start]
                else:
                    self._frame_streamed = False
                transport.write(data)
            else:
                self._relay(data)
        except ProtocolError as exc:
            log.error("backend sent malformed RESP (%s); closing %s", exc, self.src)
            self._abort_both()
            return
        if self._closing:
            self._close_when_drained()

    def _pubsub_context(self) -> bool:
        """Whether frames may be pub/sub traffic: subscribed, monitoring, or subscribing."""
        subs = self._subs
        if self._monitor or subs["channels"] or subs["patterns"] or subs["shard"]:
            return True
        pending = self._pending
        return bool(pending) and type(pending[0]) is Pending and pending[0].kind == K_SUB

    def _relay(self, data: bytes) -> None:
        """General path: frame by frame, so state changes apply exactly between frames."""
        framer = self._replies
        out: list[bytes] = []
        pos, size = 0, len(data)
        while pos < size:
            if framer.at_boundary:
                self._frame_first = data[pos]
                self._frame_streamed = False
            # RESP2 pub/sub messages are plain arrays: only recognised in pub/sub context.
            framer.subscribed = self._proto == 2 and self._pubsub_context()
            events = framer.feed(data, pos, 1)
            if not events:  # the rest is the start of a frame that ends in a later chunk
                tail = data[pos:]
                if self._frame_buf is not None:
                    self._frame_buf.append(tail)
                elif self._head_needs_whole_frame():
                    self._frame_buf = [tail]
                else:
                    out.append(tail)
                    self._frame_streamed = True
                break
            end, kind, confirm = events[0]
            chunk = data[pos:end]
            pos = end
            if self._frame_buf is not None:
                self._frame_buf.append(chunk)
                chunk = b"".join(self._frame_buf)
                self._frame_buf = None
                whole = True
            else:
                whole = not self._frame_streamed
            self._frame_streamed = False
            self._on_frame(kind, confirm, chunk, whole, out)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _on_frame(self, kind: int, confirm: SubConfirm | None, chunk: bytes, whole: bool,
                  out: list[bytes]) -> None:
        if self._monitor or kind == PUSH:
            out.append(chunk)
            return
        pending = self._pending
        self._release_locals(out)
        if not pending:
            log.warning("unexpected reply from the backend for %s; relayed", self.src)
            out.append(chunk)
            return
        head = pending[0]
        if type(head) is list:
            out.append(chunk)
            pending.popleft()[ERROR if self._frame_first == 0x2D else OK] += 1
        else:
            self._reply_to_entry(head, kind, confirm, chunk, whole, out)
        self._release_locals(out)

    def _head_needs_whole_frame(self) -> bool:
        """Whether the frame now arriving must be held until complete (filter/swallow)."""
        if self._monitor or not self._pending:
            return False
        head = self._pending[0]
        return isinstance(head, Pending) and head.kind in (K_FILTER, K_SWALLOW, K_REPLACE)

    def _release_locals(self, out: list[bytes]) -> None:
        pending = self._pending
        while pending and type(pending[0]) is bytes:
            out.append(pending.popleft())
            self._special -= 1

    def _pop_special(self) -> None:
        """The head Pending entry got its whole answer: drop it and count it once."""
        entry = self._pending.popleft()
        self._special -= 1
        if entry.slot is not None:
            entry.slot[ERROR if self._frame_first == 0x2D else OK] += 1

    def _reply_to_entry(self, entry: Pending, kind: int, confirm: SubConfirm | None,
                        chunk: bytes, whole: bool, out: list[bytes]) -> None:
        is_error = self._frame_first == 0x2D  # '-'
        k = entry.kind
        if k == K_SUB:
            out.append(chunk)
            if kind == SUB_CONFIRM and confirm is not None:
                if entry.remaining < 0:
                    # Argument-less UNSUBSCRIBE: one confirmation per current subscription
                    # of its kind, or one (nil channel) when there is none.
                    entry.remaining = max(1, len(self._subs[entry.sub_kind]))
                self._track_confirmation(confirm)
                entry.remaining -= 1
                if entry.remaining == 0:
                    self._pop_special()
            else:  # an error or +QUEUED answers the whole command
                self._pop_special()
            return
        self._pop_special()
        if k == K_FILTER:
            out.append(entry.filter(chunk) if whole and not is_error else chunk)
        elif k == K_SWALLOW:
            if is_error:
                log.error("backend refused the proxy's AUTH after RESET; closing %s", self.src)
                self._closing = True
        elif k == K_REPLACE:
            out.append(entry.data)
        else:
            out.append(chunk)
            if is_error:
                if k == K_SELECT:
                    self._audit_db = self._db  # Redis refused it: still where we were
                return
            if k == K_HELLO:
                self._proto = entry.arg
            elif k == K_SELECT:
                self._db = entry.arg
            elif k == K_RESET:
                self._proto, self._db, self._audit_db, self._monitor = 2, 0, 0, False
                for subs in self._subs.values():
                    subs.clear()
            elif k == K_MONITOR:
                self._monitor = True

    def _track_confirmation(self, confirm: SubConfirm) -> None:
        if confirm.channel is None:
            return
        subs = self._subs[SUB_NAMES[confirm.name.lower()]]
        if confirm.name.lower().endswith(b"unsubscribe"):
            subs.discard(confirm.channel)
        else:
            subs.add(confirm.channel)

    # ------------------------------------------------------------------ backend lifecycle
    def _connect_backend(self) -> None:
        if self.backend is not None or self._connecting is not None:
            return
        self._connecting = asyncio.get_running_loop().create_task(self._acquire_backend())

    async def _acquire_backend(self) -> None:
        try:
            backend = await self.state.pool.acquire()
        except BackendUnavailable:
            self._connecting = None
            self._early.clear()
            self._fail_pending()
            self._resume_client("backend-connect")
            return
        start_db = self._start_db()
        if start_db:
            # A role without database 0 starts in its first allowed database, confirmed
            # before any command of the client's: Redis would put every client in db 0.
            try:
                reply = await backend.request(
                    encode_command([b"SELECT", str(start_db).encode()]),
                    self.state.config.backend.connect_timeout_s)
            except (BackendUnavailable, TimeoutError) as exc:
                reply = exc
            if reply != b"OK":
                log.error("backend refused SELECT %d for role %s: %s; closing %s",
                          start_db, self.role_name, reply, self.src)
                backend.close()
                self._connecting = None
                self._early.clear()
                self._fail_pending()
                self._closing = True
                if self.transport is not None:
                    self.transport.close()
                return
            self._db = self._audit_db = start_db
        self._connecting = None
        if self._closing and self.transport is None:
            backend.close()
            return
        self.backend = backend
        backend.attach(self)
        if self._early:
            backend.write(b"".join(self._early))
            self._early.clear()
        self._resume_client("backend-connect")

    def _start_db(self) -> int:
        dbs = getattr(self.role, "dbs", None)
        return min(dbs) if dbs and 0 not in dbs else 0

    def _fail_pending(self) -> None:
        """Answer every request still owed a reply with `backend unavailable`, in order."""
        out: list[bytes] = []
        while self._pending:
            entry = self._pending.popleft()
            if type(entry) is bytes:
                out.append(entry)
            elif type(entry) is list:
                entry[ERROR] += 1
                out.append(canned.BACKEND_UNAVAILABLE)
            elif entry.kind != K_SWALLOW:
                out.append(canned.BACKEND_UNAVAILABLE)
        self._special = 0
        self._frame_buf = None
        self._frame_streamed = False
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def backend_lost(self, exc: Exception | None) -> None:
        self.backend = None
        if self.transport is None or self.transport.is_closing():
            return
        if self._closing:
            self._close_when_drained(force=True)
            return
        log.warning("backend connection of %s lost%s", self.src, f": {exc}" if exc else "")
        self.state.backend_lost(self)
        # The backend's connection state (db, MULTI, subscriptions) is gone with it: answer
        # what is owed, then close, rather than silently continue on a fresh connection.
        self._fail_pending()
        self._closing = True
        self.transport.close()

    def backend_pause_writing(self) -> None:
        self._pause_client("backend-write")

    def backend_resume_writing(self) -> None:
        self._resume_client("backend-write")

    # ------------------------------------------------------------------ helpers
    def _pause_client(self, reason: str) -> None:
        if not self._client_paused_reasons and self.transport is not None:
            self.transport.pause_reading()
        self._client_paused_reasons.add(reason)

    def _resume_client(self, reason: str) -> None:
        self._client_paused_reasons.discard(reason)
        if not self._client_paused_reasons and self.transport is not None and \
                not self.transport.is_closing():
            self.transport.resume_reading()

    def _protocol_error(self, message: str) -> None:
        self.state.events.protocol_error(self.src, message)
        # Nothing of this read reaches the backend, not even the well-formed commands
        # before the bad one (SPEC §7; Redis would run them): a client that sends garbage
        # is not trusted with the rest. Replies owed for earlier reads still go out first.
        self._closing = self._stop_reading = True
        self._framer = None  # type: ignore[assignment]
        self._reply_mode = 0  # Redis sends protocol errors even with CLIENT REPLY OFF
        self._local(canned.protocol_error(message))
        self._close_when_drained()

    def _close_when_drained(self, force: bool = False) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self._queued and not force:
            return  # reads not decided yet (finish_queued comes back here once they are)
        if force or not self._pending:
            if self._pending:
                self._fail_pending()
            self.transport.close()
            return
        if self._shutting_down:
            return  # the server's drain deadline bounds the wait
        # Bound the wait for owed replies.
        asyncio.get_running_loop().call_later(
            self.state.drain_timeout_s, self._close_when_drained, True)

    def abort(self) -> None:
        """Drop the connection at once (nothing of it is forwarded any more)."""
        self._closing = self._stop_reading = True
        self._queued.clear()
        self._abort_both()

    def _abort_both(self) -> None:
        if self.backend is not None:
            self.backend.user = None
            self.backend.abort()
            self.backend = None
        if self.transport is not None:
            self.transport.abort()

    def _schedule_idle_check(self) -> None:
        timeout = self.state.config.listener.idle_timeout_s
        if timeout > 0:
            self._idle_handle = asyncio.get_running_loop().call_later(timeout, self._idle_check)

    def _idle_check(self) -> None:
        timeout = self.state.config.listener.idle_timeout_s
        idle_for = time.monotonic() - self._last_activity
        # Like Redis's `timeout`: blocked, subscribed and monitoring clients are not idle.
        busy = self._pending or self._pubsub_context()
        if idle_for >= timeout and not busy and self.transport is not None:
            log.info("closing idle connection from %s after %.0f s", self.src, idle_for)
            self._closing = True
            self.transport.close()
            return
        delay = timeout - idle_for if idle_for < timeout else timeout
        self._idle_handle = asyncio.get_running_loop().call_later(delay, self._idle_check)

    def set_role(self, role_name: str, role: Any, decide: Any, counts: CommandCounts) -> None:
        """Reload: the new role's rules apply from the next command on."""
        if role_name != self.role_name:
            self._audit_conn = self.state.audit.records.connection(
                self.conn_id, self.src, self.identity, role_name)
        self.role_name, self.role, self._decide, self.counts = role_name, role, decide, counts

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
        self._pause_client("shutdown")
        self._close_when_drained()


_SPECIAL: dict[bytes, Callable[[Session, list[bytes], list[bytes]], None]] = {
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
    b"reset": Session._cmd_reset,
    b"quit": Session._cmd_quit,
    b"client": Session._cmd_client,
    b"monitor": Session._cmd_monitor,
}
