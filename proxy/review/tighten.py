"""Grants a role never used, and a tightened rule that the policy engine confirms.

The tightened rule of a role is built from the commands it ran in the window, selector by
selector: each command is re-run through the role's own engine (`evaluate`, what `explain`
and the proxy use) to learn which selector allowed it and which of that selector's key
patterns cover its keys; the new rule names those commands (`+get`, `+config|get`) and
keeps those key patterns, in the same selector. So it grants nothing the role does not:
every command it names was allowed to the role, with key patterns the role already had
in that selector. Then the tightened role is compiled and every used command is decided
again by the same engine: `confirmed` is true only if all of them are still allowed.

A `prefix*` key pattern is narrowed, for the keys a `phi_keys` pattern inside it covers,
to that pattern (`~app:*` -> `~app:phi:*`, with the role's permission). A role
with `allkeys` is narrowed to the `phi_keys` patterns its commands touched, unless a
command touched a key outside them or needs to read every key (KEYS, SCAN, RANDOMKEY, SORT
BY/GET); then `allkeys` stays. Channels are not recorded by the trail, so channel grants
are kept out of the tightened rule (a role that uses Pub/Sub keeps its `&` rules by hand;
the review says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.commands.keys import extract_keys, has_keys
from proxy.commands.table import ACL_READ, ACL_WRITE, CommandInfo
from proxy.config import ConfigError, RoleConfig
from proxy.policy import extras as ex
from proxy.policy.engine import CompiledRole, CompiledSelector, compile_roles, evaluate
from proxy.policy.glob import compile_glob

_PAD = b"0"  # filler for non-key arguments: a number, a member, a cursor and a pattern


def witness(role: CompiledRole, command: str, keys: Sequence[str]) -> list[bytes] | None:
    """An argv of `command` over exactly `keys` that `role` allows, or None if none of the
    usual argument shapes fits (the use is then reported as not re-checked)."""
    head = [part.encode() for part in command.split("|")]
    info = role.table.lookup(head)
    if info is None:
        return None
    key_bytes = [k.encode("utf-8", "surrogateescape") for k in keys]
    count = str(len(key_bytes)).encode()
    shapes = [key_bytes]
    if len(key_bytes) > 1:
        shapes += [
            [x for k in key_bytes for x in (k, _PAD)],  # MSET, MSETNX
            [key_bytes[0], str(len(key_bytes) - 1).encode(), *key_bytes[1:]],  # ZUNIONSTORE
        ]
    if key_bytes:
        shapes += [
            [count, *key_bytes],  # SINTERCARD, LMPOP, ZMPOP, ZUNION
            [_PAD, count, *key_bytes],  # BLMPOP, BZMPOP (timeout first)
            [b"STREAMS", *key_bytes, *[_PAD] * len(key_bytes)],  # XREAD
            [b"GROUP", _PAD, _PAD, b"STREAMS", *key_bytes, *[b">"] * len(key_bytes)],
        ]
    if info.name in ex.SCRIPT_RUNNERS:
        shapes = [[_PAD, count, *key_bytes]]
    for shape in shapes:
        argv = _padded(info, head + shape)
        if argv is None:
            continue
        if has_keys(info):
            found = extract_keys(info, argv)
            if sorted(argv[p] for p, _ in found.keys) != sorted(key_bytes):
                continue
        elif key_bytes:
            continue
        if evaluate(role, argv).decision.allowed:
            return argv
    return None


def _padded(info: CommandInfo, argv: list[bytes]) -> list[bytes] | None:
    arity = info.arity
    if arity > 0:
        if len(argv) > arity:
            return None
        return argv + [_PAD] * (arity - len(argv))
    return argv + [_PAD] * max(0, -arity - len(argv))


def _pattern_token(pattern: bytes, perm: int) -> str:
    text = pattern.decode("utf-8", "surrogateescape")
    if perm == ACL_READ | ACL_WRITE:
        return "~" + text
    return ("%R~" if perm == ACL_READ else "%W~") + text


@dataclass
class _Plan:
    commands: dict[str, None] = field(default_factory=dict)  # ordered set
    keys: dict[str, None] = field(default_factory=dict)
    allkeys: str | None = None

    def rule(self) -> str:
        keys = [self.allkeys] if self.allkeys else list(self.keys)
        return " ".join([f"+{c}" for c in self.commands] + keys)


def _needs_all_keys(info: CommandInfo | None, argv: Sequence[bytes]) -> bool:
    if info is None:
        return False
    name = info.name
    return name in ex.REVEALS_KEYS or (name in ("sort", "sort_ro")
                                       and ex.sort_uses_patterns(argv))


def _add_keys(plan: _Plan, sel: CompiledSelector, argv: list[bytes], info: CommandInfo | None,
              phi: list[tuple[str, Any]]) -> None:
    keys = [argv[p] for p, _ in extract_keys(info, argv).keys] if info and has_keys(info) \
        else []
    if sel.allkeys:
        if _needs_all_keys(info, argv) or not phi:
            plan.allkeys = sel.rules.allkeys_token or "allkeys"
        for key in keys:
            covering = [p for p, match in phi if match(key)]
            if not covering:
                plan.allkeys = sel.rules.allkeys_token or "allkeys"
            for pattern in covering:
                plan.keys.setdefault("~" + pattern)
        return
    for key in keys:
        for pattern in sel.rules.keys:
            if compile_glob(pattern.pattern)(key):
                narrower = _narrower(pattern.pattern, key, phi)
                plan.keys.setdefault(_pattern_token(narrower or pattern.pattern, pattern.perm))
    if _needs_all_keys(info, argv):  # the role reads every key through a ~* pattern
        for pattern in sel.rules.keys:
            if pattern.pattern == b"*":
                plan.keys.setdefault(_pattern_token(pattern.pattern, pattern.perm))


def _narrower(role_pattern: bytes, key: bytes, phi: list[tuple[str, Any]]) -> bytes | None:
    """A phi_keys pattern covering `key` that is provably inside `role_pattern` (both
    `prefix*`, the phi prefix extending the role's): `~app:*` narrows to `~app:phi:*`."""
    outer = ex.prefix_star(role_pattern)
    if outer is None:
        return None
    for text, match in phi:
        inner = ex.prefix_star(text.encode())
        if inner is not None and len(inner) > len(outer) and inner.startswith(outer) \
                and match(key):
            return text.encode()
    return None


@dataclass
class Tightened:
    role: str
    rule: str
    dbs: list[int] | None
    confirmed: bool
    checked: int  # distinct uses decided again by the engine
    still_allowed: int
    not_reproduced: list[str]  # command names whose argument shape could not be rebuilt
    refused: list[str]  # uses the tightened rule refused (confirmed is then false)
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "dbs": self.dbs, "confirmed": self.confirmed,
                "checked": self.checked, "still_allowed": self.still_allowed,
                "not_reproduced": self.not_reproduced, "refused": self.refused,
                "notes": self.notes}


