"""Key extraction: every key-spec shape and every hand-coded getkeys function.

Positions are argv indexes (argv[0] the command). `keys` is what Redis's ACL checks (the
integration test compares it with COMMAND GETKEYSANDFLAGS); `extra`/`located` mark what
phiproxy checks on top.
"""

from __future__ import annotations

import pytest

from proxy.commands.keys import (
    NO_KEYS,
    _apply_spec,
    atoi,
    extract_channels,
    extract_keys,
    has_keys,
    string2ll,
)
from proxy.commands.table import (
    KEY_ACCESS,
    KEY_DELETE,
    KEY_OW,
    KEY_RO,
    KEY_RW,
    KEY_UPDATE,
    KeySpec,
    default_table,
)

T = default_table()
RO = KEY_RO | KEY_ACCESS
OW = KEY_OW | KEY_UPDATE


def keys_of(*argv: bytes | str) -> list[tuple[bytes, int]]:
    args = [a.encode() if isinstance(a, str) else a for a in argv]
    result = extract_keys(T.lookup(args), args)
    return [(args[pos], flags) for pos, flags in result.keys]


def result_of(*argv: str):
    args = [a.encode() for a in argv]
    return extract_keys(T.lookup(args), args), args


def names(*argv: str) -> list[str]:
    return [k.decode() for k, _ in keys_of(*argv)]


# --------------------------------------------------------------------------- spec shapes


def test_single_index() -> None:
    assert keys_of("GET", "k") == [(b"k", RO)]


def test_range_to_the_end() -> None:
    assert names("MGET", "a", "b", "c") == ["a", "b", "c"]
    assert names("DEL", "a", "b") == ["a", "b"]


def test_range_with_keystep() -> None:
    assert names("MSET", "a", "1", "b", "2") == ["a", "b"]


def test_range_negative_lastkey_skips_the_timeout() -> None:
    assert names("BLPOP", "a", "b", "0") == ["a", "b"]


def test_two_index_specs() -> None:
    assert keys_of("LMOVE", "src", "dst", "LEFT", "RIGHT") == [
        (b"src", KEY_RW | KEY_ACCESS | KEY_DELETE),
        (b"dst", KEY_RW | 64)]  # insert


def test_keyword_forward_store() -> None:
    assert names("GEORADIUS", "k", "0", "0", "1", "m", "STORE", "dst") == ["k", "dst"]
    assert names("GEORADIUS", "k", "0", "0", "1", "m") == ["k"]  # keyword absent: no key
    assert names("GEORADIUSBYMEMBER", "k", "m", "1", "km", "storedist", "d") == ["k", "d"]


def test_keyword_is_not_searched_in_the_last_argument() -> None:
    assert names("GEORADIUS", "k", "0", "0", "1", "m", "STORE") == ["k"]


