"""The process heap: keep the cyclic garbage collector off long-lived objects.

Measured on the running proxy (bench/README.md, "Latency stability"): the hot path
allocates few container objects (67 young collections in 30,000 GETs at c=1), but a full
collection walks every tracked object, and the command table, compiled roles and
metrics are thousands of them: full collections took up to 16 ms under GET c50 P16,
which is the proxy's p99.9/max spike. `gc.freeze()` moves everything alive at start (and
after a reload) to a permanent generation the collector never walks, the way CPython's
docs suggest for servers (and as Instagram's Django fork does).
"""

from __future__ import annotations

import gc
import time


def settle() -> float:
    """Collect once, then freeze what is left: it lives as long as the process (or until
    the next reload). Returns the seconds it took (logged; it runs off the hot path)."""
    start = time.perf_counter()
    # What an earlier settle froze may be garbage now (a reload replaced the roles and the
    # table): thaw it so this collection can free it.
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - start
