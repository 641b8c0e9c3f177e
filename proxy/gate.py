"""The audit gate: nothing reaches Redis before its audit record is written.

Client reads are framed as they arrive and decided once per event loop iteration: every
session with a read queued in this iteration is prepared (decided, records built), all
their records go out in one write (one write-ahead for many clients), then each read is
released to the backend, or, if the write failed and `fail_closed`, its audited commands
are taken back (answered `-ERR audit unavailable`, never sent).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from proxy.replies import LOCAL, Pending, ReplyQueue
from proxy.resp import canned

log = logging.getLogger("phiproxy.gate")


class Batch:
    """One client read, decided: what goes to Redis and what waits for the audit write.

    `items[i]` is one request for Redis (an argv list, encoded when sent, or bytes) and
    `entries[i]` the reply slot it fills; `qidx[i]` where that entry stands in the
    client's ReplyQueue (-1 for the proxy's own requests). `segments` cut the items where
    the database, protocol or connection they need changes: [start, db, proto,
    dedicated, after], `after` the (db, proto) the segment's own requests leave a
    connection in, when they change it (SELECT inside MULTI, RESET)."""

    __slots__ = ("items", "entries", "qidx", "segments", "raw", "records", "audited",
                 "multi", "received_at")

    def __init__(self, db: int, proto: int, dedicated: bool, received_at: float) -> None:
        self.items: list[Any] = []
        self.entries: list[Pending] = []
        self.qidx: list[int] = []
        self.segments: list[list[Any]] = [[0, db, proto, dedicated, None]]
        self.raw: bytes | None = None  # the read's bytes, when they can go as they are
        self.records: list[bytes] = []  # audit record bodies, written before any send
        self.audited: list[int] = []  # items whose records those are
        self.multi = False  # a transaction was open: a failed write takes back everything
        self.received_at = received_at

    def cut(self, db: int, proto: int, dedicated: bool,
            after: tuple[int, int] | None = None) -> None:
        """Requests from here on need this db, protocol and connection kind; `after` is
        what the requests so far leave a connection in."""
        current = self.segments[-1]
        if after is not None:
            current[4] = after
        if current[0] == len(self.items):  # nothing in it yet: just change it
            current[1:4] = (db, proto, dedicated)
            return
        if after is None and current[1] == db and current[2] == proto \
                and current[3] == dedicated:
            return
        self.segments.append([len(self.items), db, proto, dedicated, None])


def take_back(batch: Batch, queue: ReplyQueue) -> None:
    """The batch's records were not written (fail_closed): its audited requests never go
    to Redis, and each is answered `-ERR audit unavailable` in its place. Where a
    transaction was open, the whole read is taken back: taking back only the audited
    commands would let EXEC run the rest (the transaction ends in EXECABORT)."""
    taken = range(len(batch.items)) if batch.multi else batch.audited
    entries = queue.entries
    for index in taken:
        batch.items[index] = None
        position = batch.qidx[index]
        if position < 0:
            continue
        entry = entries[position]
        if entry.slot is not None:
            entry.slot[1] += 1  # ERROR
        entries[position] = Pending(queue, LOCAL, data=canned.AUDIT_UNAVAILABLE)


class Gated(Protocol):
    """What the gate asks of a session."""

    src: str

    def run_queued(self) -> list[Batch]: ...
    def finish_queued(self, batches: list[Batch], ok: bool) -> None: ...
    def abort(self) -> None: ...


class AuditGate:
    """Owns the per-iteration batching, the audit write and whether it is failing."""

    def __init__(self, write: Callable[[list[bytes]], bool], fail_closed: bool,
                 after_release: Callable[[], None] = lambda: None,
                 on_failing: Callable[[bool], None] = lambda failing: None) -> None:
        self._write = write
        self.fail_closed = fail_closed
        self._after_release = after_release  # the backend writes of this iteration
        self._on_failing = on_failing
        self.failing = False  # set by a failed write-ahead, cleared by the next good one
        self._due: list[Gated] | None = None

    def defer(self, session: Gated) -> None:
        """`session` queued its first read of this loop iteration: decide it (and every
        other queued read) once the iteration's I/O callbacks are done."""
        if self._due is None:
            self._due = []
            asyncio.get_running_loop().call_soon(self.flush)
        self._due.append(session)

    def flush(self) -> None:
        """Decide every queued read, write all their records at once, then release."""
        sessions, self._due = self._due or [], None
        prepared = []
        for session in sessions:
            try:
                prepared.append((session, session.run_queued()))
            except Exception:  # a bug in one session must not stall the others
                log.exception("session %s failed; closing it", session.src)
                session.abort()
        records = [record for _, batches in prepared for batch in batches
                   for record in batch.records]
        ok = self.write(records) if records else True
        for session, batches in prepared:
            try:
                session.finish_queued(batches, ok)
            except Exception:
                log.exception("session %s failed; closing it", session.src)
                session.abort()
        self._after_release()

    def write(self, records: list[bytes]) -> bool:
        """Write records ahead of their commands; False when they could not be."""
        try:
            ok = self._write(records)
        except Exception:  # a bug in the writer: refuse the audited commands, as on failure
            log.exception("audit write raised")
            ok = False
        if ok != (not self.failing):
            self.failing = not ok
            self._on_failing(self.failing)
        return ok

    def must_take_back(self, batch: Batch, ok: bool) -> bool:
        return not ok and self.fail_closed and bool(batch.audited)
