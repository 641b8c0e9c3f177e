"""ns per `decide` call: the policy's share of the per-command hot path.

    python bench/bench_decide.py [--number N]

A role with three key patterns; an allowed GET (the case the plans are built for), a
denied command, a SET and an MSET of 10 keys, plus a mixed-case GET and a key outside
the patterns (both take the slower general path).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.config import RoleConfig  # noqa: E402
from proxy.policy.engine import compile_roles, decide, evaluate  # noqa: E402

ACL = "+@read +@write -@dangerous +ping ~app:phi:* ~app:cache:* %R~app:ref:*"

CASES: list[tuple[str, list[bytes]]] = [
    ("GET allowed", [b"GET", b"app:phi:patient:12345"]),
    ("GET allowed, mixed case", [b"Get", b"app:phi:patient:12345"]),
    ("GET third pattern", [b"GET", b"app:ref:icd10"]),
    ("SET allowed", [b"SET", b"app:phi:patient:12345", b"value"]),
    ("SET with EX (getkeys path)", [b"SET", b"app:phi:p:1", b"v", b"EX", b"60"]),
    ("MSET 10 keys", [b"MSET", *[x for i in range(10) for x in (b"app:cache:%d" % i, b"v")]]),
    ("denied command (FLUSHALL)", [b"FLUSHALL"]),
    ("denied key (GET)", [b"GET", b"secret:1"]),
    ("PING (keyless, constant)", [b"PING"]),
]


def measure(role, argv: list[bytes], number: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(number):
            decide(role, argv)
        best = min(best, (time.perf_counter_ns() - start) / number)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000)
    args = parser.parse_args()
    role = compile_roles({"app": RoleConfig("app", ACL)})["app"]
    print(f"role acl: {ACL}")
    baseline = None
    for label, argv in CASES:
        decision = decide(role, argv)
        assert decision == evaluate(role, argv).decision
        ns = measure(role, argv, args.number)
        baseline = baseline or ns
        verdict = "allow" if decision.allowed else f"deny ({decision.extra or 'acl'})"
        print(f"{label:32s} {ns:8.0f} ns/command  x{ns / baseline:5.1f}  {verdict}")
    start = time.perf_counter_ns()
    for _ in range(20000):
        evaluate(role, CASES[0][1])
    ns = (time.perf_counter_ns() - start) / 20000
    print(f"{'GET via evaluate() (reference)':32s} {ns:8.0f} ns/command  x{ns / baseline:5.1f}")


if __name__ == "__main__":
    main()
