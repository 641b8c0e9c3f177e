"""`phiproxy scan-backend -c FILE [--json]`: the backend's hardening against SPEC §8.

The scan connects exactly as the proxy does (TLS with `[backend] ca`, `server_name`, the
proxy's client certificate, AUTH with its credentials), reads what Redis reports
(`CONFIG GET`, `ACL LIST`, `ACL DRYRUN`, `COMMAND INFO`, `INFO server`) and checks each
control; then it checks the proxy's own configuration (listener, roles, audit trail).

Every finding is PASS, FAIL or UNKNOWN, with what was observed and the fix (a redis.conf
line, a command or a TOML key). UNKNOWN means the control could not be checked (e.g. CONFIG
renamed or denied to the proxy's user) and says why: nothing is inferred from defaults.

Exit 0: no control failed (unknowns are listed, not failures); 1: a control failed;
2: bad usage or configuration, or the backend could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import ssl
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hiredis

from proxy.config import Config
from proxy.resp.request import encode_command

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PASS, FAIL, UNKNOWN = "pass", "fail", "unknown"

SECTIONS = {
    "a": "Access control",
    "b": "Audit controls",
    "c": "Integrity",
    "d": "Person or entity authentication",
    "e": "Transmission security",
}

# Everything the backend controls need, in one CONFIG GET (Redis 7 takes several patterns).
CONFIG_PARAMS = (
    "port", "tls-port", "tls-protocols", "tls-ciphers", "tls-ciphersuites",
    "tls-prefer-server-ciphers", "tls-auth-clients", "tls-replication", "tls-cluster",
    "cluster-enabled", "protected-mode", "appendonly", "appendfsync", "save",
    "stop-writes-on-bgsave-error", "loglevel", "dir", "maxmemory-policy",
    "enable-debug-command", "enable-module-command", "enable-protected-configs",
)

# Commands that wipe, stop, reconfigure or expose the whole keyspace. Asked of Redis with
# ACL DRYRUN for every enabled user, and of the proxy's own policy for every role. DEBUG
# and MODULE are left to enable-debug-command/enable-module-command on the backend (those
# switches override the ACL there, so a DRYRUN "OK" would overstate).
DANGEROUS_PROBES: tuple[tuple[str, ...], ...] = (
    ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "SET", "dir", "/tmp"), ("SHUTDOWN",),
    ("KEYS", "*"), ("MONITOR",), ("SWAPDB", "0", "1"), ("REPLICAOF", "NO", "ONE"),
    ("MIGRATE", "localhost", "6379", "key", "0", "1000"), ("ACL", "SETUSER", "nobody"),
)
ROLE_PROBES = (*DANGEROUS_PROBES, ("DEBUG", "SLEEP", "0"), ("MODULE", "LOAD", "/x.so"))

TLS13_AEAD_SUITES = ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
                     "TLS_AES_128_GCM_SHA256", "TLS_AES_128_CCM_SHA256")
TLS13_DEFAULT = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
TLS12_FIX = ("ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
             "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
             "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256")


# --------------------------------------------------------------------------- findings


@dataclass(frozen=True)
class Finding:
    id: str
    title: str
    section: str  # "a".."e": HIPAA Security Rule 45 CFR 164.312(a)..(e)
    verdict: str  # pass | fail | unknown
    observed: str
    fix: str
    note: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "title": self.title, "hipaa": f"164.312({self.section})",
                "section": self.section, "section_title": SECTIONS[self.section],
                "verdict": self.verdict, "observed": self.observed, "fix": self.fix,
                "note": self.note}


@dataclass(frozen=True)
class Result:
    """What a check returns; `fix` replaces the control's fix when it depends on the data."""

    verdict: str
    observed: str
    note: str = ""
    fix: str | None = None


