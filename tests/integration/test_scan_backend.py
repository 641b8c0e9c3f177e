"""`phiproxy scan-backend` against real redis-servers: weak, hardened (the shipped
config/redis/redis.conf), and one whose CONFIG (then ACL) the proxy's user may not run."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy import cli, scan
from proxy.audit.writer import AuditWriter
from proxy.config import load_config
from tests.helpers import (
    BACKEND_PASSWORD,
    BACKEND_USER,
    PKI,
    RedisServer,
    free_port,
    start_redis,
    write_proxy_config,
)

REPO = Path(__file__).resolve().parents[2]
REDIS_CONF = REPO / "config" / "redis" / "redis.conf"
P, F, U = scan.PASS, scan.FAIL, scan.UNKNOWN

# control id: (weak backend + weak proxy config, shipped redis.conf + sane proxy config)
EXPECTED = {
    "backend-tls-only": (F, P),
    "backend-tls-protocols": (F, P),
    "backend-tls-ciphers": (F, P),
    "backend-tls-ciphersuites": (F, P),
    "backend-tls-server-order": (F, P),
    "backend-tls-replication": (F, P),
    "backend-tls-cluster": (P, P),  # cluster-enabled no in both: not relevant, and said so
    "proxy-backend-link": (P, P),
    "proxy-listener-tls": (P, P),
    "backend-mutual-tls": (F, P),
    "backend-default-user-off": (F, P),
    "backend-no-nopass": (F, P),
    "proxy-backend-credentials": (F, P),
    "proxy-client-certificates": (P, P),
    "proxy-crl": (F, P),
    "backend-protected-mode": (F, P),
    "backend-dangerous-commands": (F, P),
    "backend-debug-module-commands": (F, P),
    "backend-dir-permissions": (F, P),
    "proxy-allow-networks": (F, P),
    "proxy-roles-dangerous": (F, P),
    "backend-loglevel": (F, P),
    "proxy-audit-chain": (F, P),
    "proxy-audit-fail-closed": (F, P),
    "backend-aof": (F, P),
    "backend-rdb": (F, P),
    "backend-stop-writes-on-bgsave-error": (F, P),
    "backend-maxmemory-policy": (F, P),
}
CONFIG_CONTROLS = {
    "backend-tls-only", "backend-tls-protocols", "backend-tls-ciphers",
    "backend-tls-ciphersuites", "backend-tls-server-order", "backend-tls-replication",
    "backend-tls-cluster", "backend-mutual-tls", "backend-protected-mode",
    "backend-debug-module-commands", "backend-dir-permissions", "backend-loglevel",
    "backend-aof", "backend-rdb", "backend-stop-writes-on-bgsave-error",
    "backend-maxmemory-policy",
}
ACL_CONTROLS = {"backend-default-user-off", "backend-no-nopass", "backend-dangerous-commands"}

WEAK_REDIS = """
port {plain_port}
tls-auth-clients optional
tls-protocols "TLSv1.1 TLSv1.2 TLSv1.3"
tls-ciphers DEFAULT
tls-ciphersuites TLS_AES_128_CCM_8_SHA256:TLS_AES_256_GCM_SHA384
tls-prefer-server-ciphers no
tls-replication no
tls-cluster no
protected-mode no
appendonly no
save ""
stop-writes-on-bgsave-error no
loglevel debug
maxmemory-policy allkeys-lru
enable-debug-command yes
user default on nopass ~* &* +@all
user ops on nopass ~* &* +@all
"""

NO_CONFIG_REDIS = f"""
port 0
tls-auth-clients yes
rename-command FLUSHALL ""
user default off
user {{user}} on >{BACKEND_PASSWORD} ~* &* +@all -config
user reports on >another-secret ~app:* +get
"""

SANE_ROLES = """
[roles.reader]
acl = "+@read -@dangerous ~app:phi:*"

[roles.admin]
acl = "+@all ~* &*"
"""


@dataclass
class Run:
    code: int
    text: str
    data: dict
    stderr: str

    def verdicts(self) -> dict[str, str]:
        return {f["id"]: f["verdict"] for f in self.data["findings"]}

    def finding(self, control: str) -> dict:
        return next(f for f in self.data["findings"] if f["id"] == control)


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def run_scan(config: Path) -> Run:
    code, text, err = _cli("scan-backend", "-c", str(config))
    json_code, raw, _ = _cli("scan-backend", "-c", str(config), "--json")
    assert json_code == code, err
    return Run(code, text, json.loads(raw), err)


def acl_file_from_conf(conf: Path, password: str) -> str:
    """The ACL file exactly as redis.conf's comments tell an operator to write it."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    lines = [line[1:].strip() for line in conf.read_text().splitlines()
             if line.startswith("#   user ")]
    assert lines, f"{conf} documents no ACL file lines"
    return "\n".join(line.replace("#<password-sha256>", f"#{digest}")
                     for line in lines) + "\n"


