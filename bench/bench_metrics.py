"""ns per metrics operation on the per-command hot path.

    python bench/bench_metrics.py [--number N]

The session's way (`counts[decision.command][0] += 1` on a counter taken once per
connection), the convenience `inc()`, a histogram observe, a denial, and for scale
prometheus-client's own labelled Counter.inc() (what the hot path avoids), each
against an empty loop so only the operation is counted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry, Counter  # noqa: E402

from proxy.metrics import OK, Metrics  # noqa: E402


def best_ns(stmt: str, setup: str, env: dict, number: int) -> float:
    """Best of 5 runs of `stmt` in a loop, ns per iteration, minus the empty loop."""
    src = (f"def run(n):\n    {setup}\n    t = perf()\n    for _ in range(n):\n"
           f"        {stmt}\n    return perf() - t\n"
           f"def empty(n):\n    {setup}\n    t = perf()\n    for _ in range(n):\n"
           f"        pass\n    return perf() - t\n")
    scope = dict(env, perf=time.perf_counter_ns)
    exec(src, scope)  # noqa: S102 (a benchmark of fixed statements)
    run, empty = scope["run"], scope["empty"]
    best = min(run(number) for _ in range(5))
    base = min(empty(number) for _ in range(5))
    return max(best - base, 0) / number


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=1_000_000)
    args = parser.parse_args()

    m = Metrics(["reader"])
    counts = m.command_counter("reader", "cn=billing")
    prom = Counter("bench_commands", "x", ["command", "role", "result"],
                   registry=CollectorRegistry())
    child = prom.labels("get", "reader", "ok")
    env = {"counts": counts, "m": m, "OK": OK, "prom": prom, "child": child}
    cases = [
        ("command count: counts[name][0] += 1", "counts[name][0] += 1", "name = 'get'"),
        ("command count, unknown name", "counts[name][2] += 1", "name = 'xyzzy'"),
        ("command count: counts.inc(name, OK)", "counts.inc(name, OK)", "name = 'get'"),
        ("histogram observe (40 us)", "observe(4e-05)", "observe = m.proxy_latency.observe"),
        ("Metrics.observe_proxy_latency", "m.observe_proxy_latency(4e-05)", "pass"),
        ("denial (role, identity, reason)", "m.denied('reader', 'cn=billing', 'acl')", "pass"),
        ("prometheus-client child.inc() (avoided)", "child.inc()", "pass"),
        ("prometheus-client .labels().inc() (avoided)",
         "prom.labels('get', 'reader', 'ok').inc()", "pass"),
    ]
    print(f"{'operation':46} ns/op")
    for title, stmt, setup in cases:
        print(f"{title:46} {best_ns(stmt, setup, env, args.number):6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
