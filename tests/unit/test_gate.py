"""AuditGate: one audit write for every read queued in a loop iteration, a broken session
never stalls the others, and a failed write takes back exactly the audited requests."""

from __future__ import annotations

import asyncio
from pathlib import Path

from proxy.gate import AuditGate, Batch, take_back
from proxy.replies import LOCAL, ReplyQueue
from proxy.resp import canned


class FakeSession:
    """Stands in for Session's side of the gate (run_queued / finish_queued / abort)."""

    def __init__(self, name: str, records: list[bytes], fail_in: str = "") -> None:
        self.src = name
        self.records = records
        self.fail_in = fail_in
        self.finished: list[tuple[int, bool]] = []
        self.aborted = False

    def run_queued(self) -> list[Batch]:
        if self.fail_in == "run":
            raise RuntimeError("bug while deciding")
        batch = Batch(0, 2, False, 0.0)
        batch.records.extend(self.records)
        return [batch]

    def finish_queued(self, batches: list[Batch], ok: bool) -> None:
        if self.fail_in == "finish":
            raise RuntimeError("bug while forwarding")
        self.finished.append((len(batches), ok))

    def abort(self) -> None:
        self.aborted = True


class FileSink:
    def __init__(self, path: Path, fail: bool = False) -> None:
        self.path = path
        self.fail = fail
        self.writes = 0

    def __call__(self, records: list[bytes]) -> bool:
        if self.fail:
            return False
        self.writes += 1
        with self.path.open("ab") as f:
            f.write(b"".join(r + b"\n" for r in records))
        return True


async def test_every_queued_read_shares_one_write(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "audit")
    released = []
    gate = AuditGate(sink, fail_closed=True, after_release=lambda: released.append(1))
    sessions = [FakeSession(f"s{i}", [b"r%d" % i, b"r%d" % (i + 10)]) for i in range(3)]
    for session in sessions:
        gate.defer(session)
    assert sink.writes == 0  # nothing before the iteration ends
    await asyncio.sleep(0)
    assert sink.writes == 1  # one write for all six records
    assert (tmp_path / "audit").read_bytes().split() == [b"r0", b"r10", b"r1", b"r11", b"r2",
                                                         b"r12"]  # in queue order
    assert all(s.finished == [(1, True)] for s in sessions)
    assert released == [1]  # the backend writes follow the release, once


async def test_a_broken_session_is_closed_and_the_others_still_forward(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "audit")
    gate = AuditGate(sink, fail_closed=True)
    good1, bad_run, bad_finish, good2 = (FakeSession("a", [b"n1"]),
                                         FakeSession("b", [b"n2"], fail_in="run"),
                                         FakeSession("c", [b"n3"], fail_in="finish"),
                                         FakeSession("d", [b"n4"]))
    for session in (good1, bad_run, bad_finish, good2):
        gate.defer(session)
    await asyncio.sleep(0)
    assert good1.finished == [(1, True)] and good2.finished == [(1, True)]
    assert bad_run.aborted and bad_finish.aborted and not good1.aborted
    assert (tmp_path / "audit").read_bytes().split() == [b"n1", b"n3", b"n4"]


async def test_a_failed_write_is_reported_to_every_session_and_sets_failing(
        tmp_path: Path) -> None:
    changes = []
    gate = AuditGate(FileSink(tmp_path / "audit", fail=True), fail_closed=True,
                     on_failing=changes.append)
    sessions = [FakeSession("a", [b"x"]), FakeSession("b", [b"y"])]
    for session in sessions:
        gate.defer(session)
    await asyncio.sleep(0)
    assert [s.finished for s in sessions] == [[(1, False)], [(1, False)]]
    assert gate.failing and changes == [True]
    assert gate.write([b"z"]) is False and changes == [True]  # reported once


def test_a_writer_that_raises_counts_as_a_failed_write() -> None:
    def broken(records: list[bytes]) -> bool:
        raise OSError("disk gone")

    gate = AuditGate(broken, fail_closed=True)
    assert gate.write([b"r"]) is False and gate.failing


def test_take_back_replaces_only_audited_requests() -> None:
    queue = ReplyQueue()
    slot_get, slot_set = [0, 0, 0], [0, 0, 0]
    batch = Batch(0, 2, False, 0.0)
    for argv, slot, audited in (([b"GET", b"public"], slot_get, False),
                                ([b"SET", b"app:phi:1", b"v"], slot_set, True)):
        if audited:
            batch.audited.append(len(batch.items))
            batch.records.append(b"record")
        batch.items.append(argv)
        batch.entries.append(queue.plain(slot))
        batch.qidx.append(len(queue.entries) - 1)
    gate = AuditGate(lambda records: False, fail_closed=True)
    assert gate.must_take_back(batch, ok=False)
    take_back(batch, queue)
    assert batch.items == [[b"GET", b"public"], None]  # the unaudited GET still goes
    assert queue.entries[1].kind == LOCAL and queue.entries[1].data == canned.AUDIT_UNAVAILABLE
    assert slot_set == [0, 1, 0]  # counted as an error
    out: list[bytes] = []
    queue.in_flight = 1
    queue.answer(0, None, b"$1\r\nx\r\n", True, ord("$"), out)
    assert out == [b"$1\r\nx\r\n", canned.AUDIT_UNAVAILABLE]  # in request order


def test_take_back_inside_a_transaction_takes_the_whole_read() -> None:
    queue = ReplyQueue()
    batch = Batch(0, 2, True, 0.0)
    batch.multi = True
    for argv in ([b"INCR", b"counter"], [b"SET", b"app:phi:1", b"v"], [b"EXEC"]):
        batch.items.append(argv)
        batch.entries.append(queue.plain([0, 0, 0]))
        batch.qidx.append(len(queue.entries) - 1)
    batch.audited.append(1)
    take_back(batch, queue)
    assert batch.items == [None, None, None]  # EXEC must not run the rest
    assert all(entry.kind == LOCAL for entry in queue.entries)


def test_without_fail_closed_nothing_is_taken_back() -> None:
    batch = Batch(0, 2, False, 0.0)
    batch.audited.append(0)
    assert not AuditGate(lambda r: False, fail_closed=False).must_take_back(batch, ok=False)
    assert not AuditGate(lambda r: True, fail_closed=True).must_take_back(batch, ok=True)
