"""proxy/heap.py: what is alive at start is frozen; what a reload made garbage is freed."""

import asyncio
import gc
import weakref

from proxy import heap


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


def test_settle_freezes_what_is_alive() -> None:
    try:
        kept = Node()
        heap.settle()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == heap.GC_THRESHOLDS  # young collections less often
        # A frozen object is outside every generation: a full collection does not walk it.
        assert all(kept is not obj for obj in gc.get_objects(generation=2))
    finally:
        gc.unfreeze()
        gc.set_threshold(700, 10, 10)


def test_a_second_settle_frees_what_the_first_froze_and_is_garbage_now() -> None:
    try:
        old_roles = Node()
        ref = weakref.ref(old_roles)
        heap.settle()
        del old_roles  # a reload replaced it: frozen garbage unless settle thaws it
        gc.collect()
        assert ref() is not None  # frozen: the collector cannot free it
        heap.settle()
        assert ref() is None
    finally:
        gc.unfreeze()


def test_a_closed_session_is_freed_by_refcounting_alone() -> None:
    """No full collection is needed to free a closed connection's session (they are rare
    by design, and walk every live connection when they come)."""
    from tests.unit.session_harness import FakeRouter, cmd, make_session

    router = FakeRouter()

    def one_session() -> None:
        session = make_session(router)
        session.data_received(cmd("SET", "app:phi:a", "1") + cmd("GET", "x"))
        router.flush()
        router.shared.conn.data_received(b"+OK\r\n$-1\r\n")
        session.connection_lost(None)

    one_session()  # first-use allocations (compiled plans, caches) out of the way
    gc.collect()
    gc.disable()
    try:
        one_session()
        garbage_before = set(map(id, gc.get_objects()))
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        kinds = {type(obj).__name__ for obj in gc.garbage}
        assert not kinds & {"Session", "ReplyQueue", "Pending", "ConnectionRecords"}, kinds
        assert garbage_before  # the walk itself ran
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def test_the_trimmer_runs_once_after_a_storm_and_not_for_a_few_closes() -> None:
    calls: list[int] = []
    done = asyncio.Event()

    def fake_trim(pad: int) -> int:
        calls.append(pad)
        done.set()
        return 1

    trimmer = heap.Trimmer(fake_trim)
    trimmer.QUIET_S = 0.05
    for _ in range(trimmer.STORM - 1):
        trimmer.closed()
    await asyncio.sleep(0.2)
    assert calls == []  # a few closes are normal life, not a storm
    trimmer.closed()
    for _ in range(500):  # a storm: closes keep coming; one trim once they stop
        trimmer.closed()
    await asyncio.wait_for(done.wait(), 2)
    await asyncio.sleep(0.2)
    assert calls == [0] and trimmer.trims == 1


async def test_under_steady_churn_the_trim_still_comes_by_the_latest_delay() -> None:
    done = asyncio.Event()
    trimmer = heap.Trimmer(lambda pad: done.set() or 1)
    trimmer.QUIET_S, trimmer.LATEST_S = 0.2, 0.3
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not done.is_set() and loop.time() - start < 2:
        trimmer.closed()  # never quiet for QUIET_S
        await asyncio.sleep(0.01)
    assert done.is_set() and loop.time() - start < 1.0