class Unknown(Exception):
    """The control cannot be checked; the message says what could not be read and why,
    and `fix` (when given) how to make it checkable."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.fix = fix


@dataclass(frozen=True)
class Control:
    id: str
    section: str
    title: str
    fix: str
    check: Callable[[Scan], Result]

    def run(self, scan: Scan) -> Finding:
        try:
            result = self.check(scan)
        except Unknown as exc:
            result = Result(UNKNOWN, str(exc), fix=exc.fix)
        return Finding(self.id, self.title, self.section, result.verdict, result.observed,
                       result.fix or self.fix, result.note)


# --------------------------------------------------------------------------- evidence


@dataclass
class AclUser:
    name: str
    enabled: bool
    nopass: bool
    line: str  # the ACL LIST line, password hashes redacted


@dataclass
class Evidence:
    """What the backend reported; each `*_error` says why its part could not be read."""

    address: str
    port: int
    user: str  # the proxy's backend user ("default" when no username is configured)
    tls_version: str | None = None
    tls_cipher: str | None = None
    config: dict[str, str] | None = None
    config_error: str | None = None
    info: dict[str, str] | None = None
    info_error: str | None = None
    users: list[AclUser] | None = None
    acl_error: str | None = None
    missing_commands: frozenset[str] = frozenset()  # renamed or removed (COMMAND INFO nil)
    # user -> command -> True (may run) / False (denied) / None (DRYRUN gave no answer)
    dryrun: dict[str, dict[str, bool | None]] = field(default_factory=dict)
    dryrun_error: str | None = None


class _Conn:
    """The proxy's own request/reply on a BackendConnection; errors become text."""

    def __init__(self, conn: Any, timeout: float):
        self.conn = conn
        self.timeout = timeout

    async def ask(self, *argv: str) -> tuple[Any, str | None]:
        try:
            reply = await self.conn.request(encode_command([a.encode() for a in argv]),
                                            self.timeout)
        except TimeoutError:
            return None, f"no reply within {self.timeout:g}s"
        if isinstance(reply, hiredis.ReplyError):
            return None, str(reply)
        return reply, None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _refused(what: str, error: str) -> str:
    return f"{what} refused: {error}"


async def _read_config(c: _Conn, ev: Evidence) -> None:
    reply, error = await c.ask("CONFIG", "GET", *CONFIG_PARAMS)
    if error is not None and "wrong number of arguments" in error:
        reply, error = await c.ask("CONFIG", "GET", "*")  # Redis < 7: one pattern per call
    if error is not None:
        ev.config_error = _refused("CONFIG GET", error)
        return
    items = [_text(v) for v in reply]
    wanted = set(CONFIG_PARAMS)
    ev.config = {k: v for k, v in zip(items[::2], items[1::2], strict=True) if k in wanted}


async def _read_info(c: _Conn, ev: Evidence) -> None:
    reply, error = await c.ask("INFO", "server")
    if error is not None:
        ev.info_error = _refused("INFO", error)
        return
    ev.info = dict(line.split(":", 1) for line in _text(reply).splitlines()
                   if ":" in line and not line.startswith("#"))


def _acl_user(line: str) -> AclUser:
    words = line.split()
    redacted = " ".join("#<sha256>" if w.startswith("#") and len(w) == 65 else w
                        for w in words)
    return AclUser(words[1], "on" in words[2:], "nopass" in words[2:], redacted)


async def _read_acl(c: _Conn, ev: Evidence) -> None:
    reply, error = await c.ask("ACL", "LIST")
    if error is not None:
        ev.acl_error = _refused("ACL LIST", error)
        return
    ev.users = [_acl_user(_text(line)) for line in reply]


async def _read_commands(c: _Conn, ev: Evidence) -> None:
    names = sorted({probe[0].lower() for probe in ROLE_PROBES})
    reply, error = await c.ask("COMMAND", "INFO", *names)
    if error is None:
        ev.missing_commands = frozenset(n for n, info in zip(names, reply, strict=True)
                                        if info is None)


async def _dryrun_user(c: _Conn, ev: Evidence, user: str) -> None:
    verdicts: dict[str, bool | None] = {}
    for probe in DANGEROUS_PROBES:
        name = _probe_name(probe)
        if probe[0].lower() in ev.missing_commands:
            continue  # renamed or removed: nobody can run it under this name
        reply, error = await c.ask("ACL", "DRYRUN", user, *probe)
        if error is not None and "not found" in error:
            continue  # renamed although COMMAND INFO could not tell
        if error is not None and error.startswith("NOPERM"):
            ev.dryrun_error = _refused("ACL DRYRUN", error)
            return
        # "OK" when allowed; a plain string (not an error) naming the refusal otherwise
        verdicts[name] = (None if error is not None else _text(reply) == "OK")
    ev.dryrun[user] = verdicts


def _probe_name(probe: tuple[str, ...]) -> str:
    parents = ("CONFIG", "ACL", "MODULE")
    return (f"{probe[0]}|{probe[1]}" if probe[0] in parents else probe[0]).lower()


async def gather(conn: Any, ev: Evidence, timeout: float) -> Evidence:
    """Ask the backend everything the controls need, on an authenticated connection."""
    from proxy.backend import BackendUnavailable

    c = _Conn(conn, timeout)
    _, error = await c.ask("PING")
    if error is not None and error.startswith("NOAUTH"):
        # connected, but every answer would be NOAUTH: that is a configuration error
        raise BackendUnavailable(f"{error}; set [backend] username and password_file")
    sslobj = conn.transport.get_extra_info("ssl_object") if conn.transport else None
    if sslobj is not None:
        ev.tls_version = sslobj.version()
        ev.tls_cipher = (sslobj.cipher() or (None,))[0]
    await _read_config(c, ev)
    await _read_info(c, ev)
    await _read_acl(c, ev)
    await _read_commands(c, ev)
    for user in ev.users or ():
        if user.enabled and ev.dryrun_error is None:
            await _dryrun_user(c, ev, user.name)
    return ev


