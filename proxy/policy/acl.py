"""Redis 7 ACL rule strings -> selectors, applied exactly as Redis's ACLSetSelector does.

A role's `acl` is read like `ACL SETUSER <user> reset on nopass <acl>` on Redis 7.0: the
rules apply left to right to a fresh user (no commands, no keys, no channels: Redis 7.0
defaults to `acl-pubsub-default resetchannels`). Parenthesised groups are extra
selectors; a command is allowed when any selector allows it.

Rules that make no sense for a role are refused: passwords (`nopass`, `>pw`, `#hash`,
`<pw`, `!hash`, `resetpass`: the client certificate is the identity), `off` (remove the
role instead), and the payload-sanitizing flags (they belong to the backend user).
`on` is accepted and does nothing.

Each selector records, per command, the rule token that last changed it, and whether the
current grant is explicit (for the `dangerous` and `scripting` extras of SPEC §4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from proxy.commands.table import ACL_CATEGORIES, ACL_READ, ACL_WRITE, CommandInfo, CommandTable

# Tokens that grant a dangerous command explicitly (besides naming it).
_EXPLICIT_CATEGORIES = frozenset(("admin", "dangerous"))

_UNKNOWN = "unknown ACL token"
_PASSWORD_RULES = frozenset(("nopass", "resetpass"))
_PASSWORD_PREFIXES = (">", "<", "#", "!")


class AclError(Exception):
    """Every problem of one role's rules, each a ready-to-print message."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class KeyPattern:
    pattern: bytes
    perm: int  # ACL_READ | ACL_WRITE
    token: str  # the (last) rule that added it, e.g. "%R~app:*"


@dataclass
class Selector:
    root: bool
    allowed: dict[str, bool] = field(default_factory=dict)  # full name -> permitted
    decided_by: dict[str, str] = field(default_factory=dict)  # full name -> last rule token
    explicit: dict[str, bool] = field(default_factory=dict)  # grant by name/@admin/@dangerous/@all
    scripting: dict[str, bool] = field(default_factory=dict)  # grant by name/@scripting
    firstargs: dict[str, list[tuple[bytes, str]]] = field(default_factory=dict)
    allkeys: bool = False
    allkeys_token: str | None = None
    keys: list[KeyPattern] = field(default_factory=list)
    allchannels: bool = False
    allchannels_token: str | None = None
    channels: list[tuple[bytes, str]] = field(default_factory=list)  # (pattern, token)

    def permits(self, name: str) -> bool:
        return self.allowed.get(name, False)


@dataclass
class RoleRules:
    name: str
    acl: str
    selectors: list[Selector]  # the root selector first
    tokens: list[str]  # after selector merging

    @property
    def empty(self) -> bool:
        return not self.tokens


def split_rules(acl: str) -> tuple[list[str], str | None]:
    """Whitespace-separated tokens with parenthesised selectors merged back into one
    token (Redis ACLMergeSelectorArguments); the second value names an unmatched '('."""
    merged: list[str] = []
    current: list[str] | None = None
    for word in acl.split():
        if current is None and word.startswith("(") and not word.endswith(")"):
            current = [word]
            continue
        if current is not None:
            current.append(word)
            if word.endswith(")"):
                merged.append(" ".join(current))
                current = None
            continue
        merged.append(word)
    return merged, (current[0] if current is not None else None)


