"""load_config: a valid file loads with the right types; every mistake names file, key, fix."""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.certs import write_dev_pki
from proxy.config import (
    AuditConfig,
    Config,
    ConfigError,
    LimitsConfig,
    MetricsConfig,
    check_secret_file,
    load_config,
)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def dump_toml(doc: dict[str, Any]) -> str:
    """Just enough TOML writing for these configs: tables, [roles.X], [[identities]]."""
    lines: list[str] = []

    def table(header: str, body: dict[str, Any]) -> None:
        lines.append(header)
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in body.items())
        lines.append("")

    for name, body in doc.items():
        if name == "roles":
            for role, role_body in body.items():
                table(f"[roles.{role}]", role_body)
        elif name == "identities":
            for identity in body:
                table("[[identities]]", identity)
        else:
            table(f"[{name}]", body)
    return "\n".join(lines)


FINGERPRINT = "AB:" * 31 + "CD"  # colons and upper case, as openssl prints it


def full_doc() -> dict[str, Any]:
    return {
        "listener": {
            "address": "127.0.0.1",
            "port": 6380,
            "cert": "certs/proxy.pem",
            "key": "certs/proxy-key.pem",
            "client_ca": "certs/clients-ca.pem",
            "crl": "certs/clients.crl",
            "min_tls": "1.3",
            "allow_networks": ["127.0.0.0/8", "10.1.0.0/16", "::1/128"],
            "handshake_timeout_s": 3,
            "idle_timeout_s": 0,
            "max_connections": 500,
            "tcp_keepalive": False,
        },
        "backend": {
            "address": "127.0.0.1",
            "port": 6390,
            "ca": "certs/backend-ca.pem",
            "server_name": "localhost",
            "cert": "certs/proxy-client.pem",
            "key": "certs/proxy-client-key.pem",
            "username": "phiproxy",
            "password_file": "secrets/backend.pass",
            "connect_timeout_s": 1.5,
            "pool_size": 8,
            "learn_commands": True,
        },
        "audit": {
            "path": "audit/audit.jsonl",
            "key_file": "secrets/audit.key",
            "phi_keys": ["app:phi:*", "pt:*"],
            "environment": "test",
            "instance": "proxy-7",
            "fail_closed": False,
            "max_bytes": 1048576,
            "keep": 3,
        },
        "metrics": {"address": "127.0.0.1", "port": 0},
        "limits": {"max_bulk_bytes": 1024, "max_args": 64},
        "roles": {
            "reader": {"acl": "+@read ~app:phi:*", "dbs": [1, 0, 1]},
            "writer": {"acl": "+@read +@write ~app:phi:*"},
        },
        "identities": [
            {"subject_cn": "billing", "role": "writer"},
            {"san_uri": "spiffe://example.org/reports", "subject_ou": "ops", "role": "reader"},
            {"fingerprint_sha256": FINGERPRINT, "role": "reader"},
        ],
    }


