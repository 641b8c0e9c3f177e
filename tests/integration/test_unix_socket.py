"""`[backend] unix_socket`: a co-located Redis that listens on no network port at all
(SPEC §10): the proxy serves through it, and scan-backend calls that transmission-secure."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config
from tests.helpers import (
    BACKEND_PASSWORD,
    BACKEND_USER,
    PKI,
    free_port,
    require,
    start_proxy,
    write_proxy_config,
)


@pytest.fixture()
def unix_redis(tmp_path: Path):
    require("redis-server")
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen([
        "redis-server", "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
        "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
        "--user", "default", "off",
        "--user", BACKEND_USER, "on", f">{BACKEND_PASSWORD}", "~*", "&*", "+@all",
    ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "redis did not start"
        time.sleep(0.05)
    yield sock
    proc.terminate()
    proc.wait(10)


def unix_config(pki: PKI, workdir: Path, sock: Path, port: int) -> Path:
    config = write_proxy_config(pki, workdir, 1, port)
    text = config.read_text()
    # the [backend] table with the socket instead of address, port and TLS material
    text = re.sub(r"\[backend\].*?(?=\n\[metrics\])",
                  f'[backend]\nunix_socket = "{sock}"\nusername = "{BACKEND_USER}"\n'
                  'password_file = "backend.pass"\n', text, flags=re.S)
    config.write_text(text)
    return config


def test_the_proxy_serves_through_a_unix_socket(pki: PKI, unix_redis: Path,
                                                tmp_path: Path) -> None:
    port = free_port()
    config = unix_config(pki, tmp_path / "p", unix_redis, port)
    assert load_config(config).backend.unix_socket == unix_redis
    proxy = start_proxy(config, pki, port)
    try:
        client = proxy.client()
        client.set("app:phi:u", "1")
        pipe = client.pipeline(transaction=True)
        pipe.incr("app:phi:u").get("app:phi:u")
        assert pipe.execute() == [2, b"2"]
        assert client.execute_command("SELECT", "2")
        assert "backend " + str(unix_redis) in proxy.stderr()
    finally:
        assert proxy.stop() == 0


def test_scan_backend_reports_no_network_hop_as_transmission_security(
        pki: PKI, unix_redis: Path, tmp_path: Path) -> None:
    config = unix_config(pki, tmp_path / "p", unix_redis, free_port())
    run = subprocess.run([sys.executable, "-m", "proxy", "scan-backend", "-c", str(config),
                          "--json"], capture_output=True, text=True, timeout=60)
    findings = {f["id"]: f for f in json.loads(run.stdout)["findings"]}
    assert findings["backend-tls-only"]["verdict"] == "pass", findings["backend-tls-only"]
    assert findings["proxy-backend-link"]["verdict"] == "pass"
    assert "unix socket" in findings["backend-tls-only"]["observed"]


def test_unix_socket_with_address_is_refused_naming_both(pki: PKI, unix_redis: Path,
                                                         tmp_path: Path) -> None:
    config = write_proxy_config(pki, tmp_path, 6390, free_port(),
                                extra=f'unix_socket = "{unix_redis}"')
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert any("unix_socket" in p and "address and port" in p for p in err.value.problems)


def test_unix_socket_that_is_not_a_socket_is_refused(pki: PKI, tmp_path: Path) -> None:
    plain = tmp_path / "not-a-socket"
    plain.write_text("x")
    config = unix_config(pki, tmp_path / "p", plain, free_port())
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert any("is not a socket" in p for p in err.value.problems)
