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


def test_benchmark_config_is_a_valid_phiproxy_config(tmp_path: Path) -> None:
    """The configuration every benchmark measures loads like `phiproxy run` loads it: a
    change to the config schema must not leave the benchmarks measuring nothing."""
    import sys

    sys.path.insert(0, str(BENCH))
    from bench_config import PHI_KEYS, config_text, prefill_commands

    from proxy.certs import write_dev_pki
    from proxy.resp.request import RequestFramer, encode_command
    from proxy.startup import load_everything

    pki = tmp_path / "pki"
    write_dev_pki(pki, ["bench"])
    key = tmp_path / "audit.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    config_file = tmp_path / "phiproxy.toml"
    config_file.write_text(config_text(
        port=6380, cert="pki/proxy.pem", key="pki/proxy-key.pem", client_ca="pki/clients-ca.pem",
        backend_port=6379, backend_ca="pki/backend-ca.pem", backend_cert="pki/proxy-client.pem",
        backend_key="pki/proxy-client-key.pem", audit_path="audit.jsonl", audit_key="audit.key",
        subject_cn="bench"))
    config, decide, roles = load_everything(config_file)
    assert tuple(config.audit.phi_keys) == PHI_KEYS
    assert decide(roles["bench"], [b"GET", b"key:000000000042"]).allowed
    assert decide(roles["bench"], [b"SET", b"counter:1", b"1"]).allowed
    assert not decide(roles["bench"], [b"GET", b"other"]).allowed
    first = next(prefill_commands(3, 64))
    assert RequestFramer().feed(first) == [[b"SET", b"key:000000000000", b"x" * 64]]
    assert first == encode_command([b"SET", b"key:000000000000", b"x" * 64])
    assert len(list(prefill_commands(3, 64))) == 3
