"""What each identity and role did in the window, from the trail's records.

Keys are aggregated to the patterns that cover them (the role's key-pattern rules and
`[audit] phi_keys`); key names never leave this module. Denial reasons are reduced to their
kind (the extra of SPEC §4, or which Redis permission was missing), because a reason's
sentence may quote a key or channel name.

What the trail can show: SPEC §6 records every command that touches a `phi_keys` key or can
read or destroy keys without naming them, every refusal, and each connection's command
count (its `disconnect` record). Commands on other keys are counted there but not named.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from proxy.config import Config
from proxy.policy.engine import CompiledRole
from proxy.policy.glob import compile_glob

REASON_KINDS = {
    "unknown_command": "unknown command (default deny)",
    "dangerous": "dangerous command not granted by name",
    "scripting": "scripting not granted by name",
    "keyspace": "would reveal key or channel names beyond the role's patterns",
    "sort_pattern": "SORT with BY/GET patterns without allkeys",
    "db": "database outside the role's dbs",
    "unchecked_keys": "keys that cannot be checked",
    "disabled_command": "disabled for every role ([policy] disabled_commands)",
    "command": "command not granted",
    "key": "key outside the role's key patterns",
    "channel": "channel outside the role's channel patterns",
    "other": "other refusal",
}


def reason_kind(reason: Any) -> str:
    """The kind of a refusal (a key of REASON_KINDS); never the sentence itself."""
    if not isinstance(reason, str):
        return "other"
    head = reason.split(":", 1)[0].strip()
    if head in REASON_KINDS and head not in ("command", "key", "channel", "other"):
        return head
    if "permissions to access one of the keys" in reason:
        return "key"
    if "permissions to access one of the channels" in reason:
        return "channel"
    if "permissions to run" in reason:
        return "command"
    return "other"


_COMMAND_PART = re.compile(r"^[a-z][a-z0-9_.-]{0,39}$")


def command_label(name: Any) -> str:
    """A refused command's name as the report shows it. An unknown command's name is the
    client's own text (`OBJECT app:phi:123` is recorded as "object|app:phi:123"), so a part
    that does not look like a command name is shown as "?": a key never leaks this way."""
    parts = str(name).split("|")
    return "|".join(p if _COMMAND_PART.match(p) else "?" for p in parts)


def ts_text(ts: datetime | None) -> str | None:
    return None if ts is None else ts.isoformat().replace("+00:00", "Z")


def identity_label(identity: Any) -> str:
    if not isinstance(identity, dict):
        return "(no certificate)"
    return identity.get("cn") or identity.get("san_uri") or (identity.get("fingerprint")
                                                             or "?")[:16]


@dataclass
class Use:
    """One identity under one role."""

    identity: dict[str, Any]
    role: str
    commands: Counter[str] = field(default_factory=Counter)
    key_patterns: Counter[str] = field(default_factory=Counter)
    denials: Counter[tuple[str, str]] = field(default_factory=Counter)  # (command, kind)
    dbs: Counter[int] = field(default_factory=Counter)
    connections: int = 0
    connection_commands: int = 0  # from disconnect records: every command, recorded or not
    auths: int = 0
    first: datetime | None = None
    last: datetime | None = None

    def seen(self, ts: datetime) -> None:
        self.first = ts if self.first is None or ts < self.first else self.first
        self.last = ts if self.last is None or ts > self.last else self.last

    def unrecorded(self) -> int:
        """Commands of the closed connections that have no record of their own (no PHI key:
        connection setup, PING, other keys)."""
        recorded = sum(self.commands.values()) + sum(self.denials.values()) + self.auths
        return max(0, self.connection_commands - recorded)

    def as_dict(self) -> dict[str, Any]:
        return {
            "identity": self.identity, "role": self.role,
            "commands": dict(sorted(self.commands.items())),
            "commands_total": sum(self.commands.values()),
            "key_patterns": dict(sorted(self.key_patterns.items())),
            "denials": [{"command": c, "reason": k, "reason_text": REASON_KINDS[k], "count": n}
                        for (c, k), n in sorted(self.denials.items())],
            "denials_total": sum(self.denials.values()),
            "dbs": sorted(self.dbs),
            "connections": self.connections,
            "connection_commands": self.connection_commands,
            "unrecorded_commands": self.unrecorded(),
            "first_use": ts_text(self.first), "last_use": ts_text(self.last),
        }


class PatternIndex:
    """Key -> the pattern labels that cover it, for one role: its key-pattern rules
    ("~app:phi:*", "%R~app:*", "allkeys") and the phi_keys patterns ("phi_keys app:phi:*")."""

    def __init__(self, role: CompiledRole | None, phi_keys: Iterable[str]):
        self.rules: list[tuple[str, Any]] = []
        self.allkeys: str | None = None
        if role is not None:
            for sel in role.selectors:
                if sel.allkeys and self.allkeys is None:
                    self.allkeys = sel.rules.allkeys_token or "allkeys"
                for pattern in sel.rules.keys:
                    if all(token != pattern.token for token, _ in self.rules):
                        self.rules.append((pattern.token, compile_glob(pattern.pattern)))
        self.phi = [(f"phi_keys {p}", compile_glob(p.encode())) for p in phi_keys]

    def labels(self, key: str) -> list[str]:
        raw = key.encode("utf-8", "surrogateescape")
        found = [token for token, match in self.rules if match(raw)]
        if not found and self.allkeys is not None:
            found.append(self.allkeys)
        if not found:
            found.append("(no pattern of the role)")
        return found + [label for label, match in self.phi if match(raw)]


MAX_SHAPES_PER_ROLE = 10_000  # distinct uses kept for the engine to re-check


class UsageCollector:
    """Fed every record of the window once (`add`), in any order. `uses`: per (identity
    key, role) what it did, the identity key being the certificate's fingerprint (the CN
    when there is none). `shapes`: per role, one {command, keys, db} for each distinct
    command, database and pattern coverage of its keys, for the engine to re-check (a
    million GETs on a million keys under one pattern are one shape)."""

    def __init__(self, config: Config, roles: dict[str, CompiledRole]):
        self.uses: dict[tuple[str, str], Use] = {}
        self._phi_keys = config.audit.phi_keys
        self._indexes = {name: PatternIndex(role, self._phi_keys)
                         for name, role in roles.items()}
        self._shapes: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = defaultdict(dict)
        self.shapes_dropped = 0

    def add(self, record: dict[str, Any]) -> None:
        event, role = record.get("event"), record.get("role")
        identity = record.get("identity")
        if event not in ("connect", "command", "denied", "disconnect", "auth") or not role \
                or not isinstance(identity, dict):
            return
        who = identity.get("fingerprint") or identity.get("cn") or "?"
        use = self.uses.get((who, role))
        if use is None:
            use = self.uses[(who, role)] = Use(dict(identity), role)
        use.seen(record["_ts"])
        if event == "connect":
            use.connections += 1
        elif event == "auth":
            use.auths += 1
        elif event == "disconnect":
            commands = record.get("commands")
            if isinstance(commands, int):
                use.connection_commands += commands
        elif event == "command":
            self._command(use, record)
        else:
            use.denials[(command_label(record.get("command")),
                         reason_kind(record.get("reason")))] += 1

    def _command(self, use: Use, record: dict[str, Any]) -> None:
        command = str(record.get("command"))
        db = record.get("db")
        use.commands[command] += 1
        if isinstance(db, int):
            use.dbs[db] += 1
        index = self._indexes.get(use.role)
        if index is None:
            index = self._indexes[use.role] = PatternIndex(None, self._phi_keys)
        keys = tuple(str(k) for k in record.get("keys") or ())
        per_key = tuple(tuple(index.labels(key)) for key in keys)
        use.key_patterns.update({label for labels in per_key for label in labels})
        shapes = self._shapes[use.role]
        shape = (command, db, per_key)
        if shape not in shapes:
            if len(shapes) >= MAX_SHAPES_PER_ROLE:
                self.shapes_dropped += 1
                return
            shapes[shape] = {"command": command, "keys": keys, "db": db}

    def shapes(self) -> dict[str, list[dict[str, Any]]]:
        return {role: list(shapes.values()) for role, shapes in self._shapes.items()}


def by_role(uses: dict[tuple[str, str], Use]) -> dict[str, Use]:
    """The uses summed per role (the identity field lists who)."""
    out: dict[str, Use] = {}
    for use in uses.values():
        total = out.get(use.role)
        if total is None:
            total = out[use.role] = Use({"identities": []}, use.role)
        total.identity["identities"].append(identity_label(use.identity))
        total.commands.update(use.commands)
        total.key_patterns.update(use.key_patterns)
        total.denials.update(use.denials)
        total.dbs.update(use.dbs)
        total.connections += use.connections
        total.connection_commands += use.connection_commands
        total.auths += use.auths
        for ts in (use.first, use.last):
            if ts is not None:
                total.seen(ts)
    return out


def identity_rules_seen(config: Config, uses: dict[tuple[str, str], Use]) -> list[dict[str, Any]]:
    """Each [[identities]] rule, and whether a certificate it maps was seen. The trail keeps
    a certificate's CN, URI SAN and fingerprint: a rule on OU, DNS or e-mail SANs is matched
    by its role and the fields the trail has."""
    out = []
    for number, rule in enumerate(config.identities, 1):
        matched = []
        for use in uses.values():
            ident = use.identity
            if use.role != rule.role:
                continue
            if rule.subject_cn is not None and ident.get("cn") != rule.subject_cn:
                continue
            if rule.san_uri is not None and ident.get("san_uri") != rule.san_uri:
                continue
            if rule.fingerprint_sha256 is not None and \
                    ident.get("fingerprint") != rule.fingerprint_sha256:
                continue
            matched.append(use)
        fields = {name: getattr(rule, name) for name in (
            "subject_cn", "subject_ou", "san_dns", "san_uri", "san_email",
            "fingerprint_sha256") if getattr(rule, name) is not None}
        last = max((u.last for u in matched if u.last is not None), default=None)
        out.append({"rule": f"[[identities]] #{number}", "match": fields, "role": rule.role,
                    "seen": bool(matched), "certificates": len(matched),
                    "last_seen": ts_text(last)})
    return out
