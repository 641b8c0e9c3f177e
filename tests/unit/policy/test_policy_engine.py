"""decide(): Redis 7 ACL semantics, the stricter extras of SPEC §4, the fast plans."""

from __future__ import annotations

import random

import pytest

from proxy.commands.table import default_table
from proxy.config import ConfigError, RoleConfig
from proxy.policy.decision import Decision
from proxy.policy.engine import CompiledRole, compile_roles, decide, evaluate

NOPERM_KEY = b"-NOPERM this user has no permissions to access one of the keys used as arguments\r\n"
NOPERM_CHANNEL = (b"-NOPERM this user has no permissions to access one of the channels used as "
                  b"arguments\r\n")


def role(acl: str, dbs: tuple[int, ...] | None = None) -> CompiledRole:
    return compile_roles({"r": RoleConfig("r", acl, dbs)})["r"]


def run(r: CompiledRole, *argv: str | bytes) -> Decision:
    args = [a.encode() if isinstance(a, str) else a for a in argv]
    decision = decide(r, args)
    assert decision == evaluate(r, args).decision  # the fast plans agree with the reference
    return decision


def noperm_command(name: str) -> bytes:
    return f"-NOPERM this user has no permissions to run the '{name}' command\r\n".encode()


# --------------------------------------------------------------------------- Redis semantics

READER = "+@read -@dangerous ~app:phi:*"


def test_allowed_get() -> None:
    d = run(role(READER), "GET", "app:phi:1")
    assert d.allowed and d.command == "get" and d.rule == "+@read" and d.extra is None
    assert d.keys == (b"app:phi:1",) and d.error == b"" and d.reply_filter is None


def test_key_outside_the_patterns() -> None:
    d = run(role(READER), "GET", "other")
    assert not d.allowed and d.error == NOPERM_KEY and d.extra is None
    assert d.reason == NOPERM_KEY[1:-2].decode() and d.keys == (b"other",)


def test_command_not_granted() -> None:
    d = run(role(READER), "SET", "app:phi:1", "v")
    assert not d.allowed and d.error == noperm_command("set") and d.extra is None


def test_subcommand_names_in_refusals() -> None:
    d = run(role(READER), "CONFIG", "GET", "maxmemory")
    assert d.command == "config|get" and d.error == noperm_command("config|get")
    assert d.rule == "-@dangerous"


def test_any_case_command_and_subcommand() -> None:
    r = role("+@read ~k* +config|get +@admin")
    assert run(r, "gEt", "k1").allowed
    assert run(r, "CoNfIg", "GeT", "x").allowed


def test_read_write_patterns() -> None:
    r = role("+@all %R~ro:* %W~wo:*")
    assert run(r, "GET", "ro:1").allowed and not run(r, "SET", "ro:1", "v").allowed
    assert run(r, "SET", "wo:1", "v").allowed and not run(r, "GET", "wo:1").allowed
    assert not run(r, "SET", "wo:1", "v", "GET").allowed  # SET ... GET also reads
    assert run(r, "EXISTS", "wo:1").allowed  # EXISTS needs no read or write permission
    assert not run(r, "LMOVE", "ro:1", "wo:1", "LEFT", "LEFT").allowed  # the source is written


def test_multi_key_commands_check_every_key() -> None:
    r = role("+@all ~app:*")
    assert run(r, "MSET", "app:1", "v", "app:2", "v").keys == (b"app:1", b"app:2")
    assert not run(r, "MSET", "app:1", "v", "other", "v").allowed
    assert not run(r, "DEL", "app:1", "other").allowed


def test_channels_follow_redis_7_0() -> None:
    r = role("+@pubsub &news.* &chat")
    assert run(r, "PUBLISH", "news.1", "m").allowed
    assert run(r, "PUBLISH", "other", "m").error == NOPERM_CHANNEL
    assert run(r, "SUBSCRIBE", "news.1", "chat").allowed
    assert not run(r, "SUBSCRIBE", "news.1", "other").allowed
    # A PSUBSCRIBE pattern must equal an allowed pattern literally.
    assert run(r, "PSUBSCRIBE", "news.*").allowed
    assert not run(r, "PSUBSCRIBE", "news.a*").allowed
    assert not run(r, "PSUBSCRIBE", "*").allowed
    assert run(r, "UNSUBSCRIBE", "other").allowed  # no channel check on unsubscribe
    assert run(role("+@pubsub allchannels"), "PSUBSCRIBE", "anything*").allowed