# --------------------------------------------------------------------------- the scan


@dataclass
class Scan:
    config: Config
    ev: Evidence
    roles: dict[str, Any]
    decide: Callable[[Any, list[bytes]], Any]

    def conf(self, *names: str) -> dict[str, str]:
        """CONFIG GET values, or Unknown saying why they cannot be read."""
        if self.ev.config is None:
            raise Unknown(f"{self.ev.config_error}; cannot read {', '.join(names)} (grant the "
                          f"proxy's backend user +config|get to check)")
        missing = [n for n in names if n not in self.ev.config]
        if missing:
            raise Unknown(f"this Redis does not report {', '.join(missing)} (CONFIG GET)")
        return {n: self.ev.config[n] for n in names}

    def users(self) -> list[AclUser]:
        if self.ev.users is None:
            raise Unknown(f"{self.ev.acl_error}; grant the proxy's backend user +acl|list "
                          "to check")
        return self.ev.users


def _yes(s: Scan, name: str, why: str = "") -> Result:
    value = s.conf(name)[name]
    return Result(PASS if value == "yes" else FAIL, f"{name} {value}", why)


# ---- (e) transmission security


def _tls_only(s: Scan) -> Result:
    c = s.conf("port", "tls-port")
    if s.config.backend.unix_socket is not None and c["port"] == "0" and c["tls-port"] == "0":
        return Result(PASS, "port 0, tls-port 0: unix socket only",
                      "no network listener at all: nothing leaves the host")
    ok = c["port"] == "0" and c["tls-port"] != "0"
    return Result(PASS if ok else FAIL, f"port {c['port']}, tls-port {c['tls-port']}",
                  "" if ok else "a plaintext port carries credentials and PHI unencrypted")


def _tls_protocols(s: Scan) -> Result:
    value = s.conf("tls-protocols")["tls-protocols"]
    if not value.strip():
        return Result(PASS, 'tls-protocols "" (Redis default: TLSv1.2 TLSv1.3)',
                      "empty means Redis's own default (src/tls.c REDIS_TLS_PROTO_DEFAULT: "
                      "TLSv1.2 and TLSv1.3), not OpenSSL's; write it out anyway so the "
                      "intent is on record")
    weak = [p for p in value.split() if p.lower() not in ("tlsv1.2", "tlsv1.3")]
    return Result(FAIL if weak else PASS, f'tls-protocols "{value}"',
                  f"{' '.join(weak)}: deprecated (RFC 8996)" if weak else "")


