"""The short fuzz run inside the test command: each harness on its seed corpus and a fixed
number of seeded mutations (seconds; the coverage-guided runs are bench/fuzz.py).

A failure names the input: `mutation-N` is reproducible from tests/fuzz/mutate.py's seed.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.mutate import inputs

# Per target: mutations run here (about a second each on one core).
ITERATIONS = {"request": 1500, "reply": 1500, "acl": 200, "glob": 800, "config": 800}


@pytest.mark.parametrize("target", list(ITERATIONS))
def test_short_fuzz_run(target: str) -> None:
    check = importlib.import_module(f"tests.fuzz.fuzz_{target}").check
    failures = []
    for label, data in inputs(target, ITERATIONS[target]):
        try:
            check(data)
        except Exception as exc:  # noqa: BLE001 - every failure is listed with its input
            failures.append(f"{label} {data[:120]!r}: {type(exc).__name__}: {exc}"[:600])
    assert not failures, f"{len(failures)} failing inputs:\n" + "\n".join(failures[:5])


def test_mutations_are_reproducible() -> None:
    assert list(inputs("request", 50)) == list(inputs("request", 50))


def test_bench_fuzz_runs_atheris_and_reports(tmp_path: Path) -> None:
    """bench/fuzz.py drives a real atheris run and parses its figures (2 s of one target)."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "bench" / "fuzz.py"), "--seconds", "2",
                          "--work", str(tmp_path), "request"], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("request"))
    executions = int(re.search(r"executions\s+(\d+)", line).group(1))
    cov = int(re.search(r"cov\s+(\d+)", line).group(1))
    assert executions > 100 and cov > 50 and line.endswith("crashes 0"), line
