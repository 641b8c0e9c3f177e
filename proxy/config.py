"""Configuration: one TOML file -> frozen dataclasses, validated once at load.

Every problem names the file, the key and the fix. `load_config` collects all problems
and raises one ConfigError listing them (check-config prints every one).
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import json
import math
import os
import re
import shlex
import stat
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from proxy.audit.chain import AuditError, load_key
from proxy.audit.target import SYSLOG_FACILITIES, is_syslog, parse_syslog_url
from proxy.protect.crypto import Cipher
from proxy.protect.keyring import KeyringError, load_keyring
from proxy.protect.rules import Protection, make_rule

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MiB = 1024 * 1024


class ConfigError(Exception):
    """Configuration is invalid; `problems` lists every message (file, key, fix)."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ListenerConfig:
    address: str
    port: int
    cert: Path
    key: Path
    client_ca: Path
    crl: Path | None = None
    min_tls: str = "1.2"  # "1.2" or "1.3"
    allow_networks: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"),)
    allow_any_address: bool = False
    handshake_timeout_s: float = 5.0
    idle_timeout_s: float = 300.0  # 0 disables
    max_connections: int = 10000
    tcp_keepalive: bool = True
    drain_timeout_s: float = 10.0  # SIGTERM: how long busy connections may finish
    # RFC 5280 strictness (OpenSSL's X509_STRICT) for client certificates; false admits
    # legacy PKIs (no key identifiers, ...) and check-config warns
    x509_strict: bool = True


@dataclass(frozen=True)
class BackendConfig:
    address: str  # "" with unix_socket
    port: int  # 0 with unix_socket
    ca: Path | None  # None with unix_socket: no TLS on a local socket
    server_name: str
    cert: Path | None
    key: Path | None
    username: str | None = None
    password_file: Path | None = None
    password: bytes | None = field(default=None, repr=False)  # read from password_file at load
    connect_timeout_s: float = 2.0
    pool_size: int = 4  # pre-warmed idle dedicated backend connections
    learn_commands: bool = False
    mode: str = "standalone"
    shared_connections: int = 2  # pipelined connections shared by stateless clients
    unix_socket: Path | None = None  # a co-located Redis with no network listener
    health_interval_s: float = 2.0  # every node checked this often, traffic or not
    # mode = "sentinel": where to ask for the primary (TLS, the same ca/cert/key)
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None


def backend_node(cfg: BackendConfig) -> str:
    """Where the backend is, for messages: host:port, the unix socket's path, or the
    primary the sentinels name."""
    if cfg.mode == "sentinel":
        return (f"the primary of '{cfg.master_name}' (sentinels "
                f"{', '.join(f'{h}:{p}' for h, p in cfg.sentinels)})")
    return str(cfg.unix_socket) if cfg.unix_socket is not None else f"{cfg.address}:{cfg.port}"


@dataclass(frozen=True)
class AuditConfig:
    path: str = "-"  # file path (resolved against the config dir) or "-" for stdout
    key_file: Path | None = None
    phi_keys: tuple[str, ...] = ()
    environment: str = "dev"
    instance: str = "proxy-1"
    fail_closed: bool = True
    max_bytes: int = 0  # rotate the file when it reaches this size; 0: never
    keep: int = 10  # rotated files kept
    # path = "syslog+tcp://host:port": RFC 5424 over TCP (octet counting) to a collector
    syslog_facility: str = "authpriv"  # auth, authpriv or local0..local7
    syslog_buffer_bytes: int = 4 * MiB  # queued while the collector is slow or away
    # chain head for "-" and syslog (a file trail keeps its own next to it, <path>.head):
    # with it the chain continues across restarts instead of starting again at seq 1
    head_file: str | None = None
    # "no" | "everysec" | "always", as Redis's appendfsync (file trails; SPEC §3)
    fsync: str = "everysec"


@dataclass(frozen=True)
class MetricsConfig:
    address: str = "127.0.0.1"
    port: int = 9121  # 0 disables the endpoint


@dataclass(frozen=True)
class LockoutConfig:
    """Sources failing TLS/identity `failures` times within `window_s` are refused before
    the handshake for `block_s`."""

    failures: int = 5
    window_s: float = 60.0
    block_s: float = 300.0
    enabled: bool = True
    exempt_networks: tuple[IPNetwork, ...] = ()  # never blocked as a source (NAT, checkers)


@dataclass(frozen=True)
class LimitsConfig:
    """Request limits, enforced by the framer before anything is allocated for them."""

    max_bulk_bytes: int = 512 * MiB  # Redis proto-max-bulk-len
    max_query_buffer_bytes: int = 1024 * MiB  # Redis client-query-buffer-limit
    max_args: int = 2**31 - 1  # Redis: multibulk length up to INT_MAX
    max_inline_bytes: int = 64 * 1024  # Redis PROTO_INLINE_MAX_SIZE
    # Replies buffered for a client that does not read them (a shared backend connection
    # cannot be paused for one client): past this the client is disconnected.
    max_reply_buffer_bytes: int = 256 * MiB


