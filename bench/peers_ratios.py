#!/usr/bin/env python3
"""Issue-5 ratios from one peers.sh run (its raw.csv; stdlib only).

Usage: peers_ratios.py OUT_DIR/raw.csv [--name LABEL]

Target x is the extra target (phiproxy), b is redis with mutual TLS (no proxy), c is haproxy.
Per round, from rows of the same round; reported value = median over rounds:
  set_c50_p1  ops/s x / c        goal >= 0.7
  get_c50_p16 ops/s x / c        goal >= 0.8
  get_c1_p1   p50 x - p50 b (µs) goal <= 50
Exit status 0 whether or not the goals are met; 2 if the needed rows are missing.
"""
import csv
import statistics
import sys


def num(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def main():
    args = sys.argv[1:]
    name = "phiproxy"
    if "--name" in args:
        i = args.index("--name")
        name = args[i + 1]
        del args[i:i + 2]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(args[0], newline="") as fh:
        rows = list(csv.DictReader(fh))
    val = {(r["round"], r["target"], r["workload"]): r for r in rows}
    rounds = sorted({r["round"] for r in rows}, key=int)

    def per_round(fn):
        out = []
        for rd in rounds:
            v = fn(rd)
            if v is not None:
                out.append(v)
        return out

    def field(rd, t, w, f):
        r = val.get((rd, t, w))
        return num(r[f]) if r else None

    def ratio(w, other):
        def f(rd):
            x, o = field(rd, "x", w, "rps"), field(rd, other, w, "rps")
            return x / o if x and o else None
        return per_round(f)

    def p50_diff(rd):
        x, b = field(rd, "x", "get_c1_p1", "p50_ms"), field(rd, "b", "get_c1_p1", "p50_ms")
        return (x - b) * 1000 if x is not None and b is not None else None

    checks = [
        (f"set_c50_p1  ops/s {name}/haproxy", ratio("set_c50_p1", "c"), ">=", 0.7, "{:.2f}"),
        (f"get_c50_p16 ops/s {name}/haproxy", ratio("get_c50_p16", "c"), ">=", 0.8, "{:.2f}"),
        (f"get_c1_p1   p50 {name} - redis-mtls (µs)", per_round(p50_diff), "<=", 50.0, "{:.0f}"),
    ]
    missing = False
    print(f"issue-5 ratios ({len(rounds)} round(s), medians over rounds; from {args[0]})")
    for label, vals, op, goal, spec in checks:
        if not vals:
            print(f"  {label:50s} n/a (rows missing or failed runs)")
            missing = True
            continue
        m = statistics.median(vals)
        ok = m >= goal if op == ">=" else m <= goal
        per = ", ".join(spec.format(v) for v in vals)
        print(f"  {label:50s} {spec.format(m):>6s}  goal {op} {goal:g}: "
              f"{'MET' if ok else 'MISSED'}  (per round: {per})")
    return 2 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
