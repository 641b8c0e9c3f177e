"""The process heap: keep the cyclic garbage collector off long-lived objects, and give
memory back to the system after a storm of connections.

Measured on the running proxy (bench/README.md, "Latency stability"): the hot path
allocates few container objects (67 young collections in 30,000 GETs at c=1), but a full
collection walks every tracked object, and the command table, compiled roles and
metrics are thousands of them: full collections took up to 16 ms under GET c50 P16,
which is the proxy's p99.9/max spike. `gc.freeze()` moves everything alive at start (and
after a reload) to a permanent generation the collector never walks, the way CPython's
docs suggest for servers (and as Instagram's Django fork does).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger("phiproxy.heap")


# Young collections every 10,000 container allocations instead of 700: the hot path's
# objects die young by refcount, so a collection finds little, and at 700 they ran every
# few dozen commands (bench/README.md, "Latency stability").
GC_THRESHOLDS = (10_000, 20, 20)


def settle() -> float:
    """Collect once, then freeze what is left: it lives as long as the process (or until
    the next reload). Returns the seconds it took (logged; it runs off the hot path)."""
    start = time.perf_counter()
    # What an earlier settle froze may be garbage now (a reload replaced the roles and the
    # table): thaw it so this collection can free it.
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    return time.perf_counter() - start


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where there is none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class Trimmer:
    """Gives memory back to the system after a storm of connections has closed.

    Each connection's TLS state, buffers and objects are freed when it closes, but glibc
    keeps the freed pages in its arenas: measured, 1,500 connections opened and closed
    left the proxy at 187 MiB against 48 MiB before. `malloc_trim(0)` returns every free
    page. It walks the heap (milliseconds for hundreds of MiB), so it runs only after
    `STORM` connections have closed, once things are quiet (`QUIET_S` after the last
    close, or at the latest `LATEST_S` after the first of them under steady churn), and
    in a worker thread, not on the event loop.
    """

    STORM = 64
    QUIET_S = 1.0
    LATEST_S = 5.0

    def __init__(self, trim: Callable[[int], int] | None = None) -> None:
        self._trim = trim if trim is not None else _load_malloc_trim()
        self._closed = 0
        self._first = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.trims = 0  # done (tests, metrics)
        self.trim_seconds = 0.0  # how long the last one took (in the worker thread)

    def closed(self) -> None:
        """A connection closed (a session, or a handshake that failed)."""
        if self._trim is None:
            return
        self._closed += 1
        if self._closed < self.STORM:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._timer is None:
            self._first = now
        else:
            self._timer.cancel()
        at = min(now + self.QUIET_S, self._first + self.LATEST_S)
        self._timer = loop.call_at(at, self._start)

    def _start(self) -> None:
        self._timer = None
        self._closed = 0
        # No gc.collect() here: it walks every live connection (110 ms with thousands
        # open), and a closed session is freed by refcounting already (it breaks its own
        # cycles in connection_lost, tests/unit/test_heap.py).
        asyncio.get_running_loop().run_in_executor(None, self._run)

    def _run(self) -> None:
        start = time.perf_counter()
        assert self._trim is not None
        self._trim(0)
        self.trim_seconds = time.perf_counter() - start
        self.trims += 1
        log.info("heap: freed memory returned to the system after a connection storm "
                 "(malloc_trim %.1f ms, in a worker thread)", self.trim_seconds * 1000)