@dataclass(frozen=True)
class RoleConfig:
    name: str
    acl: str
    dbs: tuple[int, ...] | None = None  # None: every database
    max_cert_validity_h: float | None = None  # refuse certificates valid for longer


@dataclass(frozen=True)
class IdentityRule:
    """First matching rule wins; every given field must match."""

    role: str
    subject_cn: str | None = None
    subject_ou: str | None = None
    san_dns: str | None = None
    san_uri: str | None = None
    san_email: str | None = None
    fingerprint_sha256: str | None = None  # lower-case hex, no colons


@dataclass(frozen=True)
class PolicyConfig:
    """Policy that no role can lift."""

    disabled_commands: tuple[str, ...] = ()  # lower-case "cmd" or "cmd|sub"


PLAINTEXT_READS = ("refuse", "pass")


@dataclass(frozen=True)
class EncryptionConfig:
    """`[encryption]` (SPEC §9): the keyring, loaded and checked with the file."""

    keyring: Path | None = None
    # a stored protected value that is not ciphertext (written before protection was on)
    plaintext_reads: str = "refuse"  # "refuse" | "pass"
    # read from `keyring` at load, like [backend] password from password_file
    cipher: Cipher | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Config:
    path: Path
    listener: ListenerConfig
    backend: BackendConfig
    audit: AuditConfig
    metrics: MetricsConfig
    limits: LimitsConfig
    roles: dict[str, RoleConfig]
    identities: tuple[IdentityRule, ...]
    lockout: LockoutConfig = field(default_factory=LockoutConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)
    protection: Protection = field(default_factory=Protection)  # [[protect]], file order


# ---------------------------------------------------------------------------------------
# Loading. Every check records a problem and carries on, so one run reports them all.

_ANY_ADDRESSES = ("", "*")  # besides the IP literals 0.0.0.0 / :: (and their spellings)
_MATCH_FIELDS = ("subject_cn", "subject_ou", "san_dns", "san_uri", "san_email",
                 "fingerprint_sha256")
_HOSTNAME = re.compile(r"[A-Za-z0-9._-]+")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_POSITION = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$")
_MISSING: Any = object()