def _secret(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


@dataclass
class Site:
    """A config directory with a real dev PKI and secrets; `doc` is edited by each test."""

    dir: Path
    doc: dict[str, Any]

    @property
    def file(self) -> Path:
        return self.dir / "phiproxy.toml"

    def load(self) -> Config:
        self.file.write_text(dump_toml(self.doc))
        return load_config(self.file)

    def problems(self) -> list[str]:
        with pytest.raises(ConfigError) as caught:
            self.load()
        problems = caught.value.problems
        assert str(caught.value) == "\n".join(problems)
        for problem in problems:
            assert problem.startswith(f"{self.file}: "), problem
        return problems

    def problem(self) -> str:
        problems = self.problems()
        assert len(problems) == 1, problems
        return problems[0]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    write_dev_pki(tmp_path / "certs", ["billing"])
    _secret(tmp_path / "secrets" / "backend.pass", b"s3cret\n")
    _secret(tmp_path / "secrets" / "audit.key", os.urandom(32))
    return Site(tmp_path, full_doc())


# --- what a valid file gives --------------------------------------------------------------


def test_full_config_loads_with_types_and_paths_resolved_against_the_file(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths must not depend on the working directory
    config = site.load()
    certs = tmp_path / "certs"

    assert config.path == site.file
    listener = config.listener
    assert (listener.address, listener.port) == ("127.0.0.1", 6380)
    assert listener.cert == certs / "proxy.pem"
    assert listener.key == certs / "proxy-key.pem"
    assert listener.client_ca == certs / "clients-ca.pem"
    assert listener.crl == certs / "clients.crl"
    assert listener.min_tls == "1.3"
    assert listener.allow_networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("10.1.0.0/16"),
        ipaddress.ip_network("::1/128"),
    )
    assert listener.handshake_timeout_s == 3.0 and isinstance(listener.handshake_timeout_s, float)
    assert listener.idle_timeout_s == 0.0
    assert listener.max_connections == 500
    assert listener.tcp_keepalive is False

    backend = config.backend
    assert (backend.address, backend.port, backend.server_name) == ("127.0.0.1", 6390, "localhost")
    assert backend.ca == certs / "backend-ca.pem"
    assert backend.cert == certs / "proxy-client.pem"
    assert backend.key == certs / "proxy-client-key.pem"
    assert backend.username == "phiproxy"
    assert backend.password_file == tmp_path / "secrets" / "backend.pass"
    assert backend.password == b"s3cret"  # trailing newline stripped
    assert "s3cret" not in repr(backend)
    assert (backend.connect_timeout_s, backend.pool_size, backend.learn_commands) == (1.5, 8, True)

    assert config.audit == AuditConfig(
        path=str(tmp_path / "audit" / "audit.jsonl"),  # parent missing but creatable
        key_file=tmp_path / "secrets" / "audit.key",
        phi_keys=("app:phi:*", "pt:*"),
        environment="test",
        instance="proxy-7",
        fail_closed=False,
        max_bytes=1048576,
        keep=3,
    )
    assert not (tmp_path / "audit").exists()  # checked, not created
    assert config.metrics == MetricsConfig(address="127.0.0.1", port=0)
    assert config.limits == LimitsConfig(max_bulk_bytes=1024, max_args=64)

    assert set(config.roles) == {"reader", "writer"}
    assert config.roles["reader"].name == "reader"
    assert config.roles["reader"].acl == "+@read ~app:phi:*"
    assert config.roles["reader"].dbs == (0, 1)
    assert config.roles["writer"].dbs is None
    first, second, third = config.identities
    assert (first.subject_cn, first.role) == ("billing", "writer")
    assert (second.san_uri, second.subject_ou, second.subject_cn) == (
        "spiffe://example.org/reports", "ops", None)
    assert third.fingerprint_sha256 == "ab" * 31 + "cd"


def test_optional_sections_take_the_dataclass_defaults(site: Site) -> None:
    for name in ("audit", "metrics", "limits"):
        del site.doc[name]
    del site.doc["backend"]["server_name"]
    config = site.load()
    assert config.audit == AuditConfig()
    assert config.metrics == MetricsConfig()
    assert config.limits == LimitsConfig()
    assert config.backend.server_name == "127.0.0.1"  # verified against the address then


def test_any_address_is_accepted_when_allowed(site: Site) -> None:
    site.doc["listener"]["address"] = "0.0.0.0"
    site.doc["listener"]["allow_any_address"] = True
    assert site.load().listener.address == "0.0.0.0"


def test_audit_to_stdout(site: Site) -> None:
    site.doc["audit"]["path"] = "-"
    assert site.load().audit.path == "-"


# --- the file itself ----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}: ")
    assert "file not found" in problem and "-c" in problem


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[listener]\naddress = "127.0.0.1"\nport = \n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}: line 3")
    assert "TOML syntax error" in problem


# --- keys and sections --------------------------------------------------------------------


def test_unknown_key_suggests_the_right_one(site: Site) -> None:
    site.doc["listener"]["adress"] = "127.0.0.1"
    problem = site.problem()
    assert problem.endswith("unknown key [listener] adress; did you mean 'address'?")


def test_unknown_section(site: Site) -> None:
    site.doc["listner"] = {"port": 1}
    problem = site.problem()
    assert "unknown section [listner]" in problem and "did you mean 'listener'?" in problem


def test_missing_required_section(site: Site) -> None:
    del site.doc["backend"]
    problem = site.problem()
    assert "[backend] section is missing" in problem and "add a [backend] table" in problem


def test_missing_required_key(site: Site) -> None:
    del site.doc["listener"]["client_ca"]
    problem = site.problem()
    assert "[listener] client_ca is missing; add client_ca = " in problem


def test_port_given_as_string(site: Site) -> None:
    site.doc["listener"]["port"] = "6380"
    problem = site.problem()
    assert '[listener] port = "6380"' in problem
    assert "must be an integer, not a string" in problem
    assert "remove the quotes: port = 6380" in problem


def test_bool_is_not_an_integer(site: Site) -> None:
    site.doc["listener"]["max_connections"] = True
    problem = site.problem()
    assert "[listener] max_connections = true" in problem
    assert "must be an integer, not a boolean" in problem


