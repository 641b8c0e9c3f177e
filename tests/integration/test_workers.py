"""`phiproxy run --workers N`: processes share the port, each with its own audit chain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import PKI, Proxy, RedisServer, free_port, wait_port, write_proxy_config


def test_two_workers_share_the_port_and_keep_separate_chains(pki: PKI, backend: RedisServer,
                                                            tmp_path: Path) -> None:
    port = free_port()
    config = write_proxy_config(pki, tmp_path / "p", backend.port, port)
    log = (tmp_path / "p" / "proxy.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(config),
                             "--workers", "2"], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    proxy = Proxy(port, proc, config, pki, tmp_path / "p" / "proxy.log")
    try:
        wait_port(port, proc)
        for i in range(24):  # new connections from new source ports spread over workers
            client = proxy.client("app-writer")
            assert client.set(f"app:phi:w{i}", i)
            client.close()
    finally:
        assert proxy.stop() == 0, proxy.stderr()
    assert backend.client().get("app:phi:w23") == b"23"
    trails = [tmp_path / "p" / "audit.w1.jsonl", tmp_path / "p" / "audit.w2.jsonl"]
    connects = []
    for trail in trails:
        text = trail.read_text()
        connects.append(text.count('"event":"connect"'))
        instance = "proxy-test-w1" if trail.name.startswith("audit.w1") else "proxy-test-w2"
        assert f'"instance":"{instance}"' in text
    # The configured path: verify finds both workers' trails and checks each chain.
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "audit", "verify", str(tmp_path / "p" / "audit.jsonl"),
         "--key-file", str(tmp_path / "p" / "audit.key")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit.w1.jsonl: OK" in result.stdout and "audit.w2.jsonl: OK" in result.stdout
    assert "OK: all 2 trails verify" in result.stdout
    assert sum(connects) >= 24  # (+ the port probe's refusal is no connect)
    assert all(n > 0 for n in connects), connects  # both workers served clients


def test_workers_out_of_range_is_usage_error(pki: PKI, tmp_path: Path) -> None:
    config = write_proxy_config(pki, tmp_path, 6390, free_port())
    result = subprocess.run([sys.executable, "-m", "proxy", "run", "-c", str(config),
                             "--workers", "0"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--workers" in result.stderr
