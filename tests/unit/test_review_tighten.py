"""Tightened rules (proxy/review/tighten.py) against the policy engine: they allow every use,
stay inside the role (selectors, key permissions, allkeys), and the review's helpers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from proxy.config import RoleConfig
from proxy.policy.engine import CompiledRole, compile_roles, evaluate
from proxy.review.evidence import Hours
from proxy.review.tighten import tighten, unused_grants, witness
from proxy.review.trail import parse_since
from proxy.review.usage import PatternIndex, command_label, reason_kind

PHI = ["app:phi:*"]


def role(acl: str, dbs: tuple[int, ...] | None = None) -> tuple[CompiledRole, RoleConfig]:
    config = RoleConfig("r", acl, dbs)
    return compile_roles({"r": config})["r"], config


def use(command: str, *keys: str, db: int = 0) -> dict:
    return {"command": command, "keys": keys, "db": db}


def compiled(rule: str) -> CompiledRole:
    return role(rule)[0]


def allows(r: CompiledRole, *argv: str) -> bool:
    return evaluate(r, [a.encode() for a in argv]).decision.allowed


def test_selectors_stay_apart() -> None:
    """A command allowed by a selector keeps that selector's keys only: flattening
    `+get ~a:* (+set ~b:*)` would grant SET on a:*, which the role does not."""
    r, cfg = role("+get +set ~a:* (+set ~b:*)")
    # SET on a:* is allowed by the root, SET on b:* by the selector
    t = tighten(r, cfg, [use("get", "a:1"), use("set", "b:1")], [])
    assert t.confirmed and t.rule == "+get ~a:* (+set ~b:*)"
    tight = compiled(t.rule)
    assert allows(tight, "set", "b:1", "v") and not allows(tight, "set", "a:1", "v")


def test_key_permissions_are_kept() -> None:
    r, cfg = role("+@read +@write %R~app:phi:* %W~app:log:*")
    t = tighten(r, cfg, [use("get", "app:phi:1"), use("set", "app:log:1")], PHI)
    assert t.confirmed
    tight = compiled(t.rule)
    assert not allows(tight, "set", "app:phi:1", "v")  # the role could only read it
    assert not allows(tight, "get", "app:log:1")


def test_allkeys_narrows_to_phi_patterns_unless_every_key_is_needed() -> None:
    r, cfg = role("+@all allkeys")
    t = tighten(r, cfg, [use("get", "app:phi:1"), use("flushall")], PHI)
    assert t.confirmed and set(t.rule.split()) == {"+get", "+flushall", "~app:phi:*"}
    t = tighten(r, cfg, [use("randomkey")], PHI)  # reveals any key name: needs allkeys
    assert t.confirmed and t.rule == "+randomkey allkeys"
    t = tighten(r, cfg, [use("mset", "app:phi:1", "other:1")], PHI)  # a key outside phi_keys
    assert t.confirmed and "allkeys" in t.rule.split()


def test_scripts_are_granted_by_name() -> None:
    r, cfg = role("+@all allkeys")
    t = tighten(r, cfg, [use("eval", "app:phi:1")], PHI)
    assert t.confirmed and set(t.rule.split()) == {"+eval", "~app:phi:*"}


def test_prefix_pattern_narrows_to_the_phi_pattern_inside_it() -> None:
    r, cfg = role("+@read ~app:*")
    t = tighten(r, cfg, [use("get", "app:phi:1"), use("get", "app:other:1")], PHI)
    assert t.confirmed and set(t.rule.split()) == {"+get", "~app:phi:*", "~app:*"}
    t = tighten(r, cfg, [use("get", "app:phi:1")], PHI)
    assert t.rule == "+get ~app:phi:*"


def test_unused_role_grants_nothing() -> None:
    r, cfg = role("+@all allkeys")
    t = tighten(r, cfg, [], PHI)
    assert t.rule == "nocommands resetkeys" and t.notes
    assert not allows(compiled(t.rule), "get", "app:phi:1")


def test_dbs_follow_use() -> None:
    r, cfg = role("+@read ~app:*", dbs=(0, 1, 2))
    t = tighten(r, cfg, [use("get", "app:phi:1", db=1)], PHI)
    assert t.dbs == [1]
    assert unused_grants(r, cfg, [use("get", "app:phi:1", db=1)])["dbs"] == [0, 2]
    # db 0 needs no SELECT, so a role limited to [3] may run there: never "every database"
    r, cfg = role("+@read ~app:*", dbs=(3,))
    assert tighten(r, cfg, [use("get", "app:phi:1", db=0)], PHI).dbs == [3]


@pytest.mark.parametrize("acl", [
    "+@read +@write +@keyspace -@dangerous ~app:* &notify:*",
    "+@all allkeys",
    "+@read ~app:phi:* %R~app:public:* (+set ~app:phi:w:*)",
    "+@all -@dangerous +flushdb %RW~app:* %R~*",
])
def test_never_wider_than_the_role(acl: str) -> None:
    """Whatever the tightened rule allows, the role allowed: every command of the table on
    keys inside and outside the patterns."""
    r, cfg = role(acl)
    uses = [use("get", "app:phi:1"), use("set", "app:phi:w:2"), use("hset", "app:phi:3"),
            use("del", "app:phi:4"), use("scan"), use("flushdb"), use("keys")]
    uses = [u for u in uses if witness(r, u["command"], u["keys"]) is not None]
    t = tighten(r, cfg, uses, PHI)
    assert t.confirmed, t
    tight = compiled(t.rule)
    checked = 0
    for info in r.table:
        if info.is_container:
            continue
        head = info.name.split("|")
        for key in ("app:phi:1", "app:phi:w:2", "app:public:1", "app:other:1", "x"):
            argv = head + [key] + ["0"] * max(0, abs(info.arity) - len(head) - 1)
            if allows(tight, *argv):
                checked += 1
                assert allows(r, *argv), (acl, t.rule, argv)
    assert checked >= len(uses)


def test_unused_grants_by_token() -> None:
    r, cfg = role("+@read +@write +flushdb ~app:phi:* %R~app:public:* &chan:*")
    unused = unused_grants(r, cfg, [use("get", "app:phi:1")])
    assert unused["commands"] == ["+@write", "+flushdb"]
    assert unused["key_patterns"] == ["%R~app:public:*"]
    assert unused["channels_not_recorded"] == ["&chan:*"]
    assert unused["used_commands"] == 1 and unused["granted_commands"] > 50


def test_pattern_labels_never_name_the_key() -> None:
    r, _ = role("+@read ~app:* %R~other:*")
    index = PatternIndex(r, PHI)
    assert index.labels("app:phi:1") == ["~app:*", "phi_keys app:phi:*"]
    assert index.labels("zzz") == ["(no pattern of the role)"]


@pytest.mark.parametrize(("reason", "kind"), [
    ("NOPERM this user has no permissions to access one of the keys used as arguments", "key"),
    ("NOPERM this user has no permissions to run the 'set' command", "command"),
    ("NOPERM this user has no permissions to access one of the channels used as arguments",
     "channel"),
    ("unchecked_keys: argument 'app:phi:secret' may be a key", "unchecked_keys"),
    ("keyspace: channel '__keyspace@0__:app:phi:x' carries key names", "keyspace"),
    ("disabled_command: 'debug' is disabled", "disabled_command"),
    ("key: something 'app:phi:x'", "other"),
    (None, "other"),
])
def test_reason_kind(reason: str | None, kind: str) -> None:
    assert reason_kind(reason) == kind


def test_since_and_hours() -> None:
    assert parse_since("30d").days == 30 and parse_since("90m").seconds == 5400
    for bad in ("30", "d", "-1d", "1w", "0d"):
        with pytest.raises(ValueError, match="--since"):
            parse_since(bad)
    hours = Hours.parse("07-19", "America/New_York")
    # 2026-12-02 (a Wednesday) 13:00 UTC is 08:00 in New York: usual hours
    assert not hours.after_hours(datetime(2026, 12, 2, 13, tzinfo=UTC))
    assert hours.after_hours(datetime(2026, 12, 2, 11, tzinfo=UTC))  # 06:00 local
    assert hours.after_hours(datetime(2026, 12, 5, 15, tzinfo=UTC))  # Saturday
    for bad, tz in (("19-07", "UTC"), ("7", "UTC"), ("07-25", "UTC"), ("07-19", "Mars/Base")):
        with pytest.raises(ValueError):
            Hours.parse(bad, tz)


def test_refused_command_names_never_carry_a_key() -> None:
    assert command_label("client|setinfo") == "client|setinfo"
    assert command_label("object|app:phi:123") == "object|?"
    assert command_label("app:phi:123") == "?"
    assert command_label("Get") == "?"  # records hold lower-case names; anything else is odd


@pytest.mark.parametrize(("command", "keys"), [
    ("get", ["app:phi:1"]), ("mset", ["app:phi:1", "app:phi:2"]),
    ("zunionstore", ["app:phi:d", "app:phi:1", "app:phi:2"]),
    ("sintercard", ["app:phi:1", "app:phi:2"]), ("lmpop", ["app:phi:1"]),
    ("blmpop", ["app:phi:1", "app:phi:2"]), ("xread", ["app:phi:s1", "app:phi:s2"]),
    ("xreadgroup", ["app:phi:s1"]), ("fcall", ["app:phi:1"]), ("hset", ["app:phi:1"]),
    ("config|get", []), ("scan", []), ("flushdb", []),
])
def test_witness_rebuilds_the_recorded_shape(command: str, keys: list[str]) -> None:
    """An argv that the engine resolves to exactly the recorded command and keys."""
    r, cfg = role("+@all allkeys")
    argv = witness(r, command, keys)
    assert argv is not None, command
    evaluation = evaluate(r, argv)
    assert evaluation.decision.command == command
    assert sorted(evaluation.decision.keys) == sorted(k.encode() for k in keys)
    assert tighten(r, cfg, [use(command, *keys)], PHI).confirmed
