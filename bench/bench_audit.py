"""Audit cost per command record: build, chain (HMAC) and write, in batches of 16.

    python bench/bench_audit.py [--records N] [--batch 16]

Prints µs per record for each stage alone and for the whole path (build + seal + one
os.write per batch to an O_APPEND file + the head file pwrite), and records/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.audit.chain import Chain  # noqa: E402
from proxy.audit.record import AuditRecords  # noqa: E402
from proxy.audit.writer import AuditWriter  # noqa: E402
from proxy.config import AuditConfig  # noqa: E402

IDENTITY = {"cn": "billing-service", "san_uri": "spiffe://example.org/ns/prod/sa/billing",
            "fingerprint": "ab" * 32}
KEYS = [[b"app:phi:patient:%d" % i] for i in range(1024)]


def best_of(runs: int, fn) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter_ns()
        fn()
        best = min(best, time.perf_counter_ns() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    n, size = args.records - args.records % args.batch, args.batch
    key = os.urandom(32)
    conn = AuditRecords("prod", "proxy-1").connection(12345, "10.20.30.40:51234", IDENTITY,
                                                      "writer")
    command = conn.command

    def build() -> None:
        for i in range(n):
            command("set", KEYS[i & 1023], 0)

    bodies = [command("set", KEYS[i & 1023], 0) for i in range(size)]
    chain = Chain(key)

    def seal() -> None:
        for _ in range(n // size):
            lines, seq, mac = chain.seal(b"2026-11-29T10:00:00.123456Z", bodies)
            chain.advance(seq, mac)

    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        writer = AuditWriter(AuditConfig(path=os.path.join(tmp, "audit.jsonl")), key=key)
        writer.open()

        def whole() -> None:
            for b in range(n // size):
                base = b * size
                assert writer.write([command("set", KEYS[(base + j) & 1023], 0)
                                     for j in range(size)])

        results = {
            "build command record": best_of(3, build),
            f"seal (HMAC chain), batches of {size}": best_of(3, seal),
            f"build + seal + write, batches of {size} (file)": best_of(3, whole),
        }
        line_bytes = os.path.getsize(os.path.join(tmp, "audit.jsonl")) / writer.seq
        writer.close()
    for name, ns in results.items():
        per = ns / n / 1000
        print(f"{name:48s} {per:6.2f} µs/record  {1e6 / per:12,.0f} records/s")
    print(f"record size {line_bytes:.0f} bytes; {n} records per run, best of 3")


if __name__ == "__main__":
    main()