class _Builder:
    """Applies rule tokens to selectors, with the command table Redis would use."""

    def __init__(self, table: CommandTable):
        self.table = table
        self._by_category: dict[str, list[CommandInfo]] = {c: [] for c in ACL_CATEGORIES}
        for cmd in table.commands.values():
            if cmd.is_module:
                continue  # Redis: categories never apply to module commands
            for cat in cmd.categories:
                self._by_category.setdefault(cat, []).append(cmd)
            for sub in cmd.subcommands.values():
                for cat in sub.categories:
                    self._by_category.setdefault(cat, []).append(sub)

    # -- command bits (ACLChangeSelectorPerm) --------------------------------------------
    @staticmethod
    def _set(sel: Selector, cmd: CommandInfo, value: bool, token: str,
             explicit: bool, scripting: bool) -> None:
        targets = [cmd, *cmd.subcommands.values()]
        sel.firstargs.pop(cmd.name, None)
        for target in targets:
            name = target.name
            sel.allowed[name] = value
            sel.decided_by[name] = token
            if value:
                sel.explicit[name] = explicit or sel.explicit.get(name, False)
                sel.scripting[name] = scripting or sel.scripting.get(name, False)
            else:
                sel.explicit[name] = False
                sel.scripting[name] = False

    def _all(self, sel: Selector, value: bool, token: str) -> None:
        for cmd in self.table:
            name = cmd.name
            sel.allowed[name] = value
            sel.decided_by[name] = token
            sel.explicit[name] = value
            # +@all is no scripting grant, but it does not revoke an earlier one either.
            sel.scripting[name] = value and sel.scripting.get(name, False)
        sel.firstargs.clear()

    # -- one selector rule (ACLSetSelector); returns an error message or None ------------
    def apply(self, sel: Selector, token: str) -> str | None:
        low = token.lower()
        if "\0" in token:
            return "a NUL character is not allowed in a rule"
        if low in ("allkeys", "~*"):
            sel.allkeys, sel.allkeys_token = True, token
            sel.keys.clear()
        elif low == "resetkeys":
            sel.allkeys, sel.allkeys_token = False, None
            sel.keys.clear()
        elif low in ("allchannels", "&*"):
            sel.allchannels, sel.allchannels_token = True, token
            sel.channels.clear()
        elif low == "resetchannels":
            sel.allchannels, sel.allchannels_token = False, None
            sel.channels.clear()
        elif low in ("allcommands", "+@all"):
            self._all(sel, True, token)
        elif low in ("nocommands", "-@all"):
            self._all(sel, False, token)
        elif token[0] in "~%":
            return self._key_pattern(sel, token)
        elif token[0] == "&":
            if sel.allchannels:
                return ("adds a channel pattern after allchannels (or &*), which Redis refuses; "
                        "put 'resetchannels' before it")
            pattern = token[1:].encode()
            if pattern not in (p for p, _ in sel.channels):
                sel.channels.append((pattern, token))
        elif token[0] in "+-" and token[1:2] == "@":
            category = low[2:]
            if category not in self._by_category:
                return f"unknown ACL category '@{token[2:]}'"
            value = token[0] == "+"
            explicit = category in _EXPLICIT_CATEGORIES
            for cmd in self._by_category[category]:
                self._set(sel, cmd, value, token, explicit, category == "scripting")
        elif token[0] == "+":
            return self._allow_command(sel, token)
        elif token[0] == "-":
            cmd = self.table.get(token[1:]) if token[1:] else None
            if cmd is None:
                return f"unknown command '{token[1:]}'"
            self._set(sel, cmd, False, token, False, False)
        else:
            return _UNKNOWN
        return None

    def _key_pattern(self, sel: Selector, token: str) -> str | None:
        if sel.allkeys:
            return ("adds a key pattern after allkeys (or ~*), which Redis refuses; "
                    "put 'resetkeys' before it")
        if token[0] == "~":
            perm, pattern = ACL_READ | ACL_WRITE, token[1:]
        else:
            flags, _, pattern = token[1:].partition("~")
            perm = 0
            for letter in flags.upper():
                bit = {"R": ACL_READ, "W": ACL_WRITE}.get(letter, 0)
                if not bit or perm & bit:
                    return "bad key permission: use %R~, %W~ or %RW~ followed by a pattern"
                perm |= bit
            if not perm or "~" not in token:
                return "bad key permission: use %R~, %W~ or %RW~ followed by a pattern"
        raw = pattern.encode()
        for existing in sel.keys:
            if existing.pattern == raw:
                existing.perm |= perm  # Redis merges the permissions of a repeated pattern
                existing.token = token
                return None
        sel.keys.append(KeyPattern(raw, perm, token))
        return None

    def _allow_command(self, sel: Selector, token: str) -> str | None:
        body = token[1:]
        if "|" not in body:
            cmd = self.table.get(body) if body else None
            if cmd is None:
                return f"unknown command '{body}'"
            self._set(sel, cmd, True, token, True, True)
            return None
        head, _, first = body.rpartition("|")
        base = self.table.get(head) if head else None
        if base is None:
            return f"unknown command '{head}'"
        if base.parent is not None:
            return "allowing a first argument of a subcommand is not supported by Redis"
        if not first:
            return "empty subcommand or first argument"
        if base.subcommands:
            sub = base.subcommands.get(first.lower().encode())
            if sub is None:
                return f"unknown subcommand '{first}' of '{head}'"
            self._set(sel, sub, True, token, True, True)
            return None
        # "+select|0": Redis's (deprecated) first-argument grant of a command without
        # subcommands; it only matters while the command itself stays denied.
        entries = sel.firstargs.setdefault(base.name, [])
        if all(arg != first.lower().encode() for arg, _ in entries):
            entries.append((first.lower().encode(), token))
        return None


def _problem(role: str, acl: str, token: str, message: str) -> str:
    if message == _UNKNOWN:
        what = f"unknown ACL token '{token}'"
    else:
        what = f"ACL token '{token}': {message}"
    return f"role '{role}': {what} in acl = \"{acl}\""


def _is_password(token: str) -> bool:
    return token.startswith(_PASSWORD_PREFIXES)


def _redacted(text: str) -> str:
    """Error messages never repeat a password rule's secret, also one that opens a
    selector: `(>pw ...)`."""
    return re.sub(r"(?<![^\s(])([><#!])\S+", r"\1***", text)


def parse_role(name: str, acl: str, table: CommandTable) -> RoleRules:
    """Apply `acl` to a fresh user; raise AclError listing every bad token."""
    tokens, unmatched = split_rules(acl)
    problems: list[str] = []
    shown = _redacted(acl)
    if unmatched is not None:
        problems.append(_problem(name, shown, _redacted(unmatched),
                                 "unmatched parenthesis in ACL selector"))
    builder = _Builder(table)
    root = Selector(root=True)
    selectors = [root]
    for token in tokens:
        low = token.lower()
        message: str | None = None
        if low == "on":
            continue
        if low == "off":
            message = "'off' does not apply to a role (remove the role or its identities)"
        elif low in _PASSWORD_RULES or _is_password(token):
            message = ("passwords do not apply to a role (the client certificate is the "
                       "identity); remove this token")
        elif low in ("sanitize-payload", "skip-sanitize-payload"):
            message = "payload sanitizing belongs to the backend user, not to a role"
        elif low == "reset":
            root = Selector(root=True)
            selectors = [root]
        elif low == "clearselectors":
            del selectors[1:]
        elif token.startswith("(") and token.endswith(")"):
            selector = Selector(root=False)
            inner, _ = split_rules(token[1:-1])
            for part in inner:
                error = builder.apply(selector, part)
                if error is not None:
                    problems.append(_problem(name, shown, _redacted(part), error))
            selectors.append(selector)
        else:
            message = builder.apply(root, token)
        if message is not None:
            problems.append(_problem(name, shown, _redacted(token), message))
    if problems:
        raise AclError(problems)
    return RoleRules(name, acl, selectors, tokens)