def test_no_channels_by_default() -> None:
    assert not run(role("+@pubsub"), "PUBLISH", "x", "m").allowed


def test_selectors_any_of_them_allows() -> None:
    r = role("+get ~a:* (+set ~b:*)")
    assert run(r, "GET", "a:1").allowed
    assert run(r, "SET", "b:1", "v").allowed
    assert not run(r, "SET", "a:1", "v").allowed  # the root selector has no SET
    assert not run(r, "GET", "b:1").allowed


def test_refusal_reports_the_most_specific_failure_like_redis() -> None:
    r = role("+get ~a:* (+set)")
    assert run(r, "GET", "x").error == NOPERM_KEY
    ev = evaluate(r, [b"GET", b"x"])
    assert (ev.denied_kind, ev.denied_arg) == ("key", b"x")


def test_first_argument_rules() -> None:
    r = role("+select|0")
    assert run(r, "SELECT", "0").allowed
    assert run(r, "SELECT", "0").rule == "+select|0"
    assert not run(r, "SELECT", "1").allowed


def test_no_auth_commands_are_never_checked_by_redis() -> None:
    r = role("+get ~k")
    for argv in (["AUTH", "x"], ["HELLO", "3"], ["QUIT"], ["RESET"]):
        assert run(r, *argv).allowed


def test_unknown_commands_and_subcommands() -> None:
    r = role("+@all ~* &*")
    d = run(r, "NOSUCH", "x")
    # Answered as Redis answers it (clients probe for features), still a refusal.
    assert not d.allowed and d.extra == "unknown_command"
    assert d.error == b"-ERR unknown command 'NOSUCH', with args beginning with: 'x' \r\n"
    d = run(r, "CONFIG", "NOSUCH")
    assert not d.allowed and d.extra == "unknown_command" and d.command == "config|nosuch"
    assert d.error == b"-ERR unknown subcommand 'NOSUCH'. Try CONFIG HELP.\r\n"


def test_unknown_command_name_is_sanitised() -> None:
    d = run(role("+@all"), b"bad\r\nname")
    assert b"\r\n" not in d.error[:-2]


def test_a_role_without_rules_refuses_everything() -> None:
    r = role("")
    assert run(r, "GET", "k").extra is None  # Redis refuses it too
    d = run(r, "HELLO", "3")  # Redis allows no_auth commands; an empty role does not
    assert not d.allowed and d.extra == "unknown_command"


def test_wrong_arity_is_forwarded_when_allowed_but_keys_are_still_checked() -> None:
    r = role(READER)
    assert run(r, "GET").allowed  # Redis answers the arity error itself
    assert run(r, "GET", "app:phi:1", "extra").allowed
    assert not run(r, "GET", "other", "extra").allowed
    assert not run(role("+@all ~app:*"), "LMOVE", "other").allowed


def test_container_without_subcommand() -> None:
    assert run(role("+config"), "CONFIG").allowed  # Redis: wrong number of arguments
    assert not run(role("+get"), "CONFIG").allowed


# --------------------------------------------------------------------------- extras


@pytest.mark.parametrize("acl,allowed", [
    ("+@write ~app:*", False),
    ("+@all ~app:*", True),
    ("allcommands", True),
    ("+flushall", True),
    ("+@dangerous", True),
    ("+@write +flushall", True),
    ("+flushall +@write", True),
    ("+@all -@dangerous +@write", False),
    ("+flushall -flushall +@keyspace", False),
])
def test_dangerous(acl: str, allowed: bool) -> None:
    d = run(role(acl), "FLUSHALL")
    assert d.allowed is allowed
    if not allowed:
        assert d.extra == "dangerous" and d.error == noperm_command("flushall")
        assert d.reason.startswith("dangerous: ")


def test_dangerous_admin_subcommands() -> None:
    assert run(role("+@admin"), "CONFIG", "SET", "x", "y").allowed
    assert run(role("+config|set"), "CONFIG", "SET", "x", "y").allowed
    assert run(role("+config"), "CONFIG", "SET", "x", "y").allowed  # the container by name
    d = run(role("+@slow"), "CONFIG", "SET", "x", "y")
    assert d.extra == "dangerous"
    assert run(role("+@slow"), "CONFIG", "HELP").allowed  # not @admin/@dangerous


def test_dangerous_keys_needs_a_name_grant_even_with_read() -> None:
    assert run(role("+@read ~*"), "KEYS", "*").extra == "dangerous"
    assert run(role("+@read +keys ~*"), "KEYS", "*").allowed


