"""Percentile curves (PNG) and a p50/p90/p99/p99.9/max table from saved redis-benchmark outputs.

    python bench/latency_plot.py --out OUT.png NAME=FILE [NAME=FILE ...]

Each FILE is the human (not --csv, not -q) output of one redis-benchmark 7.x run of one test,
e.g. `redis-benchmark -t get -c 1 -P 1 ... >FILE`. Its "Latency by percentile distribution:"
section is what gets plotted: x = percentile on a "nines" scale (-log10(1 - p/100), so 90, 99,
99.9, 99.99 are evenly spaced; the 100% point is drawn at 99.999 and labelled "max"), y = latency
in µs on a log scale (curves of ~50-300 µs stay apart while a multi-ms max still fits).
Used by bench/latency_c1.sh. Needs matplotlib (`pip install -e '.[bench]'`); drawn with the Agg
backend, no display needed.

The table's quantiles come from the section's cumulative counts: for q, the first listed
latency whose cumulative count reaches q% of all requests. redis-benchmark lists only the
histogram buckets where a new percentile level is reached, so this is an upper bound within one
listed step (e.g. its own summary line may show a slightly lower p99).
"""

from __future__ import annotations

import argparse
import datetime
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

SECTION = "Latency by percentile distribution:"
_LINE = re.compile(
    r"^\s*(\d+(?:\.\d+)?)% <= (\d+(?:\.\d+)?) milliseconds \(cumulative count (\d+)\)\s*$"
)
TABLE_QUANTILES = (50.0, 90.0, 99.0, 99.9)
MAX_NINES = 5.0  # p = 100 (and anything above 99.999) is drawn at 99.999, labelled "max"
TICKS = ((0.0, "0"), (50.0, "50"), (90.0, "90"), (99.0, "99"), (99.9, "99.9"), (99.99, "99.99"))


@dataclass(frozen=True)
class Row:
    percentile: float
    latency_ms: float
    cumulative_count: int


def _rows(text: str) -> list[Row]:
    """The rows of the one "Latency by percentile distribution:" section in `text`."""
    lines = re.split(r"\r\n|\r|\n", text)
    starts = [i for i, line in enumerate(lines) if line.strip() == SECTION]
    if not starts:
        raise ValueError(
            f"no {SECTION!r} section found: give the human output of redis-benchmark 7.x "
            "(run it without --csv and without -q)"
        )
    if len(starts) > 1:
        raise ValueError(
            f"{len(starts)} {SECTION!r} sections found: save one test per file "
            "(e.g. -t get, not -t set,get)"
        )
    rows: list[Row] = []
    for line in lines[starts[0] + 1 :]:
        m = _LINE.match(line)
        if m is None:
            break  # the blank line before "Cumulative distribution of latencies:"
        rows.append(Row(float(m[1]), float(m[2]), int(m[3])))
    if not rows:
        raise ValueError(f"the {SECTION!r} section has no '<p>% <= <ms> milliseconds' lines")
    return rows


def parse_distribution(text: str) -> list[tuple[float, float]]:
    """(percentile, latency_ms) pairs of redis-benchmark's percentile distribution, in order.

    `text` is redis-benchmark 7.x's human output; progress lines end in '\\r', so lines are
    split on both '\\r' and '\\n'. Raises ValueError when the section is missing (or repeated).
    """
    return [(r.percentile, r.latency_ms) for r in _rows(text)]


def quantiles_us(text: str) -> dict[str, float]:
    """p50, p90, p99, p99.9 and max in µs, from the cumulative counts (see the module doc)."""
    rows = _rows(text)
    total = rows[-1].cumulative_count
    out: dict[str, float] = {}
    for q in TABLE_QUANTILES:
        need = q / 100.0 * total
        row = next(r for r in rows if r.cumulative_count >= need)
        out[f"p{q:g}"] = row.latency_ms * 1000.0
    out["max"] = rows[-1].latency_ms * 1000.0
    return out


def request_count(text: str) -> int:
    return _rows(text)[-1].cumulative_count


def nines(percentile: float) -> float:
    """-log10(1 - p/100), capped at MAX_NINES (p = 100 would be infinite)."""
    remaining = 1.0 - percentile / 100.0
    if remaining <= 10.0**-MAX_NINES:
        return MAX_NINES
    return min(-math.log10(remaining), MAX_NINES)


def format_table(results: list[tuple[str, dict[str, float], int]]) -> str:
    keys = [f"p{q:g}" for q in TABLE_QUANTILES] + ["max"]
    width = max([len("target")] + [len(name) for name, _, _ in results])
    header = f"{'target':<{width}} {'n':>8} " + " ".join(f"{k:>8}" for k in keys) + "   (µs)"
    lines = [header]
    for name, q, n in results:
        lines.append(f"{name:<{width}} {n:>8} " + " ".join(f"{q[k]:>8.0f}" for k in keys))
    return "\n".join(lines)


def plot(
    series: list[tuple[str, list[tuple[float, float]], dict[str, float]]],
    out: Path,
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(10, 6), dpi=120)
    for name, pairs, q in series:
        xs = [nines(p) for p, _ in pairs]
        ys = [ms * 1000.0 for _, ms in pairs]
        label = f"{name}  (p50 {q['p50']:.0f} µs, p99 {q['p99']:.0f} µs)"
        ax.plot(xs, ys, marker=".", markersize=3, linewidth=1.6, label=label)
    ticks = [(nines(p), label) for p, label in TICKS] + [(MAX_NINES, "max")]
    ax.set_xticks([x for x, _ in ticks], [label for _, label in ticks])
    ax.set_xlim(0.0, MAX_NINES + 0.1)
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    # label the minor ticks too (20, 30, 50, 200, ...): with a narrow range a log axis may
    # otherwise show one or two labels only
    ax.yaxis.set_minor_formatter(
        FuncFormatter(lambda v, _pos: f"{v:g}" if round(v / 10 ** math.floor(math.log10(v)))
                      in (2, 3, 5) else "")
    )
    ax.tick_params(axis="y", which="minor", labelsize=8)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.5)
    ax.grid(True, which="minor", axis="y", alpha=0.2)
    ax.set_xlabel("percentile (log scale of nines)")
    ax.set_ylabel("latency (µs, log scale)")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    parser.add_argument("--workload", default="GET -c 1 -P 1", help="for the title")
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="for the title")
    parser.add_argument("runs", nargs="+", metavar="NAME=FILE", help="saved redis-benchmark output")
    args = parser.parse_args(argv)

    series = []
    table = []
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"{spec!r}: expected NAME=FILE")
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
            pairs = parse_distribution(text)
        except (OSError, ValueError) as e:
            print(f"error: {name}: {path}: {e}", file=sys.stderr)
            return 1
        q = quantiles_us(text)
        series.append((name, pairs, q))
        table.append((name, q, request_count(text)))

    title = f"redis-benchmark {args.workload} latency by percentile, {args.date}"
    plot(series, args.out, title)
    print(format_table(table))
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