def tighten(role: CompiledRole, config_role: RoleConfig, uses: list[dict[str, Any]],
            phi_keys: Sequence[str]) -> Tightened:
    """The tightened rule for `role` from its used commands ({command, keys, db}), confirmed
    by compiling it and deciding every use again."""
    phi = [(p, compile_glob(p.encode())) for p in phi_keys]
    plans: dict[int, _Plan] = {}
    witnesses: list[tuple[str, list[bytes]]] = []
    not_reproduced: list[str] = []
    dbs: set[int] = set()
    for use in uses:
        argv = witness(role, use["command"], use["keys"])
        if argv is None:
            if use["command"] not in not_reproduced:
                not_reproduced.append(use["command"])
            continue
        evaluation = evaluate(role, argv)
        index = evaluation.selector or 0
        plan = plans.setdefault(index, _Plan())
        plan.commands.setdefault(evaluation.decision.command)
        _add_keys(plan, role.selectors[index], argv, role.table.lookup(argv), phi)
        witnesses.append((use["command"], argv))
        if isinstance(use.get("db"), int):
            dbs.add(use["db"])
    parts = [plans[0].rule()] if 0 in plans else []
    parts += [f"({plans[i].rule()})" for i in sorted(plans) if i != 0]
    rule = " ".join(p for p in parts if p) or "nocommands resetkeys"
    notes = []
    if not uses:
        notes.append("no command of this role was recorded in the window: the tightened "
                     "rule grants nothing (consider removing the role)")
    if any(sel.rules.channels or sel.allchannels for sel in role.selectors):
        notes.append("channel grants are not in the tightened rule: the trail does not "
                     "record channel names; keep the role's & rules if it uses Pub/Sub")
    # dbs never widen: a subset of the role's (an empty one would mean every database)
    original_dbs = list(config_role.dbs) if config_role.dbs is not None else None
    narrowed = sorted(dbs if original_dbs is None else dbs & set(original_dbs))
    tight_dbs = narrowed or original_dbs
    refused: list[str] = []
    allowed = 0
    for dbs_try in ([tight_dbs, original_dbs] if tight_dbs != original_dbs else [tight_dbs]):
        try:
            compiled = compile_roles({role.name: RoleConfig(
                role.name, rule, tuple(dbs_try) if dbs_try else None)}, role.table)[role.name]
        except ConfigError as exc:  # a bug here, never a reason to print an unchecked rule
            return Tightened(role.name, rule, dbs_try or None, False, 0, 0, not_reproduced,
                             [f"the tightened rule does not compile: {p}"
                              for p in exc.problems], notes)
        refused, allowed = [], 0
        for command, argv in witnesses:
            if evaluate(compiled, argv).decision.allowed:
                allowed += 1
            elif command not in refused:
                refused.append(command)
        if not refused:
            if dbs_try != tight_dbs:
                notes.append("dbs not narrowed: a command used (FLUSHALL, a script, ...) "
                             "concerns every database")
            tight_dbs = dbs_try
            break
    confirmed = not refused and not not_reproduced
    return Tightened(role.name, rule, tight_dbs or None, confirmed, len(witnesses), allowed,
                     not_reproduced, refused, notes)