@pytest.mark.parametrize("acl,allowed", [
    ("+@all ~app:*", False),
    ("+@all allkeys", True),
    ("+@all +eval ~app:*", True),
    ("+@scripting ~app:*", True),
    ("+eval ~app:*", True),
])
def test_scripting(acl: str, allowed: bool) -> None:
    d = run(role(acl), "EVAL", "return 1", "1", "app:1")
    assert d.allowed is allowed
    if not allowed:
        assert d.extra == "scripting"


def test_scripting_covers_function_and_ro_forms() -> None:
    r = role("+@all ~app:*")
    assert run(r, "FCALL_RO", "f", "0").extra == "scripting"
    assert run(r, "EVALSHA_RO", "abc", "0").extra == "scripting"
    assert run(r, "FUNCTION", "LOAD", "code").extra == "scripting"
    assert run(role("+@all +function ~app:*"), "FUNCTION", "LOAD", "code").allowed


def test_keyspace_randomkey() -> None:
    assert run(role("+@all ~app:*"), "RANDOMKEY").extra == "keyspace"
    assert run(role("+@all allkeys"), "RANDOMKEY").allowed
    assert run(role("+@all %R~*"), "RANDOMKEY").allowed


@pytest.mark.parametrize("argv", [["MONITOR"], ["SLOWLOG", "GET"], ["SYNC"],
                                  ["PSYNC", "?", "-1"], ["CLUSTER", "GETKEYSINSLOT", "1", "1"]])
def test_keyspace_commands_that_reveal_other_keys(argv: list[str]) -> None:
    assert run(role("+@all ~app:*"), *argv).extra == "keyspace"
    assert run(role("+@all ~*"), *argv).allowed


def test_keyspace_filters_keys_and_scan() -> None:
    r = role("+@all ~app:* %R~ref:* %W~out:*")
    d = run(r, "KEYS", "*")
    assert d.allowed and d.reply_filter is r.keys_filter
    reply = b"*4\r\n$5\r\napp:1\r\n$5\r\nref:1\r\n$5\r\nout:1\r\n$6\r\nsecret\r\n"
    assert d.reply_filter(reply) == b"*2\r\n$5\r\napp:1\r\n$5\r\nref:1\r\n"
    d = run(r, "SCAN", "0", "MATCH", "*")
    assert d.reply_filter is r.scan_filter
    assert run(role("+@all ~*"), "KEYS", "*").reply_filter is None


def test_keyspace_pubsub_channels_filter() -> None:
    r = role("+@all ~app:* &news.*")
    d = run(r, "PUBSUB", "CHANNELS")
    reply = b"*3\r\n$6\r\nnews.1\r\n$4\r\nchat\r\n$21\r\n__keyspace@0__:secret\r\n"
    assert d.reply_filter(reply) == b"*1\r\n$6\r\nnews.1\r\n"
    r = role("+@all ~app:* &*")
    reply = b"*2\r\n$20\r\n__keyspace@0__:app:1\r\n$21\r\n__keyspace@0__:secret\r\n"
    assert run(r, "PUBSUB", "SHARDCHANNELS").reply_filter(reply) == \
        b"*1\r\n$20\r\n__keyspace@0__:app:1\r\n"
    assert run(role("+@all ~* &*"), "PUBSUB", "CHANNELS").reply_filter is None


def test_keyspace_notifications() -> None:
    r = role("+@all ~app:* &*")
    assert run(r, "SUBSCRIBE", "__keyspace@0__:app:1").allowed
    assert run(r, "SUBSCRIBE", "__keyspace@0__:secret").extra == "keyspace"
    assert run(r, "SUBSCRIBE", "__keyevent@0__:set").extra == "keyspace"
    assert run(r, "PSUBSCRIBE", "__keyspace@0__:app:*").allowed
    assert run(r, "PSUBSCRIBE", "__keyspace@0__:app:phi:*").allowed
    assert run(r, "PSUBSCRIBE", "__keyspace@*__:app:*").extra == "keyspace"
    assert run(r, "PSUBSCRIBE", "*").extra == "keyspace"
    assert run(r, "PSUBSCRIBE", "__key*").extra == "keyspace"
    assert run(r, "PSUBSCRIBE", "news.*").allowed
    assert run(role("+@all ~* &*"), "PSUBSCRIBE", "*").allowed


