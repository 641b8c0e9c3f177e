"""Audit record bodies (SPEC §6), built as bytes, never from values.

A record line is

    {"ts":..,"seq":..,"event":..,"environment":..,"instance":..,"conn":..,"src":..,
     "identity":..,"role":..,<event fields>,"prev":..,"mac":..}

The builders here return the *body*: the bytes from `"event"` up to the last event field,
without braces. The writer (which owns the chain) adds `ts`, `seq`, `prev` and `mac`, so a
record that could not be written never consumes a sequence number.

Cost: everything constant for a connection (environment, instance, conn, src, identity,
role) is JSON-encoded once, in `ConnectionRecords`; a `command` body is then a few byte
concatenations plus the encoding of its keys. Builders take command names, key names and
metadata only: there is no parameter through which a value could reach the trail.

All output is ASCII (non-ASCII and undecodable key bytes are escaped), so a record survives
any transport byte-exact, which is what lets `verify` check MACs without re-serialising.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

# C-accelerated: str -> '"..."' with everything outside printable ASCII escaped
_q = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]

EVENTS = ("start", "stop", "reload", "connect", "tls_failed", "identity_refused", "auth",
          "command", "denied", "disconnect", "recovered", "lockout", "rewrap")
WARNING_EVENTS = frozenset({"denied", "tls_failed", "identity_refused", "recovered",
                            "lockout"})

_NAME_CACHE_MAX = 4096  # command names come from clients: bound what we remember
_DB = [b',"db":' + str(i).encode() for i in range(64)]


def qstr(value: str | None) -> bytes:
    """A JSON string (or null) as ASCII bytes."""
    return b"null" if value is None else _q(value).encode()


def key_text(key: bytes | str) -> str:
    """A key name for the trail: UTF-8, undecodable bytes as \\xNN escapes."""
    return key if isinstance(key, str) else key.decode("utf-8", "backslashreplace")


def encode_keys(keys: Iterable[bytes | str]) -> bytes:
    # keys are names, not values: they may be written (SPEC §6)
    if type(keys) is tuple and len(keys) == 1:
        key = keys[0]
        if type(key) is bytes and key.isascii():  # the hot path: one ASCII key name
            return b"[" + _q(key.decode("ascii")).encode() + b"]"
    return ("[" + ",".join([_q(key_text(k)) for k in keys]) + "]").encode()


def format_src(src: str | tuple[Any, ...] | None) -> str | None:
    """'ip:port' from a peername tuple (IPv6 as [ip]:port), or the string as given."""
    if src is None or isinstance(src, str):
        return src
    host, port = src[0], src[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def identity_json(identity: Any) -> bytes:
    """{"cn","san_uri","fingerprint"} from an Identity (has as_record()) or a mapping."""
    if identity is None:
        return b"null"
    fields: Mapping[str, Any] = (identity.as_record() if hasattr(identity, "as_record")
                                 else identity)
    return (b'{"cn":' + qstr(fields.get("cn")) + b',"san_uri":' + qstr(fields.get("san_uri"))
            + b',"fingerprint":' + qstr(fields.get("fingerprint")) + b"}")


def _num(value: int | float | None) -> bytes:
    if value is None:
        return b"null"
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, float):
        return repr(round(value, 6)).encode() if math.isfinite(value) else b"null"
    return str(int(value)).encode()


def _fields(pairs: Iterable[tuple[str, bytes]]) -> bytes:
    return b"".join(b',"' + name.encode() + b'":' + value for name, value in pairs)


class AuditRecords:
    """Builders for one proxy process (environment and instance are fixed at load)."""

    def __init__(self, environment: str, instance: str):
        self.environment = environment
        self.instance = instance
        self._where = (b'"environment":' + qstr(environment) + b',"instance":'
                       + qstr(instance))
        self._nobody = self._where + b',"conn":null,"src":null,"identity":null,"role":null'

    def _body(self, event: str, context: bytes, extra: bytes = b"") -> bytes:
        return b'"event":"' + event.encode() + b'",' + context + extra

    def _context(self, conn: int | None, src: Any, identity: Any, role: str | None) -> bytes:
        return (self._where + b',"conn":' + _num(conn) + b',"src":' + qstr(format_src(src))
                + b',"identity":' + identity_json(identity) + b',"role":' + qstr(role))

    def start(self, *, version: str, pid: int, config: str | None = None) -> bytes:
        return self._body("start", self._nobody, _fields(
            [("version", qstr(version)), ("pid", _num(pid)), ("config", qstr(config))]))

    def stop(self, *, reason: str) -> bytes:
        return self._body("stop", self._nobody, _fields([("reason", qstr(reason))]))

    def reload(self, *, ok: bool, reason: str | None = None) -> bytes:
        return self._body("reload", self._nobody, _fields(
            [("ok", _num(ok)), ("reason", qstr(reason))]))

    def failover(self, *, old: str, new: str, master_name: str | None) -> bytes:
        """The backend primary moved (Sentinel): commands from now on go to `new`."""
        return self._body("failover", self._nobody, _fields(
            [("old", qstr(old)), ("new", qstr(new)), ("master_name", qstr(master_name))]))

    def recovered(self, *, reason: str, torn_file: str | None = None,
                  torn_bytes: int | None = None, torn_sha256: str | None = None) -> bytes:
        """Written by the writer itself when it repaired a crash artifact at open()."""
        return self._body("recovered", self._nobody, _fields(
            [("reason", qstr(reason)), ("torn_file", qstr(torn_file)),
             ("torn_bytes", _num(torn_bytes)), ("torn_sha256", qstr(torn_sha256))]))

    def rewrap(self, *, ok: bool, dry_run: bool, primary: str, pattern: str | None,
               counts: Mapping[str, int], by: Mapping[str, Any],
               reason: str | None = None) -> bytes:
        """One `phiproxy keys rewrap` run (SPEC §6): counts only, never a key or a value.
        `by`: who ran it (OS user, host, pid)."""
        def obj(items: Mapping[str, Any]) -> bytes:
            return b"{" + b",".join(
                qstr(k) + b":" + (qstr(v) if isinstance(v, str) or v is None else _num(v))
                for k, v in items.items()) + b"}"

        return self._body("rewrap", self._nobody, _fields(
            [("ok", _num(ok)), ("dry_run", _num(dry_run)), ("primary", qstr(primary)),
             ("pattern", qstr(pattern)), ("counts", obj(counts)), ("by", obj(by)),
             ("reason", qstr(reason))]))

    def tls_failed(self, *, conn: int | None, src: Any, reason: str,
                   subject: str | None = None, fingerprint: str | None = None) -> bytes:
        return self._body("tls_failed", self._context(conn, src, None, None), _fields(
            [("reason", qstr(reason)), ("subject", qstr(subject)),
             ("fingerprint", qstr(fingerprint))]))

    def identity_refused(self, *, conn: int | None, src: Any, identity: Any, reason: str,
                         subject: str | None = None) -> bytes:
        if subject is None and identity is not None:
            subject = getattr(identity, "subject", None)
        fingerprint = None
        if identity is not None:
            fingerprint = (identity.as_record() if hasattr(identity, "as_record")
                           else identity).get("fingerprint")
        return self._body("identity_refused", self._context(conn, src, identity, None),
                          _fields([("reason", qstr(reason)), ("subject", qstr(subject)),
                                   ("fingerprint", qstr(fingerprint))]))

    def lockout(self, *, src: Any, identity: Any, blocked: Mapping[str, str],
                failures: int, window_s: float, block_s: float, reason: str) -> bytes:
        """A block started. `blocked`: {"kind": "source", "address": ip} or {"kind":
        "certificate", "fingerprint": sha256 hex, "subject": ...}; `src` is the connection
        whose failure started it, `identity` the certificate's when there was one."""
        what = b"{" + b",".join(qstr(k) + b":" + qstr(v) for k, v in blocked.items()) + b"}"
        return self._body("lockout", self._context(None, src, identity, None), _fields(
            [("blocked", what), ("failures", _num(failures)), ("window_s", _num(window_s)),
             ("block_s", _num(block_s)), ("reason", qstr(reason))]))

    def connection(self, conn: int | None, src: Any, identity: Any,
                   role: str | None) -> ConnectionRecords:
        """Builders for one client connection; build once in connection_made."""
        return ConnectionRecords(self._context(conn, src, identity, role))