def _tls12_offenders(spec: str) -> list[str]:
    """TLS 1.2 suites in an OpenSSL cipher string without ECDHE key exchange or AEAD."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers(spec)  # ssl.SSLError when nothing matches
    return [c["name"] for c in ctx.get_ciphers()
            if c["protocol"] != "TLSv1.3" and not (c["aead"] and c["kea"] == "kx-ecdhe")]


def _tls_ciphers(s: Scan) -> Result:
    value = s.conf("tls-ciphers")["tls-ciphers"]
    # empty: Redis leaves OpenSSL's built-in list, which is what "DEFAULT" expands to
    spec = value or "DEFAULT"
    try:
        weak = _tls12_offenders(spec)
    except ssl.SSLError as exc:
        raise Unknown(f'tls-ciphers "{value}": this host\'s OpenSSL cannot expand it '
                      f"({getattr(exc, 'reason', None) or exc})") from None
    shown = f'tls-ciphers "{value}"' + ("" if value else " (OpenSSL's DEFAULT list)")
    note = f"expanded with {ssl.OPENSSL_VERSION} on this host"
    if weak:
        more = f" and {len(weak) - 5} more" if len(weak) > 5 else ""
        return Result(FAIL, shown, f"{note}; without ECDHE or AEAD: "
                                   f"{', '.join(weak[:5])}{more}")
    return Result(PASS, shown, note)


def _tls_ciphersuites(s: Scan) -> Result:
    value = s.conf("tls-ciphersuites")["tls-ciphersuites"]
    if not value:
        return Result(PASS, f'tls-ciphersuites "" (OpenSSL default: {TLS13_DEFAULT})',
                      "the TLS 1.3 default suites are all AEAD")
    bad = [name for name in value.split(":") if name not in TLS13_AEAD_SUITES]
    return Result(FAIL if bad else PASS, f'tls-ciphersuites "{value}"',
                  f"not allowed: {', '.join(bad)} (CCM_8 has a truncated 64-bit tag)"
                  if bad else "")


def _tls_cluster(s: Scan) -> Result:
    c = s.conf("tls-cluster", "cluster-enabled")
    observed = f"tls-cluster {c['tls-cluster']}, cluster-enabled {c['cluster-enabled']}"
    if c["cluster-enabled"] != "yes":
        return Result(PASS, observed, "not relevant while cluster-enabled is no (there is no "
                      "cluster bus); set tls-cluster yes anyway for the day it is enabled")
    return Result(PASS if c["tls-cluster"] == "yes" else FAIL, observed)


def _backend_link(s: Scan) -> Result:
    ev, cfg = s.ev, s.config.backend
    if cfg.unix_socket is not None:
        return Result(PASS, f"unix socket {cfg.unix_socket}",
                      "the proxy and Redis share the host: no network hop to protect")
    ok = ev.tls_version in ("TLSv1.2", "TLSv1.3")
    return Result(PASS if ok else FAIL,
                  f"{ev.tls_version} {ev.tls_cipher}; certificate verified against "
                  f"{cfg.ca} for {cfg.server_name!r}; client certificate {cfg.cert}",
                  "this scan's own connection, made exactly as the proxy makes them")


def _listener_tls(s: Scan) -> Result:
    from proxy.tls import TLS12_CIPHERS

    min_tls = s.config.listener.min_tls
    return Result(PASS, f'min_tls = "{min_tls}"; TLS 1.2 suites {TLS12_CIPHERS}; server '
                        "cipher order; no compression or renegotiation",
                  "the configuration accepts nothing below 1.2")


# ---- (d) person or entity authentication


def _mutual_tls(s: Scan) -> Result:
    value = s.conf("tls-auth-clients")["tls-auth-clients"]
    note = {"optional": "a client without a certificate is accepted",
            "no": "client certificates are not asked for"}.get(value, "")
    return Result(PASS if value == "yes" else FAIL, f"tls-auth-clients {value}", note)


def _default_user_off(s: Scan) -> Result:
    users = {u.name: u for u in s.users()}
    default = users.get("default")
    if default is None:
        raise Unknown("ACL LIST has no 'default' user")
    if s.ev.user == "default":
        return Result(FAIL, default.line, "the proxy itself authenticates as 'default'",
                      fix="give the proxy its own user (ACL file: user phiproxy on #<sha256> "
                          "...; [backend] username = \"phiproxy\") and then: ACL SETUSER "
                          "default off")
    return Result(FAIL if default.enabled else PASS, default.line)


def _no_nopass(s: Scan) -> Result:
    users = s.users()
    open_users = [u.name for u in users if u.enabled and u.nopass]
    dormant = [u.name for u in users if not u.enabled and u.nopass]
    note = (f"disabled, but passwordless if enabled: {', '.join(dormant)}" if dormant else "")
    if open_users:
        return Result(FAIL, f"enabled users with nopass: {', '.join(open_users)}", note,
                      fix="; ".join(f"ACL SETUSER {n} resetpass #<sha256 of a new password> "
                                    "(or off)" for n in open_users) + "; then ACL SAVE")
    return Result(PASS, f"no enabled user has nopass ({len(users)} users)", note)


def _backend_credentials(s: Scan) -> Result:
    cfg = s.config.backend
    if cfg.password is None:
        return Result(FAIL, "no password_file: the proxy connects as 'default' without AUTH")
    if cfg.username is None:
        return Result(FAIL, f"password from {cfg.password_file}, no username: AUTH as "
                            "'default'")
    return Result(PASS, f"user {cfg.username!r}, password from {cfg.password_file}")


def _client_certificates(s: Scan) -> Result:
    return Result(PASS, f"required on every connection, verified against "
                        f"{s.config.listener.client_ca}", "there is no off switch (SPEC §3)")


def _crl(s: Scan) -> Result:
    crl = s.config.listener.crl
    if crl is None:
        return Result(FAIL, "no crl: a stolen client certificate stays valid until it "
                            "expires")
    return Result(PASS, f"crl = {crl}", "reloaded on SIGHUP: publish a new CRL, then reload")


# ---- (a) access control


def _dangerous_users(s: Scan) -> Result:
    users = s.users()
    mine = s.ev.user
    others = [u for u in users if u.enabled and u.name != mine]
    renamed = sorted(s.ev.missing_commands)
    note = f"renamed or removed: {', '.join(renamed)}" if renamed else ""
    own = s.ev.dryrun.get(mine, {})
    own_may = [c for c, ok in own.items() if ok]
    if own_may:
        note += ("; " if note else "") + (
            f"the proxy's own user {mine!r} may run {', '.join(own_may)} (phiproxy refuses "
            "them to roles without an explicit grant; deny in the ACL what no role needs)")
    if not others:
        return Result(PASS, f"no enabled user besides the proxy's own {mine!r}", note)
    if s.ev.dryrun_error is not None:
        raise Unknown(f"{s.ev.dryrun_error}; enabled users besides the proxy's: "
                      f"{', '.join(u.name for u in others)}")
    found, unanswered = [], []
    for user in others:
        verdicts = s.ev.dryrun.get(user.name, {})
        may = [c for c, ok in verdicts.items() if ok]
        if may:
            found.append((user.name, may))
        unanswered += [f"{user.name}:{c}" for c, ok in verdicts.items() if ok is None]
    if found:
        return Result(FAIL, "; ".join(f"{n} may run {', '.join(c)}" for n, c in found), note,
                      fix="; ".join(f"ACL SETUSER {n} -@dangerous -@admin (or off)"
                                    for n, _ in found) + "; then ACL SAVE (and the same "
                      "rules in the ACL file)")
    if unanswered:
        raise Unknown(f"ACL DRYRUN gave no answer for {', '.join(unanswered)}")
    names = ", ".join(u.name for u in others)
    return Result(PASS, f"denied to every other enabled user ({names})", note)


def _debug_module(s: Scan) -> Result:
    c = s.conf("enable-debug-command", "enable-module-command", "enable-protected-configs")
    observed = ", ".join(f"{k} {v}" for k, v in c.items())
    on = [k for k, v in c.items() if v != "no"]
    return Result(FAIL if on else PASS, observed,
                  "'local' still allows them from this host, and the proxy is local" if any(
                      c[k] == "local" for k in on) else "")


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _local_redis_pid(s: Scan, directory: str) -> int:
    """The backend's process id when it provably runs on this host; Unknown otherwise."""
    there = (f"on the Redis host: stat -c '%a %U' {directory}; it should be 0700 (0750 at "
             "most) and owned by the user Redis runs as")
    if s.config.backend.unix_socket is None and not _is_loopback(s.config.backend.address):
        raise Unknown(f"dir {directory}: the backend ({s.config.backend.address}) is not on "
                      "this host", fix=there)
    if s.ev.info is None:
        raise Unknown(f"dir {directory}: {s.ev.info_error}, so the Redis process cannot be "
                      "found on this host", fix=there)
    pid = s.ev.info.get("process_id", "")
    try:
        comm = Path(f"/proc/{int(pid)}/comm").read_text().strip()
    except (OSError, ValueError):
        comm = ""
    if not comm.startswith("redis"):
        raise Unknown(f"dir {directory}: Redis process {pid or '?'} is not visible here (a "
                      "container, or another host behind a loopback port)", fix=there)
    with contextlib.suppress(OSError):  # cwd is readable for our own processes or as root
        if not os.path.samefile(f"/proc/{pid}/cwd", directory):
            raise Unknown(f"dir {directory}: process {pid} here is another Redis", fix=there)
    return int(pid)