def test_string_where_a_bool_belongs(site: Site) -> None:
    site.doc["audit"]["fail_closed"] = "true"
    problem = site.problem()
    assert '[audit] fail_closed = "true"' in problem and "remove the quotes" in problem


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_bad_port(site: Site, port: int) -> None:
    site.doc["backend"]["port"] = port
    problem = site.problem()
    assert f"[backend] port = {port}" in problem and "between 1 and 65535" in problem


def test_metrics_port_zero_disables_but_not_negative(site: Site) -> None:
    site.doc["metrics"]["port"] = -5
    assert "[metrics] port = -5" in site.problem()


@pytest.mark.parametrize("value", ["1.1", 1.2, "TLSv1.3"])
def test_bad_min_tls(site: Site, value: object) -> None:
    site.doc["listener"]["min_tls"] = value
    problem = site.problem()
    assert "[listener] min_tls" in problem and '"1.2" or "1.3"' in problem


def test_bad_cidr(site: Site) -> None:
    site.doc["listener"]["allow_networks"] = ["10.0.0.300/8"]
    problem = site.problem()
    assert "[listener] allow_networks" in problem
    assert '"10.0.0.300/8" is not a network' in problem and "CIDR" in problem


def test_cidr_with_host_bits_suggests_the_network(site: Site) -> None:
    site.doc["listener"]["allow_networks"] = ["10.0.0.1/8"]
    assert 'did you mean "10.0.0.0/8"?' in site.problem()


def test_empty_allow_networks(site: Site) -> None:
    site.doc["listener"]["allow_networks"] = []
    assert "[listener] allow_networks = []: is empty" in site.problem()


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "", "*"])
def test_any_address_refused_without_allow_any_address(site: Site, address: str) -> None:
    site.doc["listener"]["address"] = address
    problem = site.problem()
    assert f"[listener] address = {json.dumps(address)}" in problem
    assert "every interface" in problem and "allow_any_address = true" in problem


def test_listener_address_must_be_an_ip_or_localhost(site: Site) -> None:
    site.doc["listener"]["address"] = "proxy.example.org"
    problem = site.problem()
    assert "[listener] address" in problem and '"localhost"' in problem


@pytest.mark.parametrize("address", ["redis host", "redis\n", "0.0.0.0", ""])
def test_bad_backend_address(site: Site, address: str) -> None:
    site.doc["backend"]["address"] = address
    problem = site.problem()
    assert f"[backend] address = {json.dumps(address)}" in problem and "127.0.0.1" in problem


def test_limit_above_redis_default(site: Site) -> None:
    site.doc["limits"]["max_inline_bytes"] = 64 * 1024 + 1
    problem = site.problem()
    assert "[limits] max_inline_bytes" in problem and f"between 1 and {64 * 1024}" in problem


def test_inline_password_refused(site: Site) -> None:
    site.doc["backend"]["password"] = "hunter2"
    problem = site.problem()
    assert "[backend] password" in problem and "password_file" in problem
    assert "hunter2" not in problem


# --- files and secrets --------------------------------------------------------------------


def test_inline_key_content_is_refused_without_echoing_it(site: Site) -> None:
    site.doc["backend"]["key"] = "-----BEGIN EC KEY-----\nc2VjcmV0\n-----END EC KEY-----\n"
    problem = site.problem()
    assert "[backend] key: must be a file path, not the file's content" in problem
    assert "c2VjcmV0" not in problem


def test_world_readable_listener_key(site: Site, tmp_path: Path) -> None:
    key = tmp_path / "certs" / "proxy-key.pem"
    key.chmod(0o644)
    problem = site.problem()
    assert problem == (
        f'{site.file}: [listener] key = "certs/proxy-key.pem": {key} is readable by '
        f"group/others (mode 0644); run: chmod 600 {key}"
    )


def test_group_readable_password_file(site: Site, tmp_path: Path) -> None:
    (tmp_path / "secrets" / "backend.pass").chmod(0o640)
    problem = site.problem()
    assert "[backend] password_file" in problem
    assert f"chmod 600 {tmp_path / 'secrets' / 'backend.pass'}" in problem


def test_world_readable_audit_key(site: Site, tmp_path: Path) -> None:
    (tmp_path / "secrets" / "audit.key").chmod(0o604)
    problem = site.problem()
    assert "[audit] key_file" in problem and "mode 0604" in problem and "chmod 600" in problem


def test_empty_password_file(site: Site, tmp_path: Path) -> None:
    _secret(tmp_path / "secrets" / "backend.pass", b"\n")
    problem = site.problem()
    assert "[backend] password_file" in problem and "is empty" in problem


