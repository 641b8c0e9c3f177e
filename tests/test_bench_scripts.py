"""Cheap checks of the benchmark shell scripts: they parse, and their headers document them."""

from __future__ import annotations

import os
import shutil
import subprocess
from itertools import takewhile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
WORKERS = BENCH / "workers.sh"


def header(path: Path) -> str:
    """The leading comment block (after the shebang)."""
    lines = path.read_text().splitlines()[1:]
    return "\n".join(takewhile(lambda line: line.startswith("#"), lines))


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_workers_sh_parses() -> None:
    subprocess.run(["bash", "-n", str(WORKERS)], check=True)


def test_workers_sh_is_executable_and_strict() -> None:
    assert os.access(WORKERS, os.X_OK)
    text = WORKERS.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert 'source "$ROOT/scripts/bootstrap.sh"' in text


def test_workers_sh_header_documents_usage_knobs_and_placements() -> None:
    doc = header(WORKERS)
    for needed in ("USAGE", "KNOBS", "PLACEMENTS", '"servers on CPU 0"', '"workers spread"',
                   "ROUNDS=", "REQUESTS=", "OUT_DIR=", "-t get -c 50 -P 16 -d 64 -r 100000"):
        assert needed in doc, needed