def unused_grants(role: CompiledRole, config_role: RoleConfig,
                  uses: list[dict[str, Any]]) -> dict[str, Any]:
    """The role's grants (rule tokens) that no command of the window used: command tokens
    and categories, key patterns, dbs; channel grants are listed as not recorded."""
    used_names = {u["command"] for u in uses}
    used_infos = [role.table.lookup([p.encode() for p in name.split("|")]) for name in used_names]
    used_keys = [k.encode("utf-8", "surrogateescape") for u in uses for k in u["keys"]]
    used_dbs = {u["db"] for u in uses if isinstance(u.get("db"), int)}
    commands: list[str] = []
    keys: list[str] = []
    channels: list[str] = []
    for sel in role.selectors:
        for token in _grant_tokens(role, sel):
            low = token.lower()
            if low in ("allcommands", "+@all"):
                if not used_names and token not in commands:
                    commands.append(token)
            elif low.startswith("+@"):
                category = low[2:]
                if not any(info is not None and category in info.categories
                           for info in used_infos) and token not in commands:
                    commands.append(token)
            elif low.startswith("+"):
                name = low[1:]
                if not any(u == name or u.startswith(name + "|") for u in used_names) \
                        and token not in commands:
                    commands.append(token)
        if sel.allkeys and not used_keys:
            keys.append(sel.rules.allkeys_token or "allkeys")
        for pattern in sel.rules.keys:
            match = compile_glob(pattern.pattern)
            if not any(match(k) for k in used_keys):
                keys.append(_pattern_token(pattern.pattern, pattern.perm))
        if sel.allchannels:
            channels.append(sel.rules.allchannels_token or "allchannels")
        channels.extend(token for _, token in sel.rules.channels)
    dbs = sorted(set(config_role.dbs) - used_dbs) if config_role.dbs is not None else None
    granted = sum(1 for info in role.table if any(
        sel.rules.allowed.get(info.name) for sel in role.selectors))
    return {
        "commands": commands, "key_patterns": keys,
        "channels_not_recorded": channels,
        "dbs": dbs if dbs is not None else ("every database is granted (no dbs key); used: "
                                            + (", ".join(map(str, sorted(used_dbs))) or "none")),
        "granted_commands": granted, "used_commands": len(used_names),
    }


def _grant_tokens(role: CompiledRole, sel: CompiledSelector) -> list[str]:
    """The granting command tokens of a selector, in rule order."""
    if sel.index == 0:
        tokens = [t for t in role.rules.tokens if not t.startswith("(")]
    else:
        selectors = [t for t in role.rules.tokens if t.startswith("(")]
        tokens = selectors[sel.index - 1][1:-1].split() if sel.index - 1 < len(selectors) \
            else []
    return [t for t in tokens if t.startswith("+") or t.lower() == "allcommands"]