def _dir_permissions(s: Scan) -> Result:
    directory = s.conf("dir")["dir"]
    pid = _local_redis_pid(s, directory)
    try:
        st = os.stat(directory)
        redis_uid = os.stat(f"/proc/{pid}").st_uid
    except OSError as exc:
        raise Unknown(f"dir {directory}: cannot be examined here ({exc.strerror})") from None
    mode = stat.S_IMODE(st.st_mode)
    observed = (f"dir {directory}: mode {mode:04o}, owner uid {st.st_uid}; redis-server "
                f"(pid {pid}) runs as uid {redis_uid}")
    problems = []
    if mode & 0o027:
        problems.append("group write or any access for others")
    if st.st_uid != redis_uid:
        problems.append("not owned by the user Redis runs as")
    note = "; ".join(problems) or ("group members can read the data files; 0700 is "
                                   "stricter" if mode & 0o040 else "")
    return Result(FAIL if problems else PASS, observed, note,
                  fix=f"chown <redis user> {directory} && chmod 0700 {directory} (0750 at "
                      "most)")


def _allow_networks(s: Scan) -> Result:
    nets = s.config.listener.allow_networks
    anyone = [str(n) for n in nets if n.prefixlen == 0]
    observed = f"allow_networks = [{', '.join(str(n) for n in nets)}]"
    return Result(FAIL if anyone else PASS, observed,
                  f"{', '.join(anyone)} admits every source address" if anyone else "")


def _role_grants(s: Scan, role: Any) -> list[str]:
    granted = []
    for probe in ROLE_PROBES:
        decision = s.decide(role, [w.encode() for w in probe])
        if decision.allowed:
            granted.append(_probe_name(probe))
    return granted


