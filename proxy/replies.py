"""What one client is owed, in request order, and the Redis state that decides how each
reply is handled. No I/O: every method takes reply bytes and appends what the client
should receive to an `out` list, so it is tested on plain bytes.

Every request leaves one `Pending` entry in the client's `ReplyQueue`:
  - LOCAL: a reply the proxy made itself (a refusal, AUTH's +OK, a local SELECT); it goes
    out as soon as every earlier reply has;
  - anything else is answered by the backend: the backend connection that carried the
    request hands over each reply frame (`answer`), in the order it was sent.
Entries of plain commands carry no per-request state, so one entry per (command, shown or
silenced) is made once per client and used again (`plain`): forwarding a GET allocates
nothing here.

A client's requests are always in flight on one backend connection at a time (the
session switches connections only when nothing is in flight), so the entry a frame
answers is always the queue's head once the LOCAL entries before it have gone out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from proxy.resp import canned
from proxy.resp.reply import PUSH, SUB_CONFIRM, SubConfirm

OK, ERROR, DENIED = 0, 1, 2  # indexes into a metrics slot [ok, error, denied]
_MINUS = 0x2D  # '-': an error reply

# Entry kinds.
PLAIN = 0  # relay the reply as it is
SILENT = 1  # count the reply, show nothing (CLIENT REPLY OFF/SKIP)
LOCAL = 2  # `data` is the reply, made here
FILTER = 3  # rewrite the whole reply with `filter` (KEYS/SCAN/PUBSUB CHANNELS)
REPLACE = 4  # send `data` instead of the backend's reply (EXEC turned into DISCARD)
SWALLOW = 5  # the proxy's own request (AUTH after RESET, SELECT/HELLO prefixes): not shown
SUB = 6  # SUBSCRIBE family: `remaining` confirmations answer it
MONITOR = 7  # after +OK the connection carries a MONITOR stream
RESET = 8  # reset the tracked state when Redis confirms
EXEC = 9  # a transaction ends: keep its SELECT (`arg`) if it ran, else go back (`data`)
MULTI = 10  # a transaction starts: what its commands need of EXEC's reply starts empty

WHOLE = frozenset({FILTER, REPLACE, SWALLOW})  # kinds that need the complete frame

SUB_KINDS = {
    b"subscribe": "channels", b"unsubscribe": "channels",
    b"psubscribe": "patterns", b"punsubscribe": "patterns",
    b"ssubscribe": "shard", b"sunsubscribe": "shard",
}


class Pending:
    """One request's reply slot. `queue` is the client's ReplyQueue (None for the proxy's
    own requests on a backend connection); `slot` the metrics counters of its command."""

    __slots__ = ("queue", "kind", "slot", "data", "arg", "remaining", "sub_kind", "filter")

    def __init__(self, queue: ReplyQueue | None, kind: int, slot: list[int] | None = None,
                 data: bytes = b"", arg: int = 0, remaining: int = 1, sub_kind: str = "",
                 filter: Callable[[bytes], bytes] | None = None) -> None:
        self.queue = queue
        self.kind = kind
        self.slot = slot
        self.data = data
        self.arg = arg
        self.remaining = remaining
        self.sub_kind = sub_kind
        self.filter = filter


DROP = -1  # a queued command whose EXEC reply element the client never asked for
_QUEUED = b"+QUEUED\r\n"


def rewrite_exec(queued: list[Callable[[bytes], bytes] | None | int],
                 frame: bytes) -> bytes:
    """EXEC's array with each element as its command needs it (`ReplyQueue.queued`)."""
    from proxy.protect import resp  # only transactions on protected keys get here

    node = resp.parse(frame)
    if node.value is None:
        return frame
    elements = [resp.encode(item) for item in node.value]
    kept = []
    for i, element in enumerate(elements):
        need = queued[i] if i < len(queued) else None
        if need == DROP:
            continue
        kept.append(need(element) if callable(need) and element[:1] != b"-" else element)
    return b"*%d\r\n%s" % (len(kept), b"".join(kept))