def test_keyword_with_limit_range() -> None:
    assert names("XREAD", "COUNT", "1", "STREAMS", "a", "b", "0", "0") == ["a", "b"]
    assert names("XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">") == ["s"]


def test_backward_keyword_and_negative_startfrom() -> None:
    # MIGRATE's KEYS spec: search backwards from argc-2; INCOMPLETE, so Redis (and we)
    # then use migrateGetKeys. The spec walk itself, checked directly:
    spec = KeySpec(flags=0, begin_search="keyword", keyword=b"keys", startfrom=-2,
                   find_keys="range", lastkey=-1)
    argv = [b"migrate", b"h", b"p", b"", b"0", b"5", b"KEYS", b"a", b"b"]
    out: list = []
    assert _apply_spec(spec, argv, out, []) == 0
    assert [argv[p] for p, _ in out] == [b"a", b"b"]
    argv = [b"x", b"keys", b"KEYS", b"a"]  # backwards: the last KEYS before argc-1 wins
    out = []
    _apply_spec(spec, argv, out, [])
    assert [p for p, _ in out] == [3]


def test_keynum() -> None:
    assert names("ZUNIONSTORE", "dst", "2", "a", "b", "WEIGHTS", "1", "2") == ["dst", "a", "b"]
    assert names("EVAL", "s", "2", "a", "b", "argv1") == ["a", "b"]
    assert names("FCALL", "f", "1", "k", "arg") == ["k"]
    assert names("ZINTERCARD", "2", "a", "b", "LIMIT", "1") == ["a", "b"]
    assert names("SINTERCARD", "1", "a") == ["a"]
    assert names("LMPOP", "2", "a", "b", "LEFT") == ["a", "b"]
    assert names("BLMPOP", "0", "1", "a", "LEFT") == ["a"]
    assert names("ZMPOP", "1", "a", "MIN") == ["a"]
    assert names("BZMPOP", "1", "2", "a", "b", "MAX") == ["a", "b"]
    assert names("ZUNION", "2", "a", "b") == ["a", "b"]


def test_eval_without_keys_is_not_malformed() -> None:
    result, _ = result_of("EVAL", "return 1", "0")
    assert result == NO_KEYS


@pytest.mark.parametrize("numkeys", ["x", "-1", ""])
def test_unparseable_numkeys_cannot_be_located(numkeys: str) -> None:
    result, _ = result_of("EVAL", "s", numkeys, "k")
    assert result.keys == () and not result.located


def test_numkeys_that_atoi_reads_redis_checks_with_empty_flags() -> None:
    # Redis falls back to evalGetKeys (atoi): it checks "k" with no flags; the command
    # then fails on "01". phiproxy also marks the keys unlocated.
    result, args = result_of("EVAL", "s", "01", "k")
    assert [(args[p], f) for p, f in result.keys] == [(b"k", 0)]
    assert not result.located


def test_numkeys_beyond_the_arguments() -> None:
    result, args = result_of("ZUNIONSTORE", "dst", "5", "a", "b")
    assert result.keys == ()  # Redis gives up and checks nothing...
    assert {args[p] for p, _ in result.extra} == {b"dst", b"a", b"b"}  # ...we check these
    assert result.located


def test_zero_numkeys_where_redis_requires_keys() -> None:
    result, args = result_of("ZUNIONSTORE", "dst", "0", "x")
    assert result.keys == () and {args[p] for p, _ in result.extra} == {b"dst", b"x"}


# --------------------------------------------------------------------------- getkeys functions


def test_sort_store_is_the_last_one_and_patterns_are_not_keys() -> None:
    assert keys_of("SORT", "k", "BY", "w_*", "GET", "#", "STORE", "a", "STORE", "b") == [
        (b"k", RO), (b"b", OW)]
    assert keys_of("SORT", "k", "LIMIT", "0", "1") == [(b"k", RO)]
    assert keys_of("SORT", "k", "GET", "store", "x") == [(b"k", RO)]  # GET's pattern "store"


def test_sort_ro_has_one_key() -> None:
    assert keys_of("SORT_RO", "k", "GET", "x", "STORE", "d") == [(b"k", RO)]


def test_migrate_single_key_and_keys_form() -> None:
    flags = KEY_RW | KEY_ACCESS | KEY_DELETE
    assert keys_of("MIGRATE", "h", "6379", "k", "0", "10") == [(b"k", flags)]
    assert names("MIGRATE", "h", "6379", "", "0", "10", "AUTH", "keys", "KEYS", "a", "b") == [
        "a", "b"]  # AUTH's password "keys" is skipped
    assert names("MIGRATE", "h", "1", "", "0", "10", "AUTH2", "u", "p", "COPY", "KEYS", "a") == [
        "a"]


def test_migrate_keys_with_a_key_argument_is_checked_whole() -> None:
    result, args = result_of("MIGRATE", "h", "1", "k", "0", "10", "KEYS", "a", "b")
    assert result.keys == ()  # Redis returns no keys (the command then fails)
    assert sorted(args[p] for p, _ in result.extra) == [b"a", b"b", b"k"]


def test_set_reads_the_key_only_with_get() -> None:
    assert keys_of("SET", "k", "v") == [(b"k", OW)]
    assert keys_of("SET", "k", "v", "EX", "10") == [(b"k", OW)]
    assert keys_of("SET", "k", "v", "get") == [(b"k", KEY_RW | KEY_ACCESS | KEY_UPDATE)]
    assert keys_of("SET", "k", "get") == [(b"k", OW)]  # the value "get" is not the option


def test_bitfield_is_read_only_with_only_get() -> None:
    rw = KEY_RW | KEY_ACCESS | KEY_UPDATE
    assert keys_of("BITFIELD", "k", "GET", "u8", "0") == [(b"k", RO)]
    assert keys_of("BITFIELD", "k", "OVERFLOW", "SAT", "GET", "u8", "0") == [(b"k", RO)]
    assert keys_of("BITFIELD", "k", "GET", "u8", "0", "SET", "u8", "0", "1") == [(b"k", rw)]
    assert keys_of("BITFIELD", "k", "bogus") == [(b"k", rw)]


# --------------------------------------------------------------------------- beyond Redis


def test_georadius_every_store_target_is_checked() -> None:
    # Redis 7.0 checks the first STORE and writes the last one.
    result, args = result_of("GEORADIUS", "k", "0", "0", "1", "m", "STORE", "a", "STORE", "b")
    assert [args[p] for p, _ in result.keys] == [b"k", b"a"]
    assert [args[p] for p, _ in result.extra] == [b"b"]


def test_xreadgroup_streams_found_by_the_command_parser() -> None:
    # The STREAMS key spec stops at a group named "streams"; the command reads "k".
    result, args = result_of("XREADGROUP", "GROUP", "g", "c", "GROUP", "streams", "x",
                             "STREAMS", "k", "0")
    assert [args[p] for p, _ in result.keys] == [b"x", b"STREAMS"]
    assert [args[p] for p, _ in result.extra] == [b"k"]


def test_xread_with_unbalanced_streams_checks_everything_after_streams() -> None:
    result, args = result_of("XREAD", "COUNT", "1", "STREAMS", "a")
    assert result.keys == ()
    assert [args[p] for p, _ in result.extra] == [b"a"]


# --------------------------------------------------------------------------- edges


def test_key_flags_without_access_need_no_permission() -> None:
    assert keys_of("EXISTS", "a", "b") == [(b"a", KEY_RO), (b"b", KEY_RO)]


@pytest.mark.parametrize("argv", [["GET"], ["SET"], ["LMOVE", "a"], ["SORT"], ["BITFIELD"],
                                  ["EVAL"], ["XREAD"], ["MIGRATE"], ["GEORADIUS"], ["MSET", "a"]])
def test_wrong_arity_never_indexes_past_argv(argv: list[str]) -> None:
    result, args = result_of(*argv)
    for pos, _ in result.keys + result.extra:
        assert pos < len(args)


def test_partial_keys_of_a_short_command() -> None:
    result, args = result_of("LMOVE", "a")
    assert result.keys == () and [args[p] for p, _ in result.extra] == [b"a"]


def test_not_key_specs_are_not_keys() -> None:
    assert not has_keys(T.get("ssubscribe"))
    assert not has_keys(T.get("spublish"))
    assert has_keys(T.get("sort")) and has_keys(T.get("get"))
    assert not has_keys(T.get("ping"))


def test_channels() -> None:
    def chans(*argv: str) -> list[int]:
        args = [a.encode() for a in argv]
        return list(extract_channels(T.lookup(args), args))

    assert chans("PUBLISH", "c", "msg") == [1]
    assert chans("SPUBLISH", "c", "msg") == [1]
    assert chans("SUBSCRIBE", "a", "b") == [1, 2]
    assert chans("PSUBSCRIBE", "a*") == [1]
    assert chans("SSUBSCRIBE", "a") == [1]
    assert chans("UNSUBSCRIBE", "a") == []  # Redis 7.0 checks no channel on unsubscribe
    assert chans("PUNSUBSCRIBE", "a") == []


@pytest.mark.parametrize("raw,value", [
    (b"0", 0), (b"12", 12), (b"-3", -3), (b"9223372036854775807", 2**63 - 1),
    (b"-9223372036854775808", -(2**63)), (b"01", None), (b"+1", None), (b" 1", None),
    (b"1 ", None), (b"", None), (b"-", None), (b"-0", None), (b"9223372036854775808", None),
    (b"1.0", None),
])
def test_string2ll_is_strict_like_redis(raw: bytes, value: int | None) -> None:
    assert string2ll(raw) == value


@pytest.mark.parametrize("raw,value", [
    (b"12", 12), (b" 12x", 12), (b"-3", -3), (b"+4", 4), (b"x", 0), (b"", 0),
    (b"01", 1), (b"4294967297", 1), (b"99999999999999999999", -1), (b"1\x002", 1),
])
def test_atoi_is_c_atoi(raw: bytes, value: int) -> None:
    assert atoi(raw) == value


def test_numkeys_command_too_short_to_have_keys() -> None:
    result, args = result_of("EVAL", "s")
    assert result.keys == () and result.extra == () and result.located
    result, args = result_of("ZUNIONSTORE", "dst")
    assert [args[p] for p, _ in result.extra] == [b"dst"] and result.located