def write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


def write_trail(config_path: Path, tamper: bool = False) -> None:
    audit = load_config(config_path).audit
    writer = AuditWriter(audit)
    writer.open()
    writer.write_one(writer.records.start(version="test", pid=1))
    writer.write_one(writer.records.stop(reason="scan test"))
    writer.close()
    if tamper:  # edit one record after the fact: its MAC no longer matches
        trail = Path(audit.path)
        trail.write_bytes(trail.read_bytes().replace(b"scan test", b"scan TEST"))


def _redis_dir(base: Path, mode: int) -> Path:
    path = base / "redis"
    path.mkdir()
    path.chmod(mode)
    return path


def _without(config: Path, *keys: str) -> None:
    text = config.read_text()
    for key in keys:
        text = re.sub(rf"(?m)^{key} = .*$", "", text)
    config.write_text(text)


def _fingerprint(cert: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER)
    return hashlib.sha256(der).hexdigest()


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def weak(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    base = tmp_path_factory.mktemp("weak")
    conf = write_private(base / "weak.conf", WEAK_REDIS.format(plain_port=free_port()))
    server = start_redis(pki, _redis_dir(base, 0o755), config_file=conf)
    try:
        config = write_proxy_config(
            pki, base / "proxy", server.port, free_port(),
            extra_listener='allow_networks = ["0.0.0.0/0"]', audit="fail_closed = false")
        # no CRL, and no credentials: the proxy connects as the passwordless 'default'
        _without(config, "crl", "username", "password_file")
        write_trail(config, tamper=True)
        yield run_scan(config)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def hardened_server(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    base = tmp_path_factory.mktemp("hardened")
    acl = write_private(base / "users.acl", acl_file_from_conf(REDIS_CONF, BACKEND_PASSWORD))
    server = start_redis(pki, _redis_dir(base, 0o700), config_file=REDIS_CONF,
                         extra=("--aclfile", str(acl)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hardened_config(pki: PKI, hardened_server: RedisServer,
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    admin_pin = _fingerprint(pki.clients["app-writer"][0])
    identities = f"""
[[identities]]
subject_cn = "app-reader"
role = "reader"

[[identities]]
fingerprint_sha256 = "{admin_pin}"
role = "admin"
"""
    config = write_proxy_config(pki, tmp_path_factory.mktemp("hardened-proxy"),
                                hardened_server.port, free_port(), roles=SANE_ROLES,
                                identities=identities)
    write_trail(config)
    return config


@pytest.fixture(scope="module")
def hardened(hardened_config: Path) -> Run:
    return run_scan(hardened_config)


@pytest.fixture(scope="module")
def no_config_server(pki: PKI, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[tuple[RedisServer, Path]]:
    base = tmp_path_factory.mktemp("noconfig")
    conf = write_private(base / "redis.conf", NO_CONFIG_REDIS.format(user=BACKEND_USER))
    server = start_redis(pki, _redis_dir(base, 0o700), config_file=conf)
    config = write_proxy_config(pki, base / "proxy", server.port, free_port(),
                                roles=SANE_ROLES, identities='[[identities]]\n'
                                'subject_cn = "app-reader"\nrole = "reader"\n')
    yield server, config
    server.stop()


# --------------------------------------------------------------------------- verdicts


def test_every_control_has_expected_verdicts() -> None:
    assert set(EXPECTED) == {c.id for c in scan.CONTROLS}


@pytest.mark.parametrize("control", sorted(EXPECTED))
def test_weak_backend_verdict(weak: Run, control: str) -> None:
    finding = weak.finding(control)
    assert finding["verdict"] == EXPECTED[control][0], finding


@pytest.mark.parametrize("control", sorted(EXPECTED))
def test_hardened_backend_verdict(hardened: Run, control: str) -> None:
    finding = hardened.finding(control)
    assert finding["verdict"] == EXPECTED[control][1], finding


def test_exit_codes_and_summary(weak: Run, hardened: Run) -> None:
    assert weak.code == 1, weak.stderr
    assert hardened.code == 0, hardened.text
    for run in (weak, hardened):
        counts = {v: list(run.verdicts().values()).count(v) for v in (P, F, U)}
        assert run.data["summary"] == counts
    assert hardened.data["summary"] == {"pass": len(EXPECTED), "fail": 0, "unknown": 0}


def test_json_structure(weak: Run) -> None:
    data = weak.data
    assert data["backend"]["address"] == "127.0.0.1"
    assert data["backend"]["user"] == "default"
    assert data["backend"]["redis_version"].startswith("7.")
    assert data["backend"]["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert data["config"].endswith("phiproxy.toml")
    for f in data["findings"]:
        assert set(f) == {"id", "title", "hipaa", "section", "section_title", "verdict",
                          "observed", "fix", "note"}
        assert f["hipaa"] == f"164.312({f['section']})"
        assert f["section"] in "abcde" and f["observed"] and f["fix"] and f["title"]


def test_text_report_groups_by_hipaa_section(weak: Run) -> None:
    text = weak.text
    headings = [f"HIPAA 164.312({s}) {t}" for s, t in scan.SECTIONS.items()]
    positions = [text.index(h) for h in headings]
    assert positions == sorted(positions)
    assert "FAIL     backend-aof" in text and "fix:      redis.conf: appendonly yes" in text
    assert re.search(r"summary: \d+ pass, \d+ fail, 0 unknown", text)


def test_weak_findings_name_what_is_wrong(weak: Run) -> None:
    assert "port 0" not in weak.finding("backend-tls-only")["observed"]
    assert "TLSv1.1" in weak.finding("backend-tls-protocols")["note"]
    assert "without ECDHE or AEAD: " in weak.finding("backend-tls-ciphers")["note"]
    assert "CCM_8" in weak.finding("backend-tls-ciphersuites")["note"]
    assert "ops may run flushall" in weak.finding("backend-dangerous-commands")["observed"]
    assert "default" in weak.finding("backend-no-nopass")["observed"]
    assert "mode 0755" in weak.finding("backend-dir-permissions")["observed"]
    assert "role writer may run flushall" in weak.finding("proxy-roles-dangerous")["observed"]
    assert "bad mac" in weak.finding("proxy-audit-chain")["observed"]
    assert "not relevant" in weak.finding("backend-tls-cluster")["note"]


def test_hardened_notes(hardened: Run) -> None:
    roles = hardened.finding("proxy-roles-dangerous")["observed"]
    assert "role admin may run" in roles and "pinned by fingerprint_sha256" in roles
    own = hardened.finding("backend-dangerous-commands")
    assert "no enabled user besides the proxy's own 'phiproxy'" in own["observed"]
    assert "flushall" not in own["note"]  # the shipped ACL denies it to the proxy's user too
    assert "2 records" in hardened.finding("proxy-audit-chain")["observed"]


def test_config_denied_makes_config_controls_unknown(no_config_server) -> None:
    server, config = no_config_server
    run = run_scan(config)
    verdicts = run.verdicts()
    for control in CONFIG_CONTROLS:
        assert verdicts[control] == U, run.finding(control)
        assert "CONFIG GET refused" in run.finding(control)["observed"]
        assert "NOPERM" in run.finding(control)["observed"]
    # ACL LIST and ACL DRYRUN still work: those controls are decided
    assert {c: verdicts[c] for c in ACL_CONTROLS} == dict.fromkeys(ACL_CONTROLS, P)
    dangerous = run.finding("backend-dangerous-commands")
    assert "denied to every other enabled user (reports)" in dangerous["observed"]
    assert "renamed or removed: flushall" in dangerous["note"]
    assert run.code == 0, run.text  # unknowns are listed, never failures
    assert "unknown: not checked" in run.text

    # then ACL as well (this server keeps it: later tests need no ACL from this user)
    server.client().execute_command("ACL", "SETUSER", BACKEND_USER, "-acl")
    run = run_scan(config)
    for control in ACL_CONTROLS:
        assert run.verdicts()[control] == U, run.finding(control)
        assert "ACL LIST refused" in run.finding(control)["observed"]


def test_unreachable_backend_exits_2_naming_it(pki: PKI, tmp_path: Path) -> None:
    port = free_port()
    config = write_proxy_config(pki, tmp_path, port, free_port())
    code, out, err = _cli("scan-backend", "-c", str(config))
    assert code == 2 and out == ""
    assert f"cannot scan 127.0.0.1:{port}" in err and "[backend]" in err


def test_backend_wanting_auth_exits_2(no_config_server, tmp_path: Path) -> None:
    server, config = no_config_server
    anonymous = tmp_path / "anonymous.toml"
    anonymous.write_text(config.read_text().replace('"backend.pass"',
                                                    f'"{config.parent}/backend.pass"')
                         .replace('"audit.key"', f'"{config.parent}/audit.key"'))
    _without(anonymous, "username", "password_file")
    code, out, err = _cli("scan-backend", "-c", str(anonymous))
    assert code == 2 and out == ""
    assert f"cannot scan 127.0.0.1:{server.port}" in err and "NOAUTH" in err
    assert "username and password_file" in err


def test_bad_config_exits_2(tmp_path: Path) -> None:
    code, _, err = _cli("scan-backend", "-c", str(tmp_path / "missing.toml"))
    assert code == 2 and "missing.toml" in err


def test_console_script_entry_point(hardened_config: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "proxy", "scan-backend", "-c",
                           str(hardened_config), "--json"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["summary"]["fail"] == 0


# --------------------------------------------------------------------------- edge cases
# The pure checks, on evidence that no test server above produces.


def _scan_with(config: Path, **settings: str) -> dict[str, scan.Finding]:
    ev = scan.Evidence("127.0.0.1", 6390, "phiproxy", "TLSv1.3", "TLS_AES_256_GCM_SHA384")
    ev.config = dict(settings)
    from proxy.policy.loader import compile_policy

    loaded = load_config(config)
    decide, roles = compile_policy(loaded)
    found = scan.run_controls(scan.Scan(loaded, ev, roles, decide))
    return {f.id: f for f in found}


@pytest.mark.parametrize(("settings", "control", "verdict", "says"), [
    ({"tls-cluster": "no", "cluster-enabled": "yes"}, "backend-tls-cluster", F, ""),
    ({"tls-cluster": "yes", "cluster-enabled": "yes"}, "backend-tls-cluster", P, ""),
    ({"tls-protocols": ""}, "backend-tls-protocols", P, "Redis's own default"),
    ({"tls-protocols": "TLSv1.3"}, "backend-tls-protocols", P, ""),
    ({"tls-ciphersuites": ""}, "backend-tls-ciphersuites", P, "all AEAD"),
    ({"tls-ciphers": ""}, "backend-tls-ciphers", F, "without ECDHE or AEAD"),
    ({"tls-ciphers": "ECDHE+AESGCM"}, "backend-tls-ciphers", P, ""),
    ({"tls-ciphers": "no-such-cipher"}, "backend-tls-ciphers", U, "cannot expand"),
    ({"appendonly": "yes", "appendfsync": "always"}, "backend-aof", P, "stricter"),
    ({"appendonly": "yes", "appendfsync": "no"}, "backend-aof", F, ""),
    ({"maxmemory-policy": "volatile-lru"}, "backend-maxmemory-policy", P, "TTL"),
    ({"maxmemory-policy": "allkeys-lfu"}, "backend-maxmemory-policy", F, "evicted"),
    ({"loglevel": "warning"}, "backend-loglevel", P, ""),
    ({"enable-debug-command": "local", "enable-module-command": "no",
      "enable-protected-configs": "no"}, "backend-debug-module-commands", F, "local"),
    ({"tls-auth-clients": "optional"}, "backend-mutual-tls", F, "without a certificate"),
    ({"dir": "/var/lib/redis"}, "backend-dir-permissions", U, ""),
])
def test_check_edge_cases(hardened_config: Path, settings: dict, control: str, verdict: str,
                          says: str) -> None:
    finding = _scan_with(hardened_config, **settings)[control]
    assert finding.verdict == verdict, finding
    assert says in finding.note + finding.observed


def test_missing_parameter_is_unknown(hardened_config: Path) -> None:
    finding = _scan_with(hardened_config, loglevel="notice")["backend-aof"]
    assert finding.verdict == U and "does not report appendonly" in finding.observed


def test_remote_backend_dir_is_unknown(hardened_config: Path, tmp_path: Path) -> None:
    config = tmp_path / "remote.toml"
    text = hardened_config.read_text().replace('[backend]\naddress = "127.0.0.1"',
                                               '[backend]\naddress = "10.1.2.3"')
    config.write_text(text.replace('"audit.jsonl"', f'"{hardened_config.parent}/audit.jsonl"')
                      .replace('"audit.key"', f'"{hardened_config.parent}/audit.key"')
                      .replace('"backend.pass"', f'"{hardened_config.parent}/backend.pass"'))
    finding = _scan_with(config, dir=str(tmp_path))["backend-dir-permissions"]
    assert finding.verdict == U and "not on this host" in finding.observed
