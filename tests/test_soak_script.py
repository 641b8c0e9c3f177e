"""bench/soak.py runs end to end on a small scale (its own redis-server, proxy and config):
a config schema change or a proxy regression must not leave the soak measuring nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import require

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def test_a_short_soak_passes_its_own_checks(tmp_path: Path) -> None:
    require("redis-server")
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(SOAK), "--clients", "20", "--subscribers", "2",
                          "--seconds", "8", "--sample", "2", "--pause", "0.1", "--settle", "1",
                          "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["records_equal_calls"] and summary["audit_verify_ok"]
    assert summary["ops_total"] > 200 and not summary["errors"]
    assert summary["acked_values_lost"] == 0 and not summary["wrong_replies"]
    assert summary["published_receivers"] == summary["messages_received"] > 0
    assert set(summary["ops"]) >= {"set", "get", "mset", "lpush", "lrange", "multi", "blpop"}
    assert summary["proxy_exit"] == 0 and summary["rss_kib"]["max"] > 0