def test_missing_cert_file(site: Site, tmp_path: Path) -> None:
    (tmp_path / "certs" / "proxy.pem").unlink()
    problem = site.problem()
    assert '[listener] cert = "certs/proxy.pem"' in problem
    assert f"{tmp_path / 'certs' / 'proxy.pem'} does not exist" in problem
    assert "fix the path" in problem


def test_cert_path_that_is_a_directory(site: Site) -> None:
    site.doc["backend"]["ca"] = "certs"
    assert "[backend] ca" in site.problem()


def test_audit_path_under_a_file(site: Site, tmp_path: Path) -> None:
    site.doc["audit"]["path"] = "phiproxy.toml/audit.jsonl"
    problem = site.problem()
    assert "[audit] path" in problem and "is not a directory" in problem


def test_check_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    _secret(path, b"x", 0o600)
    assert check_secret_file(path) is None
    path.chmod(0o400)
    assert check_secret_file(path) is None
    path.chmod(0o620)
    assert check_secret_file(path) == (
        f"{path} is accessible by group/others (mode 0620); run: chmod 600 {path}")
    assert "does not exist" in (check_secret_file(tmp_path / "missing") or "")


# --- roles and identities -----------------------------------------------------------------


def test_identity_with_unknown_role(site: Site) -> None:
    site.doc["identities"][0]["role"] = "wirter"
    problem = site.problem()
    assert '[[identities]] #1 role = "wirter": no such role' in problem
    assert "did you mean 'writer'?" in problem and "[roles.wirter]" in problem


def test_identity_without_a_match_field(site: Site) -> None:
    site.doc["identities"].append({"role": "reader"})
    problem = site.problem()
    assert "[[identities]] #4 has no match field" in problem
    assert "subject_cn" in problem and "fingerprint_sha256" in problem


@pytest.mark.parametrize("fingerprint", ["ab" * 31, "zz" * 32, "ab" * 33])
def test_bad_fingerprint(site: Site, fingerprint: str) -> None:
    site.doc["identities"][2]["fingerprint_sha256"] = fingerprint
    problem = site.problem()
    assert "[[identities]] #3 fingerprint_sha256" in problem
    assert "64 hex digits" in problem and "openssl x509" in problem


def test_no_roles(site: Site) -> None:
    del site.doc["roles"]
    problem = site.problem()  # and no "no such role" noise for every identity
    assert "[roles] no role is defined" in problem and "[roles.reader]" in problem


def test_no_identities(site: Site) -> None:
    del site.doc["identities"]
    assert "[[identities]] none is defined" in site.problem()


def test_role_without_acl_and_bad_dbs(site: Site) -> None:
    site.doc["roles"]["reader"] = {"dbs": [0, -1]}
    problems = site.problems()
    assert len(problems) == 2
    assert "[roles.reader] acl is missing" in problems[0]
    assert "[roles.reader] dbs" in problems[1]


def test_several_problems_are_reported_together(site: Site, tmp_path: Path) -> None:
    site.doc["listener"]["port"] = "6380"
    site.doc["backend"]["pool_sise"] = 3
    site.doc["identities"][0]["role"] = "nobody"
    (tmp_path / "certs" / "proxy-client-key.pem").chmod(0o644)
    problems = site.problems()
    assert len(problems) == 4, problems
    joined = "\n".join(problems)
    assert "[listener] port" in joined
    assert "unknown key [backend] pool_sise; did you mean 'pool_size'?" in joined
    assert "[[identities]] #1 role" in joined
    assert "[backend] key" in joined and "chmod 600" in joined


@pytest.mark.parametrize(("section", "key"), [("listener", "cert"), ("backend", "password_file"),
                                              ("audit", "path"), ("audit", "key_file"),
                                              ("backend", "unix_socket")])
def test_a_path_the_file_system_cannot_examine_is_a_problem_not_a_crash(
        site: Site, section: str, key: str) -> None:
    # Found by tests/fuzz/fuzz_config.py: a name longer than NAME_MAX made exists() raise
    # OSError (ENAMETOOLONG) out of load_config instead of a ConfigError.
    site.doc[section][key] = "x" * 300
    if key == "unix_socket":
        del site.doc["backend"]["address"], site.doc["backend"]["port"]
    problems = [p for p in site.problems() if f"[{section}] {key}" in p]
    assert len(problems) == 1 and "cannot be examined (File name too long)" in problems[0]


def test_a_syslog_url_with_credentials_is_refused_without_echoing_them(site: Site) -> None:
    site.doc["audit"]["path"] = "syslog+tcp://auditor:hunter2@collector:6514"
    problem = site.problem()
    assert "must not carry a user or password" in problem
    assert "hunter2" not in problem and "auditor" not in problem
