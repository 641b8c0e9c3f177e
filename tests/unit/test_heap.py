"""proxy/heap.py: what is alive at start is frozen; what a reload made garbage is freed."""

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
        # A frozen object is outside every generation: a full collection does not walk it.
        assert all(kept is not obj for obj in gc.get_objects(generation=2))
    finally:
        gc.unfreeze()


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