def _roles_dangerous(s: Scan) -> Result:
    failing, passing = [], []
    for name, role in s.roles.items():
        granted = _role_grants(s, role)
        if not granted:
            continue
        rules = [r for r in s.config.identities if r.role == name]
        what = f"role {name} may run {', '.join(granted)}"
        if not rules:
            passing.append(f"{what} but no identity maps to it")
        elif all(r.fingerprint_sha256 for r in rules):
            passing.append(f"{what}, only for {len(rules)} certificate(s) pinned by "
                           "fingerprint_sha256")
        else:
            failing.append(f"{what} and is mapped by {len(rules)} identity rule(s) not "
                           "pinned to a certificate")
    if failing:
        return Result(FAIL, "; ".join(failing), "; ".join(passing))
    return Result(PASS, "; ".join(passing) or f"no role may run them ({len(s.roles)} roles)")


# ---- (b) audit controls


def _loglevel(s: Scan) -> Result:
    value = s.conf("loglevel")["loglevel"]
    return Result(PASS if value in ("notice", "warning") else FAIL, f"loglevel {value}",
                  "debug and verbose log client traffic details; nothing logs nothing"
                  if value not in ("notice", "warning") else "")


def _audit_chain(s: Scan) -> Result:
    from proxy.audit.chain import AuditError, load_key
    from proxy.audit.target import is_syslog
    from proxy.audit.verify import Broken, UsageError, verify

    audit = s.config.audit
    if audit.path == "-" or is_syslog(audit.path):
        raise Unknown(f"path = {audit.path}: the trail is kept by its collector",
                      fix="verify the collector's copy: phiproxy audit verify FILE "
                          "--key-file KEY --no-head")
    if audit.key_file is None:
        raise Unknown("[audit] key_file is not set, so the chain cannot be checked",
                      fix='[audit] key_file = "secrets/audit.key" (chmod 600)')
    if not os.path.exists(audit.path):
        raise Unknown(f"{audit.path} does not exist yet (the proxy has not written here)",
                      fix="run scan-backend where the proxy writes its trail, after it started")
    try:
        key = load_key(audit.key_file)
    except AuditError as exc:
        raise Unknown(str(exc), fix="make [audit] key_file readable by this user") from None
    for attempt in range(2):
        try:
            report = verify([audit.path], key)
        except UsageError as exc:
            raise Unknown(str(exc)) from None
        except Broken as exc:
            if attempt == 0 and "torn last line" in exc.problem:
                time.sleep(0.2)  # a running proxy may be mid-write: look once more
                continue
            return Result(FAIL, f"{exc.where}: {exc.problem}")
        return Result(PASS, f"{audit.path}: {report.records} records in {report.files} "
                            f"file(s), chain and head intact", "; ".join(report.notes))
    raise AssertionError("unreachable")


def _fail_closed(s: Scan) -> Result:
    on = s.config.audit.fail_closed
    return Result(PASS if on else FAIL, f"fail_closed = {'true' if on else 'false'}",
                  "" if on else "a command whose record cannot be written still reaches Redis")


# ---- (c) integrity


def _aof(s: Scan) -> Result:
    c = s.conf("appendonly", "appendfsync")
    observed = f"appendonly {c['appendonly']}, appendfsync {c['appendfsync']}"
    ok = c["appendonly"] == "yes" and c["appendfsync"] in ("everysec", "always")
    note = "always: stricter than everysec, and slower" if c["appendfsync"] == "always" else ""
    return Result(PASS if ok else FAIL, observed, note)


def _rdb(s: Scan) -> Result:
    value = s.conf("save")["save"]
    return Result(PASS if value.strip() else FAIL, f'save "{value}"',
                  "" if value.strip() else "no RDB snapshots: no point-in-time copy to restore")


def _maxmemory_policy(s: Scan) -> Result:
    value = s.conf("maxmemory-policy")["maxmemory-policy"]
    if value == "noeviction":
        return Result(PASS, f"maxmemory-policy {value}")
    if value.startswith("volatile-"):
        return Result(PASS, f"maxmemory-policy {value}", "only keys with a TTL can be evicted; "
                      "a PHI key with a TTL can still vanish before it expires")
    return Result(FAIL, f"maxmemory-policy {value}",
                  "any key, PHI included, can be evicted silently at maxmemory")


# --------------------------------------------------------------------------- the controls


def _c(id_: str, section: str, title: str, fix: str,
       check: Callable[[Scan], Result]) -> Control:
    return Control(id_, section, title, fix, check)


