"""`explain`'s JSON object (SPEC §2) and redis-cli word splitting."""

from __future__ import annotations

import json

import pytest

from proxy.config import RoleConfig
from proxy.policy.engine import compile_roles
from proxy.policy.explain import explain_command, split_args, split_like_redis_cli

ROLES = compile_roles({
    "reader": RoleConfig("reader", "+@read -@dangerous ~app:phi:*"),
    "writer": RoleConfig("writer", "+@read +@write ~app:phi:*"),
})


def explain(role: str, *argv: str) -> dict:
    out = explain_command(role, ROLES[role], [a.encode() for a in argv])
    json.dumps(out)  # one JSON object per line
    return out


def test_allow() -> None:
    out = explain("reader", "GET", "app:phi:1")
    assert set(out) == {"command", "decision", "reason", "rule", "extra"}
    assert out["command"] == ["GET", "app:phi:1"]
    assert (out["decision"], out["rule"], out["extra"]) == ("allow", "+@read", None)
    assert "~app:phi:*" in out["reason"] and "reader" in out["reason"]


def test_deny_by_rule() -> None:
    out = explain("reader", "KEYS", "*")
    assert (out["decision"], out["rule"], out["extra"]) == ("deny", "-@dangerous", None)


def test_deny_by_key() -> None:
    out = explain("reader", "GET", "other")
    assert (out["decision"], out["rule"], out["extra"]) == ("deny", None, None)
    assert "'other'" in out["reason"]


def test_deny_by_extra() -> None:
    out = explain("writer", "FLUSHALL")
    assert (out["decision"], out["rule"], out["extra"]) == ("deny", "+@write", "dangerous")
    assert "+flushall" in out["reason"]


def test_unknown_command() -> None:
    out = explain("reader", "NOSUCH")
    assert (out["decision"], out["extra"]) == ("deny", "unknown_command")


@pytest.mark.parametrize("line,words", [
    ("GET app:phi:1", ["GET", "app:phi:1"]),
    ("  SET   k   v  ", ["SET", "k", "v"]),
    ('SET k "hello world"', ["SET", "k", "hello world"]),
    ('SET k "a\\nb\\tc\\"d\\\\"', ["SET", "k", 'a\nb\tc"d\\']),
    ('SET k "\\x41\\x7a"', ["SET", "k", "Az"]),
    ("SET k 'it''s'", None),  # a closing quote must end the word
    ("SET k 'it\\'s'", ["SET", "k", "it's"]),
    ("SET k 'a\\nb'", ["SET", "k", "a\\nb"]),  # no escapes in single quotes but \'
    ('SET k ""', ["SET", "k", ""]),
    ('SET k"x" v', ["SET", "kx", "v"]),  # a quote can open mid-word
    ('SET k "unterminated', None),
    ("", []),
    ("\t\n", []),
])
def test_split_like_redis_cli(line: str, words: list[str] | None) -> None:
    if words is None:
        with pytest.raises(ValueError):
            split_like_redis_cli(line)
    else:
        assert split_like_redis_cli(line) == words


def test_split_keeps_arbitrary_bytes() -> None:
    assert split_args(b'SET k "\\xff\\x00"') == [b"SET", b"k", b"\xff\x00"]
    (word,) = split_like_redis_cli('"\\xff"')
    assert word.encode("utf-8", "surrogateescape") == b"\xff"


def test_vertical_tab_is_part_of_an_unquoted_word_like_sds() -> None:
    assert split_args(b"a\vb c") == [b"a\vb", b"c"]
