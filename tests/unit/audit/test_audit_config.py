"""[audit] keys added for the writer: syslog target, facility, buffer, head_file, key size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.certs import write_dev_pki
from proxy.config import AuditConfig, ConfigError, load_config

BASE = """
[listener]
address = "127.0.0.1"
port = 6380
cert = "certs/proxy.pem"
key = "certs/proxy-key.pem"
client_ca = "certs/clients-ca.pem"

[backend]
address = "127.0.0.1"
port = 6390
ca = "certs/backend-ca.pem"
cert = "certs/proxy-client.pem"
key = "certs/proxy-client-key.pem"

[roles.reader]
acl = "+@read ~app:phi:*"

[[identities]]
subject_cn = "billing"
role = "reader"

[audit]
key_file = "secrets/audit.key"
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audit-config")
    write_dev_pki(root / "certs", [])
    (root / "secrets").mkdir()
    key = root / "secrets" / "audit.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    return root


def load(site: Path, audit_lines: str) -> AuditConfig:
    file = site / "phiproxy.toml"
    file.write_text(BASE + audit_lines)
    return load_config(file).audit


def problem(site: Path, audit_lines: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(site, audit_lines)
    (only,) = caught.value.problems
    assert only.startswith(f"{site / 'phiproxy.toml'}: [audit] ")
    return only


def test_syslog_target_and_options(site: Path) -> None:
    audit = load(site, 'path = "syslog+tcp://127.0.0.1:6514"\nsyslog_facility = "local3"\n'
                       'syslog_buffer_bytes = 1048576\nhead_file = "state/audit.head"\n')
    assert audit.path == "syslog+tcp://127.0.0.1:6514"
    assert audit.syslog_facility == "local3" and audit.syslog_buffer_bytes == 1048576
    assert audit.head_file == str(site / "state" / "audit.head")
    defaults = load(site, 'path = "-"\n')
    assert (defaults.syslog_facility, defaults.syslog_buffer_bytes, defaults.head_file) == (
        "authpriv", 4 * 1024 * 1024, None)


@pytest.mark.parametrize(("lines", "words"), [
    ('path = "syslog+udp://127.0.0.1:514"\n', "not supported"),
    ('path = "syslog+tcp://127.0.0.1"\n', "needs a host and a port"),
    ('path = "syslog+tcp://127.0.0.1:99999"\n', "host:port"),
    ('path = "-"\nsyslog_facility = "mail"\n', "authpriv"),
    ('path = "audit/a.jsonl"\nhead_file = "x.head"\n', "a.jsonl.head"),
    ('path = "-"\nsyslog_buffer_bytes = 10\n', "at least 65536"),
])
def test_mistakes_name_key_and_fix(site: Path, lines: str, words: str) -> None:
    assert words in problem(site, lines)


def test_short_key_is_refused_by_check_config(site: Path) -> None:
    short = site / "secrets" / "short.key"
    short.write_text("too-short\n")
    short.chmod(0o600)
    file = site / "phiproxy.toml"
    file.write_text(BASE.replace("secrets/audit.key", "secrets/short.key"))
    with pytest.raises(ConfigError) as caught:
        load_config(file)
    (message,) = caught.value.problems
    assert "[audit] key_file" in message and "fewer than 32" in message
    assert "head -c 32 /dev/urandom" in message