CONTROLS: tuple[Control, ...] = (
    # (e) transmission security
    _c("backend-tls-only", "e", "Backend listens on TLS only",
       "redis.conf: port 0 and tls-port 6390 (now: CONFIG SET port 0)", _tls_only),
    _c("backend-tls-protocols", "e", "Backend TLS protocols are 1.2 and 1.3 only",
       'redis.conf: tls-protocols "TLSv1.2 TLSv1.3"', _tls_protocols),
    _c("backend-tls-ciphers", "e", "Backend TLS 1.2 ciphers are ECDHE + AEAD only",
       f"redis.conf: tls-ciphers {TLS12_FIX}", _tls_ciphers),
    _c("backend-tls-ciphersuites", "e", "Backend TLS 1.3 suites are AEAD with full tags",
       f"redis.conf: tls-ciphersuites {TLS13_DEFAULT}", _tls_ciphersuites),
    _c("backend-tls-server-order", "e", "Backend chooses the cipher (server order)",
       "redis.conf: tls-prefer-server-ciphers yes",
       lambda s: _yes(s, "tls-prefer-server-ciphers")),
    _c("backend-tls-replication", "e", "Replication traffic uses TLS",
       "redis.conf: tls-replication yes", lambda s: _yes(s, "tls-replication")),
    _c("backend-tls-cluster", "e", "Cluster bus uses TLS",
       "redis.conf: tls-cluster yes", _tls_cluster),
    _c("proxy-backend-link", "e", "Proxy-to-backend connection is verified TLS 1.2+",
       "[backend] ca, server_name, cert, key (TLS is always on)", _backend_link),
    _c("proxy-listener-tls", "e", "Proxy listener: TLS 1.2 floor, ECDHE + AEAD",
       '[listener] min_tls = "1.2" (or "1.3")', _listener_tls),
    # (d) person or entity authentication
    _c("backend-mutual-tls", "d", "Backend requires client certificates (mutual TLS)",
       "redis.conf: tls-auth-clients yes (now: CONFIG SET tls-auth-clients yes)", _mutual_tls),
    _c("backend-default-user-off", "d", "Backend 'default' user is disabled",
       "ACL file: user default off (now: ACL SETUSER default off; ACL SAVE)",
       _default_user_off),
    _c("backend-no-nopass", "d", "No backend user without a password",
       "ACL SETUSER <user> resetpass #<sha256>", _no_nopass),
    _c("proxy-backend-credentials", "d", "Proxy authenticates to the backend as its own user",
       '[backend] username = "phiproxy" and password_file = "secrets/backend.pass" (chmod 600)',
       _backend_credentials),
    _c("proxy-client-certificates", "d", "Proxy requires client certificates (mutual TLS)",
       "[listener] client_ca", _client_certificates),
    _c("proxy-crl", "d", "Proxy checks client certificates against a CRL",
       '[listener] crl = "certs/clients.crl" (then SIGHUP on each CRL update)', _crl),
    # (a) access control
    _c("backend-protected-mode", "a", "Backend protected mode is on",
       "redis.conf: protected-mode yes (now: CONFIG SET protected-mode yes)",
       lambda s: _yes(s, "protected-mode")),
    _c("backend-dangerous-commands", "a",
       "No backend user besides the proxy's can run dangerous commands",
       "ACL SETUSER <user> -@dangerous -@admin", _dangerous_users),
    _c("backend-debug-module-commands", "a", "DEBUG, MODULE and protected configs are off",
       "redis.conf: enable-debug-command no, enable-module-command no, "
       "enable-protected-configs no (restart)", _debug_module),
    _c("backend-dir-permissions", "a", "Persistence directory is private to Redis",
       "chown <redis user> DIR && chmod 0700 DIR", _dir_permissions),
    _c("proxy-allow-networks", "a", "Proxy admits only listed client networks",
       '[listener] allow_networks = ["10.0.0.0/8"] (the client networks only)',
       _allow_networks),
    _c("proxy-roles-dangerous", "a",
       "Roles that may run dangerous commands are pinned to certificates",
       "remove the grant (e.g. -@dangerous), or map that role only by fingerprint_sha256",
       _roles_dangerous),
    # (b) audit controls
    _c("backend-loglevel", "b", "Backend log level is notice or warning",
       "redis.conf: loglevel notice (now: CONFIG SET loglevel notice)", _loglevel),
    _c("proxy-audit-chain", "b", "Proxy audit trail verifies (HMAC chain and head)",
       "keep the trail as evidence, find the first broken record with phiproxy audit verify, "
       "then move the trail aside so a new chain starts", _audit_chain),
    _c("proxy-audit-fail-closed", "b", "Proxy refuses commands it cannot audit",
       "[audit] fail_closed = true", _fail_closed),
    # (c) integrity
    _c("backend-aof", "c", "Append-only file with fsync every second",
       "redis.conf: appendonly yes and appendfsync everysec", _aof),
    _c("backend-rdb", "c", "RDB snapshots are configured",
       "redis.conf: save 3600 1 300 100 60 10000", _rdb),
    _c("backend-stop-writes-on-bgsave-error", "c", "Writes stop when a snapshot fails",
       "redis.conf: stop-writes-on-bgsave-error yes",
       lambda s: _yes(s, "stop-writes-on-bgsave-error")),
    _c("backend-maxmemory-policy", "c", "Memory pressure never evicts PHI silently",
       "redis.conf: maxmemory-policy noeviction", _maxmemory_policy),
)


