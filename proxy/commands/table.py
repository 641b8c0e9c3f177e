"""The command table: arity, flags, ACL categories and key specs of every Redis command.

Loaded once from `table.json` (generated from a real Redis 7 by `gen_table.py`). Names
are lower-case; a subcommand's full name is `container|sub` (`config|get`), as in
Redis's ACL rules. `extend_from_command_reply` adds commands a backend knows and the
snapshot does not (modules, newer Redis), never changing a command already known; it
extends a `copy()`, since `default_table()` is one cached object every caller shares.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache, cached_property
from pathlib import Path
from typing import Any

TABLE_PATH = Path(__file__).with_name("table.json")

# Key-spec flags (Redis CMD_KEY_*), as bits.
KEY_RO = 1 << 0
KEY_RW = 1 << 1
KEY_OW = 1 << 2
KEY_RM = 1 << 3
KEY_ACCESS = 1 << 4
KEY_UPDATE = 1 << 5
KEY_INSERT = 1 << 6
KEY_DELETE = 1 << 7
KEY_NOT_KEY = 1 << 8
KEY_INCOMPLETE = 1 << 9
KEY_VARIABLE_FLAGS = 1 << 10

KEY_FLAG_BITS: dict[str, int] = {
    "RO": KEY_RO, "RW": KEY_RW, "OW": KEY_OW, "RM": KEY_RM,
    "access": KEY_ACCESS, "update": KEY_UPDATE, "insert": KEY_INSERT, "delete": KEY_DELETE,
    "not_key": KEY_NOT_KEY, "incomplete": KEY_INCOMPLETE, "variable_flags": KEY_VARIABLE_FLAGS,
}

# ACL key permissions (Redis ACL_READ_PERMISSION / ACL_WRITE_PERMISSION).
ACL_READ = 1
ACL_WRITE = 2
ACL_RW = ACL_READ | ACL_WRITE

# Redis 7 ACL categories (acl.c ACLCommandCategories), in Redis's order.
ACL_CATEGORIES: tuple[str, ...] = (
    "keyspace", "read", "write", "set", "sortedset", "list", "hash", "string", "bitmap",
    "hyperloglog", "geo", "stream", "pubsub", "admin", "fast", "slow", "blocking",
    "dangerous", "connection", "transaction", "scripting",
)


def key_flag_names(flags: int) -> list[str]:
    return [name for name, bit in KEY_FLAG_BITS.items() if flags & bit]


def acl_permission(flags: int) -> int:
    """The ACL permission a key with these spec flags needs (Redis ACLSelectorCheckKey).

    Only the access/insert/delete/update flags count: RO/RW/OW/RM are not consulted, so a
    key flagged only `RO` (EXISTS, TOUCH, WATCH) needs neither permission.
    """
    perm = ACL_READ if flags & KEY_ACCESS else 0
    if flags & (KEY_INSERT | KEY_DELETE | KEY_UPDATE):
        perm |= ACL_WRITE
    return perm


@dataclass(frozen=True, slots=True)
class KeySpec:
    flags: int
    begin_search: str  # "index" | "keyword" | "unknown"
    index: int = 0
    keyword: bytes = b""  # lower-case
    startfrom: int = 0
    find_keys: str = "range"  # "range" | "keynum" | "unknown"
    lastkey: int = 0
    keystep: int = 1
    limit: int = 0
    keynumidx: int = 0
    firstkey: int = 0

    def to_json(self) -> dict[str, Any]:
        if self.begin_search == "index":
            bs: list[Any] = ["index", self.index]
        elif self.begin_search == "keyword":
            bs = ["keyword", self.keyword.decode().upper(), self.startfrom]
        else:
            bs = ["unknown"]
        if self.find_keys == "range":
            fk: list[Any] = ["range", self.lastkey, self.keystep, self.limit]
        elif self.find_keys == "keynum":
            fk = ["keynum", self.keynumidx, self.firstkey, self.keystep]
        else:
            fk = ["unknown"]
        return {"flags": key_flag_names(self.flags), "bs": bs, "fk": fk}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeySpec:
        flags = 0
        for name in data["flags"]:
            flags |= KEY_FLAG_BITS[name]
        bs, fk = data["bs"], data["fk"]
        kwargs: dict[str, Any] = {"flags": flags, "begin_search": bs[0], "find_keys": fk[0]}
        if bs[0] == "index":
            kwargs["index"] = bs[1]
        elif bs[0] == "keyword":
            kwargs["keyword"] = bs[1].lower().encode()
            kwargs["startfrom"] = bs[2]
        if fk[0] == "range":
            kwargs.update(lastkey=fk[1], keystep=fk[2], limit=fk[3])
        elif fk[0] == "keynum":
            kwargs.update(keynumidx=fk[1], firstkey=fk[2], keystep=fk[3])
        return cls(**kwargs)


@dataclass(frozen=True, eq=False)
class CommandInfo:
    name: str  # lower-case full name: "get", "config|get"
    arity: int
    flags: frozenset[str]
    categories: frozenset[str]  # without the '@'
    key_specs: tuple[KeySpec, ...] = ()
    group: str = ""
    parent: str | None = None  # container name for a subcommand
    subcommands: dict[bytes, CommandInfo] = field(default_factory=dict)  # lower sub -> info

    @property
    def is_container(self) -> bool:
        return bool(self.subcommands)

    @property
    def is_module(self) -> bool:
        return "module" in self.flags

    @cached_property
    def has_key_specs(self) -> bool:
        """At least one spec that is a real key (Redis doesCommandHaveKeys, spec part)."""
        return any(not spec.flags & KEY_NOT_KEY for spec in self.key_specs)

    @cached_property
    def has_variable_flags(self) -> bool:
        return any(spec.flags & KEY_VARIABLE_FLAGS for spec in self.key_specs)

    def arity_ok(self, argc: int) -> bool:
        arity = self.arity
        return argc == arity if arity > 0 else argc >= -arity

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "arity": self.arity,
            "flags": sorted(self.flags),
            "acl": [c for c in ACL_CATEGORIES if c in self.categories]
            + sorted(self.categories - set(ACL_CATEGORIES)),
        }
        if self.key_specs:
            out["key_specs"] = [spec.to_json() for spec in self.key_specs]
        if self.group:
            out["group"] = self.group
        return out


class CommandTable:
    """Top-level commands by lower-case name; subcommands hang off their container."""

    def __init__(self, commands: Mapping[str, CommandInfo],
                 source: Mapping[str, Any] | None = None):
        self.commands: dict[str, CommandInfo] = dict(commands)
        self.by_bytes: dict[bytes, CommandInfo] = {n.encode(): c for n, c in self.commands.items()}
        self.source: dict[str, Any] = dict(source or {})

    def __iter__(self) -> Iterator[CommandInfo]:
        """Every command, containers followed by their subcommands."""
        for cmd in self.commands.values():
            yield cmd
            yield from cmd.subcommands.values()

    def __len__(self) -> int:
        return sum(1 + len(c.subcommands) for c in self.commands.values())

    def get(self, fullname: str) -> CommandInfo | None:
        """`get`, `config|get` (any case); None when unknown (like Redis's strict lookup)."""
        name, sep, sub = fullname.lower().partition("|")
        cmd = self.commands.get(name)
        if not sep or cmd is None:
            return cmd
        # Like Redis: exactly one level, and only a container has subcommands.
        return cmd.subcommands.get(sub.encode()) if "|" not in sub else None

    def lookup(self, argv: Sequence[bytes]) -> CommandInfo | None:
        """The command argv runs (Redis lookupCommand): a container with no argument is
        the container itself; an unknown subcommand is None."""
        cmd = self.by_bytes.get(argv[0].lower())
        if cmd is None or not cmd.subcommands or len(argv) == 1:
            return cmd
        return cmd.subcommands.get(argv[1].lower())

    def copy(self) -> CommandTable:
        """A table that can be extended without changing this one (learn_commands).

        Its own name dicts, and its own subcommand dict for each container (extending
        adds subcommands to known containers); the CommandInfo leaves are shared, they
        are never changed. About 0.2 ms for the shipped table, once at start.
        """
        commands = {name: replace(cmd, subcommands=dict(cmd.subcommands)) if cmd.subcommands
                    else cmd for name, cmd in self.commands.items()}
        return CommandTable(commands, self.source)

    def add(self, cmd: CommandInfo) -> None:
        self.commands[cmd.name] = cmd
        self.by_bytes[cmd.name.encode()] = cmd

    def to_json(self) -> str:
        """Compact, diff-friendly JSON: one command (or subcommand) per line, sorted."""
        lines = []
        for cmd in sorted(self, key=lambda c: c.name):
            body = json.dumps(cmd.to_json(), separators=(",", ":"))
            lines.append(f"    {json.dumps(cmd.name)}: {body}")
        source = json.dumps(self.source, sort_keys=True)
        commands = ",\n".join(lines)
        return f'{{\n  "source": {source},\n  "commands": {{\n{commands}\n  }}\n}}\n'

    @classmethod
    def from_json(cls, text: str) -> CommandTable:
        data = json.loads(text)
        flat: dict[str, dict[str, Any]] = data["commands"]
        top: dict[str, CommandInfo] = {}
        for name in sorted(flat, key=lambda n: n.count("|")):  # containers first
            entry = flat[name]
            parent, _, sub = name.partition("|")
            info = CommandInfo(
                name=name, arity=entry["arity"], flags=frozenset(entry["flags"]),
                categories=frozenset(entry["acl"]),
                key_specs=tuple(KeySpec.from_json(s) for s in entry.get("key_specs", ())),
                group=entry.get("group", ""), parent=parent if sub else None)
            if sub:
                top[parent].subcommands[sub.encode()] = info
            else:
                top[name] = info
        return cls(top, data.get("source"))


@cache
def default_table() -> CommandTable:
    """The snapshot shipped with phiproxy, loaded once and shared by every caller: never
    change it (extend a `copy()` instead)."""
    return CommandTable.from_json(TABLE_PATH.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- COMMAND replies


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def _as_map(value: Any) -> dict[str, Any]:
    """A RESP3 map (dict) or a RESP2 flat [k, v, k, v...] list as a dict with str keys."""
    if isinstance(value, Mapping):
        return {_text(k): v for k, v in value.items()}
    items = list(value)
    return {_text(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def key_spec_from_reply(raw: Any) -> KeySpec:
    spec = _as_map(raw)
    flags = 0
    for name in spec.get("flags", ()):
        flags |= KEY_FLAG_BITS.get(_text(name), 0)
    bs = _as_map(spec.get("begin_search", {}))
    fk = _as_map(spec.get("find_keys", {}))
    bs_type, fk_type = _text(bs.get("type", "unknown")), _text(fk.get("type", "unknown"))
    bs_spec, fk_spec = _as_map(bs.get("spec", {})), _as_map(fk.get("spec", {}))
    kwargs: dict[str, Any] = {"flags": flags}
    if bs_type == "index":
        kwargs.update(begin_search="index", index=int(bs_spec["index"]))
    elif bs_type == "keyword":
        kwargs.update(begin_search="keyword", keyword=_text(bs_spec["keyword"]).lower().encode(),
                      startfrom=int(bs_spec["startfrom"]))
    else:
        kwargs["begin_search"] = "unknown"
    if fk_type == "range":
        kwargs.update(find_keys="range", lastkey=int(fk_spec["lastkey"]),
                      keystep=int(fk_spec["keystep"]), limit=int(fk_spec["limit"]))
    elif fk_type == "keynum":
        kwargs.update(find_keys="keynum", keynumidx=int(fk_spec["keynumidx"]),
                      firstkey=int(fk_spec["firstkey"]), keystep=int(fk_spec["keystep"]))
    else:
        kwargs["find_keys"] = "unknown"
    return KeySpec(**kwargs)


def command_info_from_reply(entry: Sequence[Any], docs: Mapping[str, Any] | None = None,
                            parent: str | None = None) -> CommandInfo:
    """One element of a COMMAND (or COMMAND INFO) reply, decoded by any RESP2/3 client."""
    name = _text(entry[0]).lower()
    categories = frozenset(_text(c).lstrip("@").lower() for c in entry[6])
    specs = tuple(key_spec_from_reply(s) for s in (entry[8] if len(entry) > 8 else ()))
    doc = _as_map(docs.get(name, {})) if docs else {}
    info = CommandInfo(
        name=name, arity=int(entry[1]), flags=frozenset(_text(f).lower() for f in entry[2]),
        categories=categories, key_specs=specs, group=_text(doc.get("group", "")),
        parent=parent)
    subdocs = _as_map(doc.get("subcommands", {})) if doc else {}
    for sub_entry in entry[9] if len(entry) > 9 else ():
        sub = command_info_from_reply(sub_entry, subdocs, parent=name)
        info.subcommands[sub.name.partition("|")[2].encode()] = sub
    return info


def table_from_command_reply(reply: Sequence[Any], docs: Mapping[Any, Any] | None = None,
                             source: Mapping[str, Any] | None = None) -> CommandTable:
    """A whole table from `COMMAND` (and optionally `COMMAND DOCS`) replies."""
    docmap = _as_map(docs) if docs else {}
    docmap = {k.lower(): v for k, v in docmap.items()}
    infos = [command_info_from_reply(entry, docmap) for entry in reply]
    return CommandTable({c.name: c for c in infos}, source)


def extend_from_command_reply(table: CommandTable, reply: Sequence[Any]) -> list[str]:
    """Add the commands of a backend's `COMMAND` reply that `table` does not know.

    Changes `table` in place: pass `default_table().copy()`, never the shared default.
    Known commands are never replaced: the snapshot is what the policy was reviewed
    against. New subcommands of a known container are added. Returns the full names
    added (for the log and `Metrics.add_commands`). Compile the roles again afterwards
    (`compile_roles(..., table)`) so rules and categories apply to the new commands.
    """
    added: list[str] = []
    for entry in reply:
        info = command_info_from_reply(entry)
        known = table.commands.get(info.name)
        if known is None:
            table.add(info)
            added.append(info.name)
            added.extend(sub.name for sub in info.subcommands.values())
            continue
        for key, sub in info.subcommands.items():
            if key not in known.subcommands:
                known.subcommands[key] = sub
                added.append(sub.name)
    return added