def swallowed() -> Pending:
    """An entry for one of the proxy's own requests on a backend connection."""
    return Pending(None, SWALLOW)


class ReplyQueue:
    """One client's owed replies and tracked connection state."""

    __slots__ = ("entries", "in_flight", "proto", "db", "subs", "monitor", "silence",
                 "sink", "_plain", "_silent", "queued")

    def __init__(self, sink: Callable[[list[bytes]], None] | None = None) -> None:
        self.sink = sink  # where a backend connection hands this client's reply bytes
        self.entries: deque[Pending] = deque()
        self.in_flight = 0  # entries sent to Redis and not yet answered
        self.proto = 2  # RESP version of the client's HELLO
        self.db = 0  # the client's database (SELECT is answered by the proxy)
        self.subs: dict[str, set[bytes]] = {"channels": set(), "patterns": set(),
                                            "shard": set()}
        self.monitor = False  # Redis confirmed MONITOR: frames are a stream now
        self.silence = 0  # CLIENT REPLY: 0 on, 1 off, 2 skip the next command's reply
        self._plain: dict[int, Pending] = {}  # id(slot) -> shared PLAIN entry
        self._silent: dict[int, Pending] = {}
        # Inside MULTI, what each command Redis answered +QUEUED needs of EXEC's reply:
        # None (as it is), a reply filter (a protected value to decrypt) or DROP (the
        # proxy's own follow-up, which the client never sent). Positions are Redis's own.
        self.queued: list[Callable[[bytes], bytes] | None | int] = []

    def detach(self) -> None:
        """The client is gone: drop what refers back to it or to this queue (its sink,
        the shared entries), so refcounting frees both at once instead of a full
        collection later. Entries still in a backend FIFO keep working; their replies
        have nowhere to go."""
        self.sink = None
        self._plain.clear()
        self._silent.clear()

    # ---------------------------------------------------------------- requests
    def plain(self, slot: list[int]) -> Pending:
        """The entry for a command whose reply is relayed as it is (silenced if CLIENT
        REPLY says so), queued."""
        if self.silence:
            if self.silence == 2:
                self.silence = 0
            entry = self._silent.get(id(slot))
            if entry is None:
                entry = self._silent[id(slot)] = Pending(self, SILENT, slot)
        else:
            entry = self._plain.get(id(slot))
            if entry is None:
                entry = self._plain[id(slot)] = Pending(self, PLAIN, slot)
        self.entries.append(entry)
        return entry

    def special(self, kind: int, slot: list[int] | None = None, **fields: object) -> Pending:
        """A queued entry whose reply changes state or is rewritten."""
        entry = Pending(self, kind, slot, **fields)  # type: ignore[arg-type]
        if self.silence and kind in (FILTER, REPLACE):
            entry.kind = SILENT  # nothing is shown anyway
        if self.silence == 2:
            self.silence = 0
        self.entries.append(entry)
        return entry

    def local(self, reply: bytes) -> bytes:
        """A reply made here: returned to be written now if nothing is owed before it,
        else queued behind what is (b"" then)."""
        if self.silence:
            if self.silence == 2:
                self.silence = 0
            return b""
        if self.entries:
            self.entries.append(Pending(self, LOCAL, data=reply))
            return b""
        return reply

    @property
    def pubsub(self) -> bool:
        """Frames may be pub/sub traffic: subscribed, monitoring, or subscribing."""
        subs = self.subs
        if self.monitor or subs["channels"] or subs["patterns"] or subs["shard"]:
            return True
        entries = self.entries
        return bool(entries) and entries[0].kind == SUB

    @property
    def subscribed(self) -> bool:
        subs = self.subs
        return bool(subs["channels"] or subs["patterns"] or subs["shard"])

    # ---------------------------------------------------------------- replies
    def release(self, out: list[bytes]) -> None:
        """LOCAL replies now at the head go out."""
        entries = self.entries
        while entries and entries[0].kind == LOCAL:
            out.append(entries.popleft().data)

    def answer(self, kind: int, confirm: SubConfirm | None, chunk: bytes, whole: bool,
               first: int, out: list[bytes]) -> bool:
        """A complete reply frame (or its last part, `whole` False) for the head entry.
        `first` is the frame's first byte. True when the entry is done."""
        entries = self.entries
        entry = entries[0]
        is_error = first == _MINUS
        k = entry.kind
        if chunk == _QUEUED:  # inside MULTI: what EXEC's element for it will need
            if k != SILENT:  # SILENT: the proxy's own follow-up, never shown
                out.append(chunk)
            self.queued.append(entry.filter if k == FILTER else DROP if k == SILENT else None)
        elif k == SUB and kind == SUB_CONFIRM and confirm is not None:
            out.append(chunk)
            if entry.remaining < 0:
                # Argument-less UNSUBSCRIBE: one confirmation per current subscription
                # of its kind, or one (nil channel) when there is none.
                entry.remaining = max(1, len(self.subs[entry.sub_kind]))
            self._track(confirm)
            entry.remaining -= 1
            if entry.remaining > 0:
                return False
        elif k in (PLAIN, SUB):  # SUB: an error or +QUEUED answers the whole command
            out.append(chunk)
        elif k == FILTER:
            out.append(entry.filter(chunk) if whole and not is_error else chunk)  # type: ignore[misc]
        elif k == REPLACE:
            out.append(chunk if is_error else entry.data)
        elif k in (SILENT, SWALLOW):
            pass
        else:
            out.append(chunk)
            if not is_error:
                if k == MULTI:
                    self.queued = []
                elif k == MONITOR:
                    self.monitor = True
                elif k == RESET:
                    self.reset_state(entry.arg)
            if k == EXEC:
                # A transaction that ran keeps the SELECT queued in it; an aborted one
                # (error, or nil when a WATCHed key changed) never ran it.
                ran = not is_error and chunk[:3] not in (b"*-1", b"_\r\n")
                self.db = entry.arg if ran else int(entry.data)
                if ran and entry.filter is not None:
                    out[-1] = entry.filter(chunk)  # protected values inside the array
                self.queued = []
        entries.popleft()
        self.in_flight -= 1
        if entry.slot is not None:
            entry.slot[ERROR if is_error else OK] += 1
        if entries and entries[0].kind == LOCAL:
            self.release(out)
        return True

    def push(self, kind: int, confirm: SubConfirm | None, chunk: bytes, out: list[bytes]) -> bool:
        """A frame on a dedicated connection: pub/sub and MONITOR traffic go straight to
        the client (True); anything else answers the head entry (False)."""
        if self.monitor or kind == PUSH:
            out.append(chunk)
            return True
        return False

    def fail_all(self, out: list[bytes]) -> None:
        """Answer everything still owed `backend unavailable` (LOCAL replies as they are)."""
        entries = self.entries
        while entries:
            entry = entries.popleft()
            if entry.kind == LOCAL:
                out.append(entry.data)
            elif entry.kind not in (SWALLOW, SILENT):
                if entry.slot is not None:
                    entry.slot[ERROR] += 1
                out.append(canned.BACKEND_UNAVAILABLE)
        self.in_flight = 0

    def reset_state(self, db: int) -> None:
        """RESET: back to a new connection's state (in the role's starting db)."""
        self.proto, self.db, self.monitor, self.silence = 2, db, False, 0
        for subs in self.subs.values():
            subs.clear()

    def _track(self, confirm: SubConfirm) -> None:
        if confirm.channel is None:
            return
        name = confirm.name.lower()
        subs = self.subs[SUB_KINDS[name]]
        if name.endswith(b"unsubscribe"):
            subs.discard(confirm.channel)
        else:
            subs.add(confirm.channel)