def run_controls(scan: Scan) -> list[Finding]:
    return [control.run(scan) for control in CONTROLS]


# --------------------------------------------------------------------------- output


def summary(findings: list[Finding]) -> dict[str, int]:
    return {v: sum(f.verdict == v for f in findings) for v in (PASS, FAIL, UNKNOWN)}


def _header(ev: Evidence, config: Config) -> list[str]:
    version = (ev.info or {}).get("redis_version", "version unknown")
    return [f"phiproxy scan-backend: {ev.address}:{ev.port} (Redis {version}) as user "
            f"{ev.user!r} over {ev.tls_version} {ev.tls_cipher}",
            f"configuration: {config.path}"]


def render_text(findings: list[Finding], ev: Evidence, config: Config) -> str:
    lines = _header(ev, config)
    for section, title in SECTIONS.items():
        lines += ["", f"HIPAA 164.312({section}) {title}"]
        for f in (f for f in findings if f.section == section):
            lines.append(f"  {f.verdict.upper():<8} {f.id}: {f.title}")
            lines.append(f"           observed: {f.observed}")
            if f.note:
                lines.append(f"           note:     {f.note}")
            if f.verdict != PASS:
                lines.append(f"           fix:      {f.fix}")
    counts = summary(findings)
    lines += ["", f"summary: {counts[PASS]} pass, {counts[FAIL]} fail, {counts[UNKNOWN]} "
                  "unknown" + (" (unknown: not checked, see each finding)"
                               if counts[UNKNOWN] else "")]
    return "\n".join(lines)


def render_json(findings: list[Finding], ev: Evidence, config: Config) -> str:
    return json.dumps({
        "backend": {"address": ev.address, "port": ev.port, "user": ev.user,
                    "redis_version": (ev.info or {}).get("redis_version"),
                    "tls_version": ev.tls_version, "tls_cipher": ev.tls_cipher},
        "config": str(config.path),
        "findings": [f.as_dict() for f in findings],
        "summary": summary(findings),
    }, indent=2)


# --------------------------------------------------------------------------- command


@contextlib.contextmanager
def _quiet_backend_log() -> Iterator[None]:
    # BackendPool logs its failures for the running proxy; here they are the error message
    log = logging.getLogger("phiproxy.backend")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


async def scan_backend(config: Config) -> Evidence:
    """Connect as the proxy does and gather the evidence; BackendUnavailable if it cannot."""
    from proxy.backend import auth_command, open_connection
    from proxy.tls import backend_context

    cfg = config.backend
    if cfg.mode == "sentinel":  # scan the primary the sentinels name now
        from proxy.backend.sentinel import resolve_primary

        cfg = await resolve_primary(cfg, backend_context(cfg))
    ev = Evidence(cfg.address, cfg.port, cfg.username or "default")
    conn = await open_connection(cfg, backend_context(cfg), auth_command(cfg))
    try:
        return await gather(conn, ev, max(cfg.connect_timeout_s, 5.0))
    finally:
        conn.close()


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_scan_backend(args: argparse.Namespace) -> int:
    from proxy.backend import BackendUnavailable
    from proxy.config import backend_node
    from proxy.startup import load_policy_or_report
    from proxy.tls import TLSConfigError

    loaded = load_policy_or_report(args.config)
    if loaded is None:
        return EXIT_USAGE
    config, decide, roles = loaded
    cfg = config.backend
    try:
        with _quiet_backend_log():
            ev = asyncio.run(scan_backend(config))
    except TLSConfigError as exc:
        return _error(f"{config.path}: {exc}")
    except BackendUnavailable as exc:
        return _error(f"{config.path}: [backend] cannot scan {backend_node(cfg)}: {exc}; "
                      "check that Redis listens there with TLS and accepts the proxy's "
                      "certificate and credentials")
    findings = run_controls(Scan(config, ev, roles, decide))
    render = render_json if args.json else render_text
    print(render(findings, ev, config))
    return EXIT_FAILED if summary(findings)[FAIL] else EXIT_OK

