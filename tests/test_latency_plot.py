"""bench/latency_plot.py: parsing redis-benchmark's percentile distribution, the table, the PNG."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "latency_plot.py"
_spec = importlib.util.spec_from_file_location("latency_plot", SCRIPT)
assert _spec is not None and _spec.loader is not None
latency_plot = importlib.util.module_from_spec(_spec)
sys.modules["latency_plot"] = latency_plot  # dataclasses look their module up there
_spec.loader.exec_module(latency_plot)

# Captured for real (redis-benchmark 7.0.15 against a throwaway plaintext redis-server):
#   redis-benchmark -h 127.0.0.1 -p PORT -t get -c 1 -P 1 -n 3000 -d 64 -r 100000 >out.txt
# byte for byte, including the '\r' progress line and the '\r'-blanked line before the header.
# The "Cumulative distribution of latencies:" section has the same line format and must not
# leak into the result.
SAMPLE = (
    " \rGET: rps=0.0 (overall: 24000.0) avg_msec=0.019 (overall: 0.019)\r"
    + " " * 64
    + "\r====== GET ======\n"
    + "\n".join([
        "  3000 requests completed in 0.09 seconds",
        "  1 parallel clients",
        "  64 bytes payload",
        "  keep alive: 1",
        '  host configuration "save": ',
        '  host configuration "appendonly": no',
        "  multi-thread: no",
        "",
        "Latency by percentile distribution:",
        "0.000% <= 0.015 milliseconds (cumulative count 1573)",
        "75.000% <= 0.023 milliseconds (cumulative count 2295)",
        "87.500% <= 0.055 milliseconds (cumulative count 2720)",
        "93.750% <= 0.063 milliseconds (cumulative count 2967)",
        "99.219% <= 0.079 milliseconds (cumulative count 2979)",
        "99.609% <= 0.159 milliseconds (cumulative count 2989)",
        "99.805% <= 0.255 milliseconds (cumulative count 2995)",
        "99.902% <= 0.455 milliseconds (cumulative count 2998)",
        "99.951% <= 0.503 milliseconds (cumulative count 2999)",
        "99.976% <= 1.311 milliseconds (cumulative count 3000)",
        "100.000% <= 1.311 milliseconds (cumulative count 3000)",
        "",
        "Cumulative distribution of latencies:",
        "99.467% <= 0.103 milliseconds (cumulative count 2984)",
        "99.733% <= 0.207 milliseconds (cumulative count 2992)",
        "99.867% <= 0.303 milliseconds (cumulative count 2996)",
        "99.967% <= 0.503 milliseconds (cumulative count 2999)",
        "100.000% <= 1.407 milliseconds (cumulative count 3000)",
        "",
        "Summary:",
        "  throughput summary: 34482.76 requests per second",
        "  latency summary (msec):",
        "          avg       min       p50       p95       p99       max",
        "        0.025     0.008     0.015     0.063     0.071     1.311",
        "",
        "",
    ])
)

EXPECTED = [
    (0.0, 0.015),
    (75.0, 0.023),
    (87.5, 0.055),
    (93.75, 0.063),
    (99.219, 0.079),
    (99.609, 0.159),
    (99.805, 0.255),
    (99.902, 0.455),
    (99.951, 0.503),
    (99.976, 1.311),
    (100.0, 1.311),
]

# The same run's --csv output: no distribution section.
CSV = (
    '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",'
    '"p99_latency_ms","max_latency_ms"\n'
    '"GET","34482.76","0.025","0.008","0.015","0.063","0.071","1.311"\n'
)


def test_parse_distribution_real_output() -> None:
    assert latency_plot.parse_distribution(SAMPLE) == EXPECTED


def test_parse_distribution_after_newline_translation() -> None:
    # Path.read_text() turns every '\r' into '\n' (universal newlines); same result.
    assert latency_plot.parse_distribution(SAMPLE.replace("\r", "\n")) == EXPECTED
    assert latency_plot.parse_distribution(SAMPLE.replace("\n", "\r\n")) == EXPECTED
    assert latency_plot.parse_distribution(SAMPLE.replace("\n", "\r")) == EXPECTED


def test_parse_distribution_missing_section() -> None:
    with pytest.raises(ValueError, match="no 'Latency by percentile distribution:' section"):
        latency_plot.parse_distribution(CSV)
    truncated = SAMPLE[: SAMPLE.index("Latency by percentile")]  # e.g. the benchmark was killed
    with pytest.raises(ValueError, match="without --csv"):
        latency_plot.parse_distribution(truncated)
    with pytest.raises(ValueError, match="no 'Latency by percentile distribution:' section"):
        latency_plot.parse_distribution("")


def test_parse_distribution_empty_or_repeated_section() -> None:
    head = SAMPLE[: SAMPLE.index("0.000% <=")]
    with pytest.raises(ValueError, match="has no"):
        latency_plot.parse_distribution(head + "\nSummary:\n")
    with pytest.raises(ValueError, match="2 'Latency by percentile distribution:' sections"):
        latency_plot.parse_distribution(SAMPLE + SAMPLE)  # e.g. -t set,get in one file


def test_quantiles_from_cumulative_counts() -> None:
    # p50: 1573/3000 requests are <= 15 µs; p90: 2720 >= 2700; p99: 2979 >= 2970;
    # p99.9: 2998 >= 2997; max: the last line.
    q = latency_plot.quantiles_us(SAMPLE)
    assert q == pytest.approx({"p50": 15.0, "p90": 55.0, "p99": 79.0, "p99.9": 455.0,
                               "max": 1311.0})
    assert latency_plot.request_count(SAMPLE) == 3000


def test_nines_scale() -> None:
    assert latency_plot.nines(0.0) == 0.0
    assert latency_plot.nines(90.0) == pytest.approx(1.0)
    assert latency_plot.nines(99.9) == pytest.approx(3.0)
    assert latency_plot.nines(100.0) == latency_plot.MAX_NINES  # clipped, not infinite


def test_cli_reports_a_file_without_the_section(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "csv.txt"
    bad.write_text(CSV)
    rc = latency_plot.main(["--out", str(tmp_path / "x.png"), f"direct={bad}"])
    assert rc == 1
    assert "direct" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_writes_png_and_table(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    a, b = tmp_path / "latency-c1-a.txt", tmp_path / "latency-c1-b.txt"
    a.write_text(SAMPLE, newline="")  # keep the '\r's as redis-benchmark wrote them
    b.write_text(SAMPLE.replace("0.455 milliseconds", "0.655 milliseconds"), newline="")
    out = tmp_path / "plot.png"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), f"redis-mtls={a}", f"phiproxy={b}"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert out.stat().st_size > 10_000
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[1:3]}
    assert rows["redis-mtls"] == ["3000", "15", "55", "79", "455", "1311"]
    assert rows["phiproxy"] == ["3000", "15", "55", "79", "655", "1311"]