def check_secret_file(path: Path) -> str | None:
    """Why `path` may not hold a secret (group/others have access, like ssh refuses), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as e:
        return f"{path} cannot be examined ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        access = "readable" if mode & 0o044 else "accessible"
        return (f"{path} is {access} by group/others (mode {mode:04o}); "
                f"run: chmod 600 {shlex.quote(str(path))}")
    return None


def _show(value: Any) -> str:
    """A value as it is spelled in TOML, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{...}"
    return str(value)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def _unknown(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    if close:
        return f"did you mean '{close[0]}'?"
    return "known: " + ", ".join(known)


def _section_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if _BARE_KEY.fullmatch(name) else f"{prefix}.{json.dumps(name)}"


class _Problems:
    def __init__(self, label: str, base: Path):
        self.label = label
        self.base = base  # the config file's directory: relative paths start here
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(f"{self.label}: {message}")


class _Table:
    """One TOML table: typed getters that record a problem and return the default."""

    def __init__(self, problems: _Problems, where: str, data: dict[str, Any],
                 known: Iterable[str]):
        self.p = problems
        self.where = where
        self.data = data
        known = tuple(known)
        for key in data:
            if key in known:
                continue
            if f"{key}_file" in known:  # e.g. password = "..." where password_file belongs
                problems.add(f"{where} {key}: secrets are never inline; put it in a file "
                             f"(chmod 600) and set {key}_file to that file's path")
            else:
                problems.add(f"unknown key {where} {key}; {_unknown(key, known)}")

    def fault(self, key: str, message: str) -> None:
        self.p.add(f"{self.where} {key} = {_show(self.data[key])}: {message}")

    def _get(self, key: str, required: bool, example: str) -> Any:
        if key in self.data:
            return self.data[key]
        if required:
            self.p.add(f"{self.where} {key} is missing; add {key} = {example}")
        return _MISSING

    def _wrong_type(self, key: str, kind: str, example: str) -> None:
        value = self.data[key]
        hint = f"e.g. {key} = {example}"
        if isinstance(value, str) and kind in ("an integer", "a number"):
            with contextlib.suppress(ValueError):
                float(value)
                hint = f"remove the quotes: {key} = {value.strip()}"
        if isinstance(value, str) and kind == "a boolean" and value.lower() in ("true", "false"):
            hint = f"remove the quotes: {key} = {value.lower()}"
        self.fault(key, f"must be {kind}, not {_kind(value)}; {hint}")

    def string(self, key: str, default: str | None = None, *, required: bool = False,
               example: str = '"..."', empty_ok: bool = True) -> str | None:
        value = self._get(key, required, example)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            self._wrong_type(key, "a string", example)
            return default
        if not value and not empty_ok:
            self.fault(key, f"must not be empty; e.g. {key} = {example}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, False, "true")
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self._wrong_type(key, "a boolean", "true" if not default else "false")
            return default
        return value

    def integer(self, key: str, default: int, lo: int, hi: int | None = None, *,
                required: bool = False, what: str = "") -> int:
        example = str(default if default >= lo else lo)
        value = self._get(key, required, example)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self._wrong_type(key, "an integer", example)
            return default
        if value < lo or (hi is not None and value > hi):
            span = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            self.fault(key, f"must be {what or 'an integer'} {span}; e.g. {key} = {example}")
            return default
        return value

    def port(self, key: str, default: int, *, required: bool = False,
             zero_disables: bool = False) -> int:
        lo = 0 if zero_disables else 1
        what = "a port number (0 disables)" if zero_disables else "a port number"
        return self.integer(key, default, lo, 65535, required=required, what=what)

    def seconds(self, key: str, default: float, *, zero_ok: bool) -> float:
        value = self._get(key, False, str(default))
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self._wrong_type(key, "a number", f"{default:g}")
            return default
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            rule = "0 or more (0 turns it off)" if zero_ok else "a number of seconds above 0"
            self.fault(key, f"must be {rule}; e.g. {key} = {default:g}")
            return default
        return float(value)

    def list_of(self, key: str, kind: type, example: str) -> list[Any] | None:
        """The list under `key` if it is one whose items are all `kind`, else None."""
        value = self._get(key, False, example)
        if value is _MISSING:
            return None
        if not isinstance(value, list):
            self._wrong_type(key, "a list", example)
            return None
        for item in value:
            if isinstance(item, bool) or not isinstance(item, kind):
                self.fault(key, f"{_show(item)} is {_kind(item)}; every item must be "
                                f"{_kind(kind())}; e.g. {key} = {example}")
                return None
        return value

    def file(self, key: str, *, required: bool = False, secret: bool = False) -> Path | None:
        """A path to an existing readable file, resolved against the config file's directory."""
        example = '"secrets/name"' if secret else '"certs/name.pem"'
        raw = self.string(key, required=required, example=example)
        if raw is None:
            return None
        if not raw:
            self.fault(key, f"must be a file path; e.g. {key} = {example}")
            return None
        if "\n" in raw or raw.lstrip().startswith("-----BEGIN"):
            # the value itself is not repeated: it may be a private key
            self.p.add(f"{self.where} {key}: must be a file path, not the file's content: "
                       "secrets are never inline; save it in a file (chmod 600) and give its path")
            return None
        path = _resolve(self.p.base, raw)
        problem = _file_problem(path)
        if problem is None and secret:
            problem = check_secret_file(path)
        if problem is not None:
            self.fault(key, problem)
            return None
        return path


def _resolve(base: Path, raw: str) -> Path:
    # normpath rather than resolve(): messages show the path the user wrote, made absolute
    return Path(os.path.normpath(base / raw))


def _file_problem(path: Path) -> str | None:
    try:  # exists() raises for e.g. a name longer than the file system allows
        if not path.exists():
            return (f"{path} does not exist; fix the path (relative paths start at the config "
                    f"file's directory) or create the file")
        if not path.is_file():
            return f"{path} is not a regular file; give the path of a file"
    except OSError as e:
        return _unexaminable(path, e)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return f"{path} cannot be read ({e.strerror}); give this user read access"
    return None


def _unexaminable(path: Path, e: OSError) -> str:
    return f"{path} cannot be examined ({e.strerror}); fix the path"


def _read_toml(path: Path, label: str) -> dict[str, Any]:
    """The parsed file; any failure is the one problem there is."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        problem = "file not found; check the path given with -c, or create it (see SPEC §3)"
    except IsADirectoryError:
        problem = "is a directory; give the path of the TOML configuration file"
    except OSError as e:
        problem = f"cannot be read ({e.strerror}); check its permissions"
    else:
        try:
            return tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            problem = f"is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8"
        except tomllib.TOMLDecodeError as e:
            found = _TOML_POSITION.match(str(e))
            if found:
                problem = (f"line {found['line']}, column {found['col']}: TOML syntax error: "
                           f"{found['msg']}; fix the syntax there")
            else:
                problem = f"TOML syntax error: {e}; fix the syntax there"
    raise ConfigError([f"{label}: {problem}"])


def _keys(cls: type, *, exclude: Iterable[str] = ()) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.name not in exclude)


_SECTIONS: dict[str, tuple[str, ...]] = {
    "listener": _keys(ListenerConfig),
    "backend": _keys(BackendConfig, exclude=("password",)),
    "audit": _keys(AuditConfig),
    "metrics": _keys(MetricsConfig),
    "limits": _keys(LimitsConfig),
    "lockout": _keys(LockoutConfig),
    "policy": _keys(PolicyConfig),
    "encryption": _keys(EncryptionConfig, exclude=("cipher",)),
    "protect": (),
    "roles": (),
    "identities": (),
}


def _section(p: _Problems, data: dict[str, Any], name: str, *,
             required: bool) -> _Table | None:
    value = data.get(name, _MISSING)
    if value is _MISSING:
        if required:
            keys = ", ".join(_SECTIONS[name][:5])
            p.add(f"[{name}] section is missing; add a [{name}] table with {keys} "
                  f"(see SPEC §3)")
        return None
    if not isinstance(value, dict):
        p.add(f"[{name}] must be a table, not {_kind(value)}; write [{name}] on a line of "
              f"its own followed by its keys")
        return None
    return _Table(p, f"[{name}]", value, _SECTIONS[name])


def _top_level(p: _Problems, data: dict[str, Any]) -> None:
    for name, value in data.items():
        if name in _SECTIONS:
            continue
        if isinstance(value, dict | list):
            p.add(f"unknown section [{name}]; {_unknown(name, _SECTIONS)}")
            continue
        homes = [f"[{s}]" for s, keys in _SECTIONS.items() if name in keys]
        where = f"move it under {' or '.join(homes)}" if homes else "remove it"
        p.add(f"unknown key {name} outside any section; {where}")


def _bind_address(t: _Table, key: str, default: str, *, allow_any: bool | None) -> str:
    """A listening address: an IP literal or localhost; the any-address only when allowed.

    allow_any None: the any-address is fine here (metrics carry no PHI).
    """
    address = t.string(key, default, example='"127.0.0.1"')
    assert address is not None
    if address in _ANY_ADDRESSES:
        is_any = True
    elif address == "localhost":
        return address
    else:
        try:
            is_any = ipaddress.ip_address(address).is_unspecified
        except ValueError:
            t.fault(key, 'must be an IP address such as "127.0.0.1" or "::1", or "localhost"; '
                         "host names are not resolved for listening sockets")
            return default
    if is_any and allow_any is False:
        t.fault(key, "listens on every interface, which would expose the proxy beyond this "
                     'host; use a specific address such as "127.0.0.1", or set '
                     f"allow_any_address = true in {t.where} if that is intended")
        return default
    # "" is asyncio's spelling of "every interface"; "*" is not understood by getaddrinfo
    return "" if address == "*" else address


def _networks(t: _Table) -> tuple[IPNetwork, ...]:
    default = ListenerConfig.allow_networks
    example = '["127.0.0.0/8", "10.0.0.0/8"]'
    items = t.list_of("allow_networks", str, example)
    if items is None:
        return default
    if not items:
        t.fault("allow_networks", f"is empty, so no client could connect; list the client "
                                  f"networks, e.g. allow_networks = {example}")
        return default
    return _cidrs(t, "allow_networks", items)


def _cidrs(t: _Table, key: str, items: list[Any]) -> tuple[IPNetwork, ...]:
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError as e:
            fix = "write networks in CIDR notation such as \"10.0.0.0/8\""
            with contextlib.suppress(ValueError):
                fix = f'did you mean "{ipaddress.ip_network(item, strict=False)}"?'
            t.fault(key, f"{_show(item)} is not a network ({e}); {fix}")
    return tuple(networks)


def _min_tls(t: _Table) -> str:
    value = t.data.get("min_tls", ListenerConfig.min_tls)
    if value in ("1.2", "1.3"):
        return value
    t.fault("min_tls", 'must be "1.2" or "1.3" (a quoted string); nothing lower is accepted; '
                       'e.g. min_tls = "1.2"')
    return ListenerConfig.min_tls


def _listener(p: _Problems, data: dict[str, Any]) -> ListenerConfig | None:
    t = _section(p, data, "listener", required=True)
    if t is None:
        return None
    d = ListenerConfig
    allow_any = t.boolean("allow_any_address", d.allow_any_address)
    return ListenerConfig(
        address=_bind_address(t, "address", "127.0.0.1", allow_any=allow_any),
        port=t.port("port", 6380, required=True),
        cert=t.file("cert", required=True),
        key=t.file("key", required=True, secret=True),
        client_ca=t.file("client_ca", required=True),
        crl=t.file("crl"),
        min_tls=_min_tls(t),
        allow_networks=_networks(t),
        allow_any_address=allow_any,
        handshake_timeout_s=t.seconds("handshake_timeout_s", d.handshake_timeout_s,
                                      zero_ok=False),
        idle_timeout_s=t.seconds("idle_timeout_s", d.idle_timeout_s, zero_ok=True),
        max_connections=t.integer("max_connections", d.max_connections, 1),
        tcp_keepalive=t.boolean("tcp_keepalive", d.tcp_keepalive),
        drain_timeout_s=t.seconds("drain_timeout_s", d.drain_timeout_s, zero_ok=True),
        x509_strict=t.boolean("x509_strict", d.x509_strict),
    )  # a None in it means a problem was recorded


def _password(t: _Table, path: Path | None) -> bytes | None:
    if path is None:
        return None
    password = path.read_bytes().rstrip(b"\r\n")
    if not password:
        t.fault("password_file", f"{path} is empty; write the backend password into it")
        return None
    return password


def _backend(p: _Problems, data: dict[str, Any]) -> BackendConfig | None:
    t = _section(p, data, "backend", required=True)
    if t is None:
        return None
    d = BackendConfig
    unix_socket = _unix_socket(t)
    network = unix_socket is None  # TCP + TLS (the default), or a local socket
    mode = _backend_mode(t)
    sentinel = mode == "sentinel"
    address = t.string("address", "" if not network or sentinel else None,
                       required=network and not sentinel, example='"127.0.0.1"',
                       empty_ok=False)
    if address and not _HOSTNAME.fullmatch(address) and not _is_ip(address):
        t.fault("address", 'must be an IP address or a host name, e.g. address = "127.0.0.1"')
    elif address and _is_ip(address) and ipaddress.ip_address(address).is_unspecified:
        t.fault("address", 'is not an address one can connect to; e.g. address = "127.0.0.1"')
    password_file = t.file("password_file", secret=True)
    sentinels, master_name = _sentinels(t, sentinel, unix_socket is not None)
    return BackendConfig(
        address=address,
        port=t.port("port", 6379, required=not sentinel) if network else 0,
        ca=t.file("ca", required=network),
        # the certificate is always verified: against the address when no name is given
        server_name=t.string("server_name", address, example='"localhost"', empty_ok=False),
        cert=t.file("cert", required=network),
        key=t.file("key", required=network, secret=True),
        unix_socket=unix_socket,
        username=t.string("username", example='"phiproxy"', empty_ok=False),
        password_file=password_file,
        password=_password(t, password_file),
        connect_timeout_s=t.seconds("connect_timeout_s", d.connect_timeout_s, zero_ok=False),
        pool_size=t.integer("pool_size", d.pool_size, 0, 1000),
        learn_commands=t.boolean("learn_commands", d.learn_commands),
        mode=mode,
        shared_connections=t.integer("shared_connections", d.shared_connections, 1, 64),
        health_interval_s=_health_interval(t, d.health_interval_s),
        sentinels=sentinels,
        master_name=master_name,
    )


def _sentinels(t: _Table, sentinel: bool, unix: bool) -> tuple[tuple[tuple[str, int], ...],
                                                              str | None]:
    """`mode = "sentinel"`: `sentinels = ["host:port", ...]` and `master_name`."""
    example = '["10.0.0.5:26379", "10.0.0.6:26379", "10.0.0.7:26379"]'
    items = t.list_of("sentinels", str, example)
    name = t.string("master_name", example='"phi"', empty_ok=False)
    if not sentinel:
        for key, value in (("sentinels", items), ("master_name", name)):
            if value is not None:
                t.fault(key, 'is only used with mode = "sentinel"')
        return (), None
    if unix:
        t.fault("unix_socket", 'cannot be used with mode = "sentinel" (Sentinel names TCP '
                               "addresses)")
    if not items:
        t.p.add(f"{t.where} sentinels must list the sentinels to ask for the primary "
                f'(mode = "sentinel"), e.g. sentinels = {example}')
        items = []
    if name is None:
        t.p.add(f'{t.where} master_name must name the primary as the sentinels know it '
                '(their `sentinel monitor <name> ...`), e.g. master_name = "phi"')
    found = []
    for item in items:
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            t.fault("sentinels", f'"{item}" is not host:port; e.g. sentinels = {example}')
            continue
        found.append((host.strip("[]"), int(port)))
    return tuple(found), name


def _health_interval(t: _Table, default: float) -> float:
    """`[backend] health_interval_s`: at least 0.1 s (a PING to every node each half
    interval; below that the checks would be traffic of their own)."""
    value = t.seconds("health_interval_s", default, zero_ok=False)
    if value < 0.1:
        t.fault("health_interval_s", f"must be 0.1 or more; e.g. health_interval_s = "
                                     f"{default:g}")
        return default
    return value


def _unix_socket(t: _Table) -> Path | None:
    """`[backend] unix_socket`: instead of address/port (and then no TLS: the socket never
    leaves the host)."""
    raw = t.string("unix_socket", example='"/run/redis/redis.sock"', empty_ok=False)
    if raw is None:
        return None
    path = _resolve(t.p.base, raw)
    both = [key for key in ("address", "port") if key in t.data]
    if both:
        t.fault("unix_socket", f"give either unix_socket or address/port, not both "
                               f"(remove {' and '.join(both)})")
    try:
        if path.exists() and not stat.S_ISSOCK(path.stat().st_mode):
            t.fault("unix_socket", f"{path} is not a socket; give the path of Redis's "
                                   "unixsocket")
    except OSError as e:
        t.fault("unix_socket", _unexaminable(path, e))
    return path


def _backend_mode(t: _Table) -> str:
    mode = t.string("mode", BackendConfig.mode, example='"standalone"', empty_ok=False)
    if mode not in ("standalone", "sentinel", None):
        t.fault("mode", f'"{mode}" is not available in this version; use mode = '
                        '"standalone" or "sentinel"')
    return mode or BackendConfig.mode


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _audit_path(t: _Table) -> str:
    raw = t.string("path", "-", example='"audit/audit.jsonl"', empty_ok=False)
    if raw is None or raw == "-":
        return "-"
    if is_syslog(raw):
        try:
            parse_syslog_url(raw)
        except ValueError as e:
            if "@" in raw.split("://", 1)[1].split("/", 1)[0]:
                # It may hold a password: name the key, never the value.
                t.p.add(f"{t.where} path = \"syslog+tcp://<redacted>@...\": {e}")
            else:
                t.fault("path", str(e))
        return raw
    path = _resolve(t.p.base, raw)
    try:
        return _audit_file(t, raw, path)
    except OSError as e:  # e.g. a name longer than the file system allows
        t.fault("path", _unexaminable(path, e))
        return raw


def _audit_file(t: _Table, raw: str, path: Path) -> str:
    if path.is_dir():
        t.fault("path", f"{path} is a directory; give a file path such as audit/audit.jsonl")
        return raw
    if path.exists() and not os.access(path, os.W_OK):
        t.fault("path", f"{path} is not writable by this user; fix its owner or mode")
        return raw
    # the writer creates missing directories; here it is enough that it could
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        t.fault("path", f"{existing} is not a directory, so {path.parent} cannot be made; "
                        "fix the path")
    elif not os.access(existing, os.W_OK | os.X_OK):
        t.fault("path", f"{existing} is not writable by this user, so {path.name} cannot be "
                        "created there; fix its owner or mode, or choose another path")
    return str(path)


def _audit(p: _Problems, data: dict[str, Any]) -> AuditConfig:
    t = _section(p, data, "audit", required=False)
    d = AuditConfig
    if t is None:
        return d()
    key_file = t.file("key_file", secret=True)
    if key_file is not None and key_file.stat().st_size == 0:
        t.fault("key_file", f"{key_file} is empty; fill it with a random key, e.g. "
                            f"head -c 32 /dev/urandom > {shlex.quote(str(key_file))}")
        key_file = None
    elif key_file is not None:
        try:
            load_key(key_file)
        except AuditError as e:
            t.fault("key_file", str(e))
            key_file = None
    phi_keys = t.list_of("phi_keys", str, '["app:phi:*"]')
    path = _audit_path(t)
    facility = t.string("syslog_facility", d.syslog_facility, example='"authpriv"')
    if facility not in SYSLOG_FACILITIES:
        t.fault("syslog_facility", f"must be one of {', '.join(SYSLOG_FACILITIES)}; "
                                   'e.g. syslog_facility = "authpriv"')
        facility = d.syslog_facility
    head_file = t.string("head_file", example='"audit/audit.head"', empty_ok=False)
    if head_file is not None:
        if path != "-" and not is_syslog(path):
            t.fault("head_file", f"is only for path = \"-\" or a syslog collector; a file "
                                 f"trail keeps its head next to it ({path}.head); remove "
                                 "head_file")
            head_file = None
        else:
            head_file = str(_resolve(t.p.base, head_file))
    return AuditConfig(
        path=path,
        key_file=key_file,
        phi_keys=tuple(phi_keys) if phi_keys is not None else d.phi_keys,
        environment=t.string("environment", d.environment, example='"prod"', empty_ok=False),
        instance=t.string("instance", d.instance, example='"proxy-1"', empty_ok=False),
        fail_closed=t.boolean("fail_closed", d.fail_closed),
        max_bytes=t.integer("max_bytes", d.max_bytes, 0),
        keep=t.integer("keep", d.keep, 1),
        syslog_facility=facility,
        syslog_buffer_bytes=t.integer("syslog_buffer_bytes", d.syslog_buffer_bytes, 64 * 1024),
        head_file=head_file,
        fsync=_audit_fsync(t, path),
    )


AUDIT_FSYNC = ("no", "everysec", "always")


def _audit_fsync(t: _Table, path: str) -> str:
    """`[audit] fsync`: as Redis's appendfsync. "always" promises that a command's record is
    on disk before the command runs; stdout and a syslog collector have nothing to sync
    here (their durability is the reader's), so that promise is refused for them."""
    value = t.string("fsync", AuditConfig.fsync, example='"everysec"', empty_ok=False)
    if value is None:  # not a string: already reported
        return AuditConfig.fsync
    if value not in AUDIT_FSYNC:
        t.fault("fsync", 'must be "no", "everysec" or "always" (as Redis\'s appendfsync); '
                         'e.g. fsync = "everysec"')
        return AuditConfig.fsync
    if value == "always" and (path == "-" or is_syslog(path)):
        t.fault("fsync", f'"always" needs a file trail; path = "{path}" has nothing the proxy '
                         "can fsync (the collector's own durability applies): use a file "
                         'path, or fsync = "no"')
        return "no"
    return value


def _metrics(p: _Problems, data: dict[str, Any]) -> MetricsConfig:
    t = _section(p, data, "metrics", required=False)
    d = MetricsConfig
    if t is None:
        return d()
    return MetricsConfig(
        address=_bind_address(t, "address", d.address, allow_any=None),
        port=t.port("port", d.port, zero_disables=True),
    )


def _limits(p: _Problems, data: dict[str, Any]) -> LimitsConfig:
    t = _section(p, data, "limits", required=False)
    if t is None:
        return LimitsConfig()
    # above the defaults Redis itself would refuse, so only tightening makes sense
    values = {f.name: t.integer(f.name, f.default, 1, f.default) for f in fields(LimitsConfig)
              if f.name != "max_reply_buffer_bytes"}
    # the proxy's own buffer, not Redis's: it may be raised (to 4 GiB)
    values["max_reply_buffer_bytes"] = t.integer(
        "max_reply_buffer_bytes", LimitsConfig.max_reply_buffer_bytes, 64 * 1024, 4096 * MiB)
    return LimitsConfig(**values)


def _lockout(p: _Problems, data: dict[str, Any]) -> LockoutConfig:
    t = _section(p, data, "lockout", required=False)
    d = LockoutConfig
    if t is None:
        return d()
    return LockoutConfig(
        failures=t.integer("failures", d.failures, 1, 1_000_000),
        window_s=t.seconds("window_s", d.window_s, zero_ok=False),
        block_s=t.seconds("block_s", d.block_s, zero_ok=False),
        enabled=t.boolean("enabled", d.enabled),
        exempt_networks=_cidrs(t, "exempt_networks", t.list_of(
            "exempt_networks", str, '["10.0.8.0/24"]') or []),
    )


def _policy(p: _Problems, data: dict[str, Any]) -> PolicyConfig:
    t = _section(p, data, "policy", required=False)
    if t is None:
        return PolicyConfig()
    names = t.list_of("disabled_commands", str, '["DEBUG", "MODULE", "CONFIG|SET"]') or []
    return PolicyConfig(tuple(dict.fromkeys(n.strip().lower() for n in names)))


def _encryption(p: _Problems, data: dict[str, Any]) -> EncryptionConfig:
    t = _section(p, data, "encryption", required=False)
    if t is None:
        return EncryptionConfig()
    reads = t.string("plaintext_reads", EncryptionConfig.plaintext_reads, example='"refuse"')
    if reads not in PLAINTEXT_READS:
        t.fault("plaintext_reads", 'must be "refuse" or "pass"; e.g. plaintext_reads = "refuse"')
        reads = EncryptionConfig.plaintext_reads
    path = t.file("keyring", secret=True)  # exists, readable, 0600
    cipher = None
    if path is not None:
        try:
            cipher = load_keyring(path)
        except KeyringError as e:
            t.fault("keyring", str(e))
            path = None
    return EncryptionConfig(keyring=path, plaintext_reads=reads or "refuse", cipher=cipher)


def _ttl(t: _Table, key: str) -> int | None:
    if key not in t.data:
        return None
    value = t.integer(key, 0, 1, what="a number of seconds")
    return value or None


def _protection(p: _Problems, data: dict[str, Any], encryption: EncryptionConfig) -> Protection:
    """`[[protect]]`: first match wins (SPEC §3, §9)."""
    example = '[[protect]] with keys = ["app:phi:*"] and encrypt = true'
    raw = data.get("protect", [])
    if not isinstance(raw, list) or not all(isinstance(i, dict) for i in raw):
        p.add(f"[[protect]] must be an array of tables; write each one as {example}")
        return Protection()
    section = data.get("encryption")
    keyring_given = isinstance(section, dict) and "keyring" in section  # else reported there
    rules = []
    for number, body in enumerate(raw, 1):
        t = _Table(p, f"[[protect]] #{number}", body, ("keys", "encrypt", "max_ttl_s",
                                                        "default_ttl_s"))
        keys = t.list_of("keys", str, '["app:phi:*"]')
        if keys is None and "keys" not in body:
            p.add(f"[[protect]] #{number} keys is missing; add keys = [\"app:phi:*\"] (glob "
                  "patterns, Redis syntax)")
        elif keys is not None and (not keys or not all(keys)):
            t.fault("keys", 'must list at least one non-empty glob pattern; e.g. keys = '
                            '["app:phi:*"]')
            keys = None
        encrypt = t.boolean("encrypt", False)
        max_ttl, default_ttl = _ttl(t, "max_ttl_s"), _ttl(t, "default_ttl_s")
        if max_ttl is not None and default_ttl is not None and default_ttl > max_ttl:
            t.fault("default_ttl_s", f"is longer than max_ttl_s = {max_ttl}, so every key "
                                     "given it would break the rule's own limit; make it "
                                     f"at most {max_ttl}")
        if encrypt and encryption.keyring is None and not keyring_given:
            t.fault("encrypt", "needs a keyring, and [encryption] keyring is not set; create "
                               "one with: phiproxy keys new --out secrets/keyring.json, then "
                               'add [encryption] keyring = "secrets/keyring.json"')
        if keys:
            rules.append(make_rule(number - 1, tuple(keys), encrypt=encrypt,
                                   max_ttl_s=max_ttl, default_ttl_s=default_ttl))
    return Protection(tuple(rules))


def _roles(p: _Problems, data: dict[str, Any]) -> dict[str, RoleConfig]:
    example = '[roles.reader] with acl = "+@read ~app:*"'
    raw = data.get("roles", {})
    if not isinstance(raw, dict):
        p.add(f"[roles] must hold tables, not {_kind(raw)}; write {example}")
        return {}
    roles = {}
    for name, body in raw.items():
        where = f"[{_section_name('roles', name)}]"
        if not isinstance(body, dict):
            p.add(f"[roles] {name} = {_show(body)}: a role is a table; write {where} with "
                  f'acl = "..." on the next line')
            continue
        t = _Table(p, where, body, _keys(RoleConfig, exclude=("name",)))
        acl = t.string("acl", required=True, example='"+@read ~app:*"')
        dbs = t.list_of("dbs", int, "[0, 1]")
        if dbs is not None and any(db < 0 for db in dbs):
            t.fault("dbs", "database numbers start at 0; e.g. dbs = [0, 1]")
            dbs = None
        validity = body.get("max_cert_validity_h")
        if validity is not None and (isinstance(validity, bool)
                                     or not isinstance(validity, int | float) or validity <= 0):
            t.fault("max_cert_validity_h", "must be a positive number of hours, e.g. "
                    "max_cert_validity_h = 8")
            validity = None
        roles[name] = RoleConfig(name, acl, tuple(sorted(set(dbs))) if dbs is not None
                                 else None, None if validity is None else float(validity))
    if not raw:
        p.add(f"[roles] no role is defined; add at least one, e.g. {example}")
    return roles


def _fingerprint(t: _Table) -> str | None:
    raw = t.string("fingerprint_sha256", example='"ab:cd:..."', empty_ok=False)
    if raw is None:
        return None
    hexdigits = raw.replace(":", "").strip().lower()
    if len(hexdigits) != 64 or any(c not in "0123456789abcdef" for c in hexdigits):
        t.fault("fingerprint_sha256", "must be 64 hex digits (colons allowed), the SHA-256 of "
                                      "the DER certificate; get it with: openssl x509 -in "
                                      "CERT.pem -noout -fingerprint -sha256")
        return None
    return hexdigits


def _identities(p: _Problems, data: dict[str, Any],
                roles: dict[str, RoleConfig]) -> tuple[IdentityRule, ...]:
    example = '[[identities]] with subject_cn = "billing-service" and role = "writer"'
    raw = data.get("identities", [])
    if not isinstance(raw, list) or not all(isinstance(i, dict) for i in raw):
        p.add(f"[[identities]] must be an array of tables; write each one as {example}")
        return ()
    rules = []
    for number, body in enumerate(raw, 1):
        t = _Table(p, f"[[identities]] #{number}", body, _keys(IdentityRule))
        role = t.string("role", required=True, example='"reader"', empty_ok=False)
        if role is not None and role not in roles and roles:
            close = difflib.get_close_matches(role, list(roles), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            t.fault("role", f"no such role{hint}; define [{_section_name('roles', role)}] "
                            f"or use one of: {', '.join(roles)}")
        match = {k: t.string(k, example='"..."', empty_ok=False)
                 for k in _MATCH_FIELDS if k != "fingerprint_sha256"}
        match["fingerprint_sha256"] = _fingerprint(t)
        if not any(k in body for k in _MATCH_FIELDS):
            p.add(f"[[identities]] #{number} has no match field (it would match any "
                  f"certificate); add at least one of {', '.join(_MATCH_FIELDS)}")
        rules.append(IdentityRule(role=role, **match))
    if not raw:
        p.add(f"[[identities]] none is defined, so every client would be refused; add at "
              f"least one, e.g. {example}")
    return tuple(rules)


def _same_socket(a: tuple[str, int], b: tuple[str, int]) -> bool:
    def norm(address: str) -> str:
        return "127.0.0.1" if address == "localhost" else address

    any_address = {"", "0.0.0.0", "::"}
    return a[1] == b[1] and (norm(a[0]) == norm(b[0]) or a[0] in any_address
                             or b[0] in any_address)


def _cross_checks(p: _Problems, listener: ListenerConfig, backend: BackendConfig,
                  metrics: MetricsConfig) -> None:
    here = (listener.address, listener.port)
    if metrics.port and _same_socket(here, (metrics.address, metrics.port)):
        p.add(f"[metrics] port = {metrics.port}: the listener already uses this port; "
              "choose another one (or 0 to turn metrics off)")
    if backend.unix_socket is None and _same_socket(here, (backend.address, backend.port)):
        p.add(f"[backend] port = {backend.port}: that is the proxy's own listener, the "
              "proxy would connect to itself; give the backend Redis address and port")


def load_config(path: str | Path) -> Config:
    """Read, validate and return the configuration; raise ConfigError listing every problem."""
    path = Path(path)
    data = _read_toml(path, str(path))
    p = _Problems(str(path), path.absolute().parent)
    _top_level(p, data)
    listener = _listener(p, data)
    backend = _backend(p, data)
    audit = _audit(p, data)
    metrics = _metrics(p, data)
    limits = _limits(p, data)
    lockout = _lockout(p, data)
    policy = _policy(p, data)
    roles = _roles(p, data)
    identities = _identities(p, data, roles)
    encryption = _encryption(p, data)
    protection = _protection(p, data, encryption)
    if listener is not None and backend is not None and not p.items:
        _cross_checks(p, listener, backend, metrics)
    if p.items or listener is None or backend is None:
        raise ConfigError(p.items)
    return Config(path.absolute(), listener, backend, audit, metrics, limits, roles,
                  identities, lockout=lockout, policy=policy, encryption=encryption,
                  protection=protection)
