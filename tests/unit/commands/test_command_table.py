"""The command table snapshot: loading, lookups, JSON round trip, learning from a backend."""

from __future__ import annotations

import copy

import pytest

from proxy.commands.table import (
    ACL_READ,
    ACL_RW,
    ACL_WRITE,
    KEY_ACCESS,
    KEY_DELETE,
    KEY_INSERT,
    KEY_OW,
    KEY_RM,
    KEY_RO,
    KEY_RW,
    KEY_UPDATE,
    TABLE_PATH,
    CommandTable,
    acl_permission,
    command_info_from_reply,
    default_table,
    extend_from_command_reply,
)


@pytest.fixture()
def table() -> CommandTable:
    return CommandTable.from_json(TABLE_PATH.read_text())


def test_snapshot_is_redis_7_and_complete(table: CommandTable) -> None:
    assert table.source["redis_version"].startswith("7.")
    assert len(table) > 300
    for name in ("get", "set", "eval", "xreadgroup", "config|get", "client|kill", "acl|setuser"):
        assert table.get(name) is not None, name


def test_default_table_is_loaded_once() -> None:
    assert default_table() is default_table()


def test_json_round_trip_is_byte_identical(table: CommandTable) -> None:
    assert table.to_json() == TABLE_PATH.read_text()


def test_get_fields(table: CommandTable) -> None:
    get = table.get("GET")
    assert get is not None
    assert (get.arity, get.parent, get.group) == (2, None, "string")
    assert {"readonly", "fast"} <= get.flags
    assert get.categories == {"read", "string", "fast"}
    (spec,) = get.key_specs
    assert (spec.begin_search, spec.index, spec.find_keys, spec.lastkey) == ("index", 1, "range", 0)
    assert spec.flags == KEY_RO | KEY_ACCESS


def test_subcommands(table: CommandTable) -> None:
    config = table.get("config")
    assert config is not None and config.is_container
    sub = table.get("CONFIG|Get")
    assert sub is not None and sub.name == "config|get" and sub.parent == "config"
    assert "admin" in sub.categories


@pytest.mark.parametrize("name", ["config|", "config|nosuch", "get|x", "config|get|x", "nosuch",
                                  "|get"])
def test_get_is_strict_like_redis(table: CommandTable, name: str) -> None:
    assert table.get(name) is None


def test_lookup_resolves_subcommands_any_case(table: CommandTable) -> None:
    assert table.lookup([b"CoNfIg", b"gEt", b"x"]).name == "config|get"
    assert table.lookup([b"config"]).name == "config"  # the container itself (arity error later)
    assert table.lookup([b"config", b"nosuch"]) is None
    assert table.lookup([b"nosuch"]) is None
    assert table.lookup([b"GET", b"k"]).name == "get"


def test_iteration_covers_subcommands(table: CommandTable) -> None:
    names = [c.name for c in table]
    assert len(names) == len(set(names)) == len(table)
    assert "client|list" in names and "client" in names


@pytest.mark.parametrize("flags,perm", [
    (KEY_RO | KEY_ACCESS, ACL_READ),
    (KEY_OW | KEY_UPDATE, ACL_WRITE),
    (KEY_RW | KEY_ACCESS | KEY_DELETE, ACL_RW),
    (KEY_RW | KEY_ACCESS | KEY_INSERT, ACL_RW),
    (KEY_RM | KEY_DELETE, ACL_WRITE),
    (KEY_RO, 0),  # EXISTS, TOUCH, WATCH: Redis consults only access/insert/delete/update
    (0, 0),
])
def test_acl_permission_follows_redis(flags: int, perm: int) -> None:
    assert acl_permission(flags) == perm


# A module command and a new subcommand, as a backend's COMMAND reply decodes them.
RESP3_REPLY = [
    [b"mymod.get", 2, [b"readonly", b"module"], 1, 1, 1, [b"@read"], [],
     [{b"flags": [b"RO", b"access"],
       b"begin_search": {b"type": b"index", b"spec": {b"index": 1}},
       b"find_keys": {b"type": b"range", b"spec": {b"lastkey": 0, b"keystep": 1, b"limit": 0}}}],
     []],
    [b"config", -2, [], 0, 0, 0, [b"@slow"], [], [],
     [[b"config|frobnicate", 2, [b"admin"], 0, 0, 0, [b"@admin", b"@slow"], [], [], []]]],
    [b"get", 3, [b"write"], 1, 1, 1, [b"@write"], [], [], []],  # must not replace ours
]


def test_extend_adds_unknown_commands_only(table: CommandTable) -> None:
    before = table.get("get")
    added = extend_from_command_reply(table, RESP3_REPLY)
    assert added == ["mymod.get", "config|frobnicate"]
    assert table.get("get") is before
    mod = table.get("mymod.get")
    assert mod is not None and mod.is_module and mod.key_specs[0].flags == KEY_RO | KEY_ACCESS
    assert table.lookup([b"MYMOD.GET", b"k"]) is mod
    assert table.get("config|frobnicate").parent == "config"
    assert extend_from_command_reply(table, RESP3_REPLY) == []


def test_learning_extends_a_copy_and_never_the_shared_default() -> None:
    shared = default_table()
    size, config_subs = len(shared), set(shared.get("config").subcommands)
    learned = shared.copy()
    assert extend_from_command_reply(learned, RESP3_REPLY) == ["mymod.get", "config|frobnicate"]
    assert learned.get("mymod.get") is not None and learned.get("config|frobnicate") is not None
    # default_table() is cached: a change would reach every later caller (reload, metrics)
    assert default_table() is shared and len(shared) == size
    assert shared.get("mymod.get") is None and shared.lookup([b"MYMOD.GET", b"k"]) is None
    assert shared.get("config|frobnicate") is None
    assert set(shared.get("config").subcommands) == config_subs
    assert len(learned) == size + 2 and learned.get("get") is shared.get("get")


def test_extend_reads_resp2_flat_maps(table: CommandTable) -> None:
    reply = copy.deepcopy(RESP3_REPLY[:1])
    reply[0][0] = b"mymod.get2"
    reply[0][8] = [[b"flags", [b"RW", b"update"],
                    b"begin_search", [b"type", b"keyword", b"spec", [b"keyword", b"KEYS",
                                                                    b"startfrom", -2]],
                    b"find_keys", [b"type", b"keynum", b"spec", [b"keynumidx", 0,
                                                                b"firstkey", 1, b"keystep", 1]]]]
    extend_from_command_reply(table, reply)
    (spec,) = table.get("mymod.get2").key_specs
    assert (spec.begin_search, spec.keyword, spec.startfrom) == ("keyword", b"keys", -2)
    assert (spec.find_keys, spec.keynumidx, spec.firstkey) == ("keynum", 0, 1)
    assert spec.flags == KEY_RW | KEY_UPDATE


def test_command_info_from_reply_handles_unknown_specs() -> None:
    entry = [b"x", -2, [], 0, 0, 0, [], [],
             [{b"flags": [b"RO"], b"begin_search": {b"type": b"unknown", b"spec": {}},
               b"find_keys": {b"type": b"unknown", b"spec": {}}}], []]
    info = command_info_from_reply(entry)
    assert info.key_specs[0].begin_search == "unknown"
    assert info.key_specs[0].find_keys == "unknown"
