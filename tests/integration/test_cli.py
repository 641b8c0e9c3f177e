"""The `phiproxy` command as a user runs it: check-config, certs dev, usage errors."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.helpers import PKI, write_proxy_config


def phiproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True,
                          text=True, timeout=60)


def test_check_config_ok(pki: PKI, tmp_path: Path) -> None:
    config = write_proxy_config(pki, tmp_path, 6390, 6380)
    result = phiproxy("check-config", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "2 roles" in result.stdout


def test_check_config_reports_every_problem_and_exits_2(pki: PKI, tmp_path: Path) -> None:
    config = write_proxy_config(pki, tmp_path, 6390, 6380, extra_listener='min_tls = "1.1"')
    text = config.read_text().replace('address = "127.0.0.1"\nport = 6380',
                                      'address = "0.0.0.0"\nport = 6380', 1)
    config.write_text(text)
    os.chmod(tmp_path / "backend.pass", 0o644)
    result = phiproxy("check-config", "-c", str(config))
    assert result.returncode == 2
    err = result.stderr
    assert str(config) in err
    assert "[listener] min_tls" in err
    assert "allow_any_address" in err
    assert f"chmod 600 {tmp_path / 'backend.pass'}" in err


def test_check_config_names_bad_acl_token(pki: PKI, tmp_path: Path) -> None:
    config = write_proxy_config(pki, tmp_path, 6390, 6380,
                                roles='[roles.writer]\nacl = "+@all ~* +nosuchcommand"\n'
                                      '[roles.reader]\nacl = "+@read"\n')
    result = phiproxy("check-config", "-c", str(config))
    assert result.returncode == 2
    assert "writer" in result.stderr and "nosuchcommand" in result.stderr


def test_check_config_rejects_cert_that_is_not_pem(pki: PKI, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    config = write_proxy_config(pki, tmp_path, 6390, 6380)
    config.write_text(config.read_text().replace(str(pki.path("proxy.pem")), str(bogus)))
    result = phiproxy("check-config", "-c", str(config))
    assert result.returncode == 2
    assert "[listener] cert" in result.stderr and str(bogus) in result.stderr


def test_run_refuses_bad_config_with_exit_2(tmp_path: Path) -> None:
    result = phiproxy("run", "-c", str(tmp_path / "missing.toml"))
    assert result.returncode == 2
    assert "missing.toml" in result.stderr


def test_usage_error_exits_2() -> None:
    assert phiproxy("run").returncode == 2
    assert phiproxy("no-such-command").returncode == 2


def test_certs_dev_writes_private_keys_0600(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    result = phiproxy("certs", "dev", "--out", str(out), "--client", "billing-service")
    assert result.returncode == 0, result.stderr
    for name in ("clients-ca.pem", "proxy.pem", "backend-ca.pem", "backend.pem",
                 "proxy-client.pem", "client-billing-service.pem"):
        assert (out / name).is_file(), name
    for key in out.glob("*-key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert phiproxy("certs", "dev", "--out", str(out), "--client", "../evil").returncode == 2


def test_shipped_example_config_passes_check_config(tmp_path: Path) -> None:
    """config/phiproxy.example.toml, beside a dev PKI and secrets laid out as it expects."""
    root = Path(__file__).resolve().parents[2]
    (tmp_path / "config").mkdir()
    example = tmp_path / "config" / "phiproxy.example.toml"
    example.write_text((root / "config" / "phiproxy.example.toml").read_text())
    assert phiproxy("certs", "dev", "--out", str(tmp_path / "certs-dev"),
                    "--client", "billing-service").returncode == 0
    (tmp_path / "secrets").mkdir(mode=0o700)
    key = tmp_path / "secrets" / "audit.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    (tmp_path / "audit").mkdir()
    result = phiproxy("check-config", "-c", str(example))
    assert result.returncode == 0, result.stderr
    assert "3 roles" in result.stdout