def test_keyspace_client_tracking_bcast() -> None:
    r = role("+@all ~app:*")
    assert run(r, "CLIENT", "TRACKING", "on").allowed
    assert run(r, "CLIENT", "TRACKING", "on", "BCAST").extra == "keyspace"
    assert run(r, "CLIENT", "TRACKING", "on", "BCAST", "PREFIX", "app:x").allowed
    assert run(r, "CLIENT", "TRACKING", "on", "BCAST", "PREFIX", "ap").extra == "keyspace"


@pytest.mark.parametrize("args,allowed", [
    (["BY", "w_*"], False),
    (["BY", "nosort"], True),  # no '*': Redis looks nothing up
    (["GET", "#"], False),  # Redis refuses any GET without full read access
    (["GET", "o_*", "STORE", "app:d"], False),
    (["LIMIT", "0", "1", "ALPHA"], True),
    (["STORE", "app:d"], True),
])
def test_sort_pattern(args: list[str], allowed: bool) -> None:
    d = run(role("+@all ~app:*"), "SORT", "app:list", *args)
    assert d.allowed is allowed
    if not allowed:
        assert d.extra == "sort_pattern"
    assert run(role("+@all %R~* ~app:*"), "SORT", "app:list", *args).allowed
    assert run(role("+@all ~app:*"), "SORT_RO", "app:list", *args[:2]).allowed is \
        (allowed or args[0] == "STORE")


def test_db_restrictions() -> None:
    r = role("+@all ~*", dbs=(0, 2))
    assert run(r, "SELECT", "2").allowed
    assert run(r, "SELECT", "1").extra == "db"
    assert run(r, "SELECT", "02").extra == "db"  # not a number Redis would take
    assert run(r, "MOVE", "k", "2").allowed
    assert run(r, "MOVE", "k", "3").extra == "db"
    assert run(r, "COPY", "a", "b").allowed
    assert run(r, "COPY", "a", "b", "DB", "2", "REPLACE").allowed
    assert run(r, "COPY", "a", "b", "REPLACE", "DB", "5").extra == "db"
    assert run(r, "SWAPDB", "0", "2").allowed
    assert run(r, "SWAPDB", "0", "1").extra == "db"
    assert run(r, "FLUSHALL").extra == "db"  # it empties databases outside the role's
    assert run(r, "FLUSHDB").allowed
    assert run(r, "MIGRATE", "h", "1", "k", "7", "10").extra == "db"
    assert run(r, "RESET").allowed  # back to database 0, one of the role's
    assert run(role("+@all ~*", dbs=(1,)), "RESET").extra == "db"
    assert run(r, "EVAL", "return redis.call('SELECT', 5)", "0").extra == "db"
    assert run(role("+@all ~*"), "SELECT", "15").allowed
    assert run(role("+@all ~*"), "EVAL", "return 1", "0").allowed


def test_unchecked_keys() -> None:
    r = role("+@all ~k* ~a*")
    d = run(r, "GEORADIUS", "k", "0", "0", "1", "m", "STORE", "a", "STORE", "b")
    assert not d.allowed and d.extra == "unchecked_keys" and d.keys == (b"k", b"a", b"b")
    assert run(r, "GEORADIUS", "k", "0", "0", "1", "m", "STORE", "a", "STORE", "a2").allowed
    assert run(role("+@all +eval ~k*"), "EVAL", "s", "x", "k").extra == "unchecked_keys"
    assert run(role("+@all allkeys"), "EVAL", "s", "x", "k").allowed
    d = run(r, "XREADGROUP", "GROUP", "g", "c", "GROUP", "streams", "a", "STREAMS", "k", "0")
    assert d.allowed is False and d.extra is None  # Redis refuses "STREAMS" as a key here


# --------------------------------------------------------------------------- audit fields


@pytest.mark.parametrize("argv,sensitive", [
    (["KEYS", "*"], True), (["SCAN", "0"], True), (["FLUSHALL"], True), (["FLUSHDB"], True),
    (["SWAPDB", "0", "1"], True), (["MONITOR"], True), (["RANDOMKEY"], True),
    (["EVAL", "s", "0"], True), (["FCALL", "f", "0"], True), (["DEBUG", "SLEEP", "0"], True),
    (["MIGRATE", "h", "1", "k", "0", "1"], True), (["SORT", "k", "BY", "w_*"], True),
    (["SORT", "k"], False), (["GET", "k"], False), (["PING"], False),
])
def test_keyless_sensitive(argv: list[str], sensitive: bool) -> None:
    assert run(role("+@all ~* &*"), *argv).keyless_sensitive is sensitive


