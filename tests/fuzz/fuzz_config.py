"""Config loader harness: load_config (and compile_policy) on mutated TOML.

Input: byte 0 bit 0 chooses raw mode (the rest is the file's bytes) or structured mode:
a valid configuration (its files exist in a scratch directory) edited by operations read
three bytes at a time (delete a key or a section, set a key to a value from VALUES, add
an unknown key, a role or an identity), then written as TOML.

Properties, for every input:
- load_config returns a Config or raises ConfigError, nothing else; so does
  compile_policy on what it returns;
- every problem starts with the file's path and names where: a key or section (`[...]`),
  or the line and column of a syntax error, or the file itself (not found, not UTF-8);
- the unmutated structured configuration loads (the harness tests what it thinks).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from proxy.config import _SECTIONS, ConfigError, load_config
from proxy.policy.loader import compile_policy

_DIR = Path(tempfile.mkdtemp(prefix="phiproxy-fuzz-config-"))


def _write(name: str, content: bytes, mode: int = 0o644) -> None:
    path = _DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.chmod(path, mode)


for _name in ("proxy.pem", "clients-ca.pem", "backend-ca.pem", "proxy-client.pem",
              "clients.crl"):
    _write(f"certs/{_name}", b"-----BEGIN CERTIFICATE-----\n")
# Only a header, never a key; built so that no committed file holds the marker a secret
# scanner looks for.
_KEY_HEADER = "-----BEGIN " + "PRIVATE KEY" + "-----"
for _name in ("proxy-key.pem", "proxy-client-key.pem"):
    _write(f"certs/{_name}", _KEY_HEADER.encode() + b"\n", 0o600)
_write("secrets/backend.pass", b"backend-password\n", 0o600)
_write("secrets/audit.key", b"k" * 32, 0o600)
_write("secrets/short.key", b"k" * 8, 0o600)
_write("secrets/open.key", b"k" * 32, 0o644)
_write("secrets/empty", b"", 0o600)
(_DIR / "audit").mkdir(exist_ok=True)

BASE: dict[str, Any] = {
    "listener": {"address": "127.0.0.1", "port": 6380, "cert": "certs/proxy.pem",
                 "key": "certs/proxy-key.pem", "client_ca": "certs/clients-ca.pem",
                 "crl": "certs/clients.crl", "allow_networks": ["127.0.0.0/8"]},
    "backend": {"address": "127.0.0.1", "port": 6390, "ca": "certs/backend-ca.pem",
                "server_name": "localhost", "cert": "certs/proxy-client.pem",
                "key": "certs/proxy-client-key.pem", "username": "phiproxy",
                "password_file": "secrets/backend.pass"},
    "audit": {"path": "audit/audit.jsonl", "key_file": "secrets/audit.key",
              "phi_keys": ["app:phi:*"]},
    "metrics": {"port": 0},
    "limits": {"max_bulk_bytes": 1024},
    "lockout": {"failures": 5},
    "policy": {"disabled_commands": ["DEBUG", "CONFIG|SET"]},
    "roles": {"reader": {"acl": "+@read ~app:*"}, "writer": {"acl": "+@all ~* &*",
                                                              "dbs": [0, 1]}},
    "identities": [{"subject_cn": "billing", "role": "writer"},
                   {"san_uri": "spiffe://x/y", "role": "reader"}],
}

VALUES: list[Any] = [
    0, 1, -1, 2, 65535, 65536, 2**31, 2**63 - 1, -(2**63), 0.0, 0.05, 1.5, -2.5, 1e300,
    float("inf"), float("-inf"), float("nan"), True, False, "", "-", " ", "127.0.0.1",
    "0.0.0.0", "::", "*", "localhost", "::1", "256.1.1.1", "example.org", "bad host!",
    "1.2", "1.3", "1.1", "standalone", "cluster", "syslog+tcp://127.0.0.1:6514",
    "syslog+tcp://:0", "syslog+udp://x", "syslog+tcp://[::1", "syslog+tcp://h:99999",
    "syslog+tcp://h:abc", "syslog+tcp://u:p@h:1", "authpriv", "local9", "fe80::1%eth0",
    "certs/proxy.pem",
    "certs/proxy-key.pem", "secrets/audit.key", "secrets/short.key", "secrets/open.key",
    "secrets/empty", "certs", "audit", "/nonexistent/x", "../../../../etc/shadow", "a\nb",
    _KEY_HEADER, "é", "\x00", "nul\x00byte", "x" * 300, "+@read ~*",
    "(+get", "reader", "writer", "nosuchrole", "ab:cd", "AB" * 32, "DEBUG", "CONFIG|SET",
    "nosuch", [], [0], [-1], [1, 2], ["10.0.0.0/8"], ["10.0.0.1/8"], ["nonsense"], [True],
    ["a", 1], [[1]], ["app:*"], {}, {"acl": "+get"}, {"x": 1}, [{}],
    [{"keys": ["app:phi:*"], "encrypt": True, "max_ttl_s": 10, "default_ttl_s": 60}],
    [{"keys": [], "nosuch": 1}],
    datetime.datetime(1979, 5, 27, 7, 32, tzinfo=datetime.UTC), datetime.date(2026, 1, 1),
]

_KEYS = sorted({(s, k) for s, keys in _SECTIONS.items() for k in keys}
               | {(s, k) for s, body in BASE.items() if isinstance(body, dict)
                  for k in body if s != "roles"}
               | {("backend", "unix_socket"), ("backend", "password"), ("audit", "head_file")})
_SECTION_NAMES = [*BASE, *(s for s in _SECTIONS if s not in BASE), "nosuch", "listner"]
_ROLE_KEYS = ["acl", "dbs", "max_cert_validity_h", "nosuch"]
_IDENTITY_KEYS = ["role", "subject_cn", "subject_ou", "san_dns", "san_uri", "san_email",
                  "fingerprint_sha256", "nosuch"]


def build(ops: bytes) -> dict[str, Any]:
    conf = copy.deepcopy(BASE)
    for i in range(0, len(ops) - 2, 3):
        op, a, b = ops[i], ops[i + 1], ops[i + 2]
        value = copy.deepcopy(VALUES[b % len(VALUES)])
        kind = op % 9
        if kind in (0, 1):  # set a known key (most useful)
            section, key = _KEYS[(a + 256 * (op >> 4)) % len(_KEYS)]
            if isinstance(conf.get(section), dict):
                conf[section][key] = value
        elif kind == 2:  # delete a key
            section, key = _KEYS[a % len(_KEYS)]
            if isinstance(conf.get(section), dict):
                conf[section].pop(key, None)
        elif kind == 3:  # delete or replace a whole section
            name = _SECTION_NAMES[a % len(_SECTION_NAMES)]
            if b & 1:
                conf.pop(name, None)
            else:
                conf[name] = value
        elif kind == 4:  # a top-level key
            conf[["port", "acl", "nosuch", "listener"][a % 4]] = value
        elif kind == 5 and isinstance(conf.get("roles"), dict):  # a role
            name = ["reader", "writer", "new", "with space", "é", ""][a % 6]
            role = conf["roles"].setdefault(name, {})
            if isinstance(role, dict):
                role[_ROLE_KEYS[(a >> 3) % len(_ROLE_KEYS)]] = value
            else:
                conf["roles"][name] = value
        elif kind == 6 and isinstance(conf.get("identities"), list):  # an identity field
            ids = conf["identities"]
            if a & 1 or not ids:
                ids.append({})
            entry = ids[(a >> 1) % len(ids)]
            if isinstance(entry, dict):
                entry[_IDENTITY_KEYS[(a >> 2) % len(_IDENTITY_KEYS)]] = value
        elif kind == 7 and isinstance(conf.get("identities"), list) and conf["identities"]:
            conf["identities"].pop(a % len(conf["identities"]))
        elif kind == 8:  # a value where a table or list of tables belongs
            conf[["roles", "identities"][a & 1]] = value
    return conf


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(v), repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON escapes are TOML basic-string escapes
    if isinstance(v, datetime.datetime | datetime.date):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"


def to_toml(conf: dict[str, Any]) -> str:
    lines: list[str] = []
    tables = []
    for key, value in conf.items():  # plain values first: they belong to no table
        array_of_tables = isinstance(value, list) and bool(value) and all(
            isinstance(x, dict) for x in value)
        if array_of_tables or isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{json.dumps(key)} = {_toml_value(value)}")
    for key, value in tables:
        if isinstance(value, list):
            for entry in value:
                lines.append(f"[[{key}]]")
                lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in entry.items()]
            continue
        lines.append(f"[{json.dumps(key)}]")
        subtables = {k: v for k, v in value.items() if key == "roles" and isinstance(v, dict)}
        lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()
                  if k not in subtables]
        for k, v in subtables.items():  # [roles."name"]
            lines.append(f"[{json.dumps(key)}.{json.dumps(k)}]")
            lines += [f"{json.dumps(rk)} = {_toml_value(rv)}" for rk, rv in v.items()]
    return "\n".join(lines) + "\n"


_WHERE = re.compile(r"\[|line \d+, column \d+|outside any section")
_FILE_PROBLEMS = ("file not found", "is not UTF-8", "TOML syntax error", "is a directory")


def check(data: bytes) -> None:
    path = _DIR / "phiproxy.toml"
    raw = not data or data[0] & 1
    path.write_bytes(data[1:] if raw else to_toml(build(data[1:])).encode())
    try:
        config = load_config(path)
    except ConfigError as exc:
        assert raw or len(data) > 3, f"the unmutated configuration is refused: {exc}"
        assert exc.problems, "ConfigError without a problem"
        for problem in exc.problems:
            assert problem.startswith(f"{path}: "), f"problem does not name the file: {problem}"
            text = problem[len(f"{path}: "):]
            assert _WHERE.search(text) or text.startswith(_FILE_PROBLEMS), \
                f"problem names no key: {problem}"
        return
    try:
        compile_policy(config)
    except ConfigError as exc:
        assert all(p.startswith(f"{path}: ") for p in exc.problems), exc.problems