class ConnectionRecords:
    """Per-connection builders: the constant fields are encoded once, here."""

    __slots__ = ("_command", "_commands", "_denied", "_context", "_names")

    def __init__(self, context: bytes):
        self._context = context
        self._command = b'"event":"command",' + context + b',"command":'
        self._denied = b'"event":"denied",' + context + b',"command":'
        self._names: dict[str, bytes] = {}
        self._commands: dict[str, bytes] = {}  # name -> the command body up to its keys

    def _name(self, name: str) -> bytes:
        encoded = self._names.get(name)
        if encoded is None:
            encoded = _q(name).encode() + b',"keys":'
            if len(self._names) < _NAME_CACHE_MAX:
                self._names[name] = encoded
        return encoded

    def command(self, name: str, keys: Iterable[bytes | str], db: int) -> bytes:
        """Hot path: a PHI-touching (or keyless destructive) command, before forwarding.

        `name` is lower case with its subcommand ("config|get"); `keys` the key names.
        """
        prefix = self._commands.get(name)
        if prefix is None:
            prefix = self._command + self._name(name)
            if len(self._commands) < _NAME_CACHE_MAX:
                self._commands[name] = prefix
        return b"".join((prefix, encode_keys(keys),
                         _DB[db] if 0 <= db < 64 else b',"db":' + str(db).encode()))

    def denied(self, name: str, keys: Iterable[bytes | str], db: int, reason: str) -> bytes:
        return (self._denied + self._name(name) + encode_keys(keys)
                + (_DB[db] if 0 <= db < 64 else b',"db":' + str(db).encode())
                + b',"reason":' + qstr(reason))

    def connect(self, *, tls_version: str | None, cipher: str | None) -> bytes:
        return (b'"event":"connect",' + self._context + b',"tls":{"version":'
                + qstr(tls_version) + b',"cipher":' + qstr(cipher) + b"}")

    def auth(self, *, username: str | None, command: str = "auth") -> bytes:
        """A client AUTH / HELLO AUTH (answered locally). The password is never passed here."""
        return (b'"event":"auth",' + self._context + b',"command":' + qstr(command)
                + b',"username":' + qstr(username))

    def disconnect(self, *, duration_s: float, commands: int, bytes_in: int, bytes_out: int,
                   reason: str | None = None) -> bytes:
        return (b'"event":"disconnect",' + self._context + _fields(
            [("duration_s", _num(duration_s)), ("commands", _num(commands)),
             ("bytes_in", _num(bytes_in)), ("bytes_out", _num(bytes_out)),
             ("reason", qstr(reason))]))


def event_of(body_or_line: bytes) -> str:
    """The event name of a body or a full record line (for syslog severity)."""
    start = body_or_line.find(b'"event":"')
    if start < 0:
        return ""
    start += 9
    return body_or_line[start:body_or_line.index(b'"', start)].decode("ascii", "replace")