def test_denied_decisions_still_name_their_keys() -> None:
    assert run(role("+get ~a"), "SET", "app:1", "v").keys == (b"app:1",)


# --------------------------------------------------------------------------- compile_roles


def test_compile_roles_lists_every_problem_of_every_role() -> None:
    with pytest.raises(ConfigError) as caught:
        compile_roles({"a": RoleConfig("a", "+get foo"), "b": RoleConfig("b", "+nosuch nopass"),
                       "c": RoleConfig("c", "+@read")})
    problems = caught.value.problems
    assert len(problems) == 3
    assert problems[0].startswith("role 'a': unknown ACL token 'foo'")
    assert problems[1].startswith("role 'b': ACL token '+nosuch'")
    assert problems[2].startswith("role 'b': ACL token 'nopass'")


def test_compile_roles_returns_compiled_roles_by_name() -> None:
    roles = compile_roles({"reader": RoleConfig("reader", READER)})
    assert set(roles) == {"reader"} and roles["reader"].name == "reader"


# --------------------------------------------------------------------------- plans == reference


def test_plans_agree_with_evaluate_on_random_commands() -> None:
    rnd = random.Random(7)
    table = default_table()
    names = [c for c in table]
    acls = ["+@read ~app:*", "+@all ~app:* %R~ref:* &news.*", "+@write -@dangerous %W~out:*",
            "+get +set ~k* (+mget %R~ref:*)", "+@all allkeys -@dangerous", "+@all ~* &*",
            "+@string +@hash ~a* ~b* ~c*", "+select|0 +@read ~x"]
    words = [b"app:1", b"ref:1", b"out:1", b"k1", b"a", b"x", b"0", b"1", b"GET", b"STORE",
             b"news.1", b"other", b"2", b"-1"]
    roles_ = [role(a) for a in acls] + [role("+@all ~app:*", dbs=(0,))]
    for _ in range(20000):
        cmd = rnd.choice(names)
        head = [cmd.parent.encode(), cmd.name.partition("|")[2].encode()] if cmd.parent \
            else [cmd.name.encode()]
        if rnd.random() < 0.3:
            head = [h.upper() for h in head]
        argv = head + [rnd.choice(words) for _ in range(rnd.randint(0, 6))]
        r = rnd.choice(roles_)
        assert decide(r, argv) == evaluate(r, argv).decision, (r, argv)


def test_empty_argv_is_refused_not_crashed() -> None:
    d = decide(role("+@all ~*"), [])
    assert not d.allowed and d.extra == "unknown_command"


def test_learned_commands_after_recompiling() -> None:
    from proxy.commands.table import TABLE_PATH, CommandTable, extend_from_command_reply

    table = CommandTable.from_json(TABLE_PATH.read_text())
    extend_from_command_reply(table, [
        [b"mod.get", 2, [b"readonly", b"module"], 1, 1, 1, [b"@read"], [],
         [{b"flags": [b"RO", b"access"],
           b"begin_search": {b"type": b"index", b"spec": {b"index": 1}},
           b"find_keys": {b"type": b"range", b"spec": {b"lastkey": 0, b"keystep": 1,
                                                        b"limit": 0}}}], []],
        [b"mod.movable", -1, [b"module", b"movablekeys"], 0, 0, 0, [], [], [], []],
        [b"mod.odd", 2, [b"module"], 0, 0, 0, [], [],
         [{b"flags": [b"RO", b"access"],
           b"begin_search": {b"type": b"index", b"spec": {b"index": 5}},
           b"find_keys": {b"type": b"range", b"spec": {b"lastkey": 0, b"keystep": 1,
                                                        b"limit": 0}}}], []],
    ])
    roles = compile_roles({"a": RoleConfig("a", "+@all ~app:*"),
                           "r": RoleConfig("r", "+@read ~app:*"),
                           "k": RoleConfig("k", "+@all allkeys")}, table)
    assert run(roles["a"], "MOD.GET", "app:1").allowed
    assert not run(roles["a"], "mod.get", "secret").allowed
    assert not run(roles["r"], "mod.get", "app:1").allowed  # categories skip module commands
    # Keys only the module could locate: refused without allkeys.
    assert run(roles["a"], "mod.movable", "app:1").extra == "unchecked_keys"
    assert run(roles["k"], "mod.movable", "x").allowed
    # A spec beyond the arity names no argument (Redis checks nothing either): no crash.
    assert run(roles["a"], "mod.odd", "x").keys == ()
