"""Values of protected keys through a real Session over fake transports: what reaches the
backend is ciphertext, what reaches the client is plaintext, in RESP2 and RESP3."""

from __future__ import annotations

import os

import pytest

from proxy.commands.table import default_table
from proxy.protect import resp
from proxy.protect.crypto import HASH, LIST, STRING, Cipher, associated, is_ciphertext
from proxy.protect.rules import Protection, make_rule
from proxy.protect.transform import CLASSES, PASS, TRANSFORM, Protector
from proxy.resp.request import RequestFramer
from tests.unit.session_harness import FakeRouter, cmd, make_session, sent, wire

KEY = os.urandom(32)
RULES = Protection((
    make_rule(0, ("app:phi:*",), encrypt=True, max_ttl_s=86400, default_ttl_s=3600),
    make_rule(1, ("app:ttl:*",), max_ttl_s=100),
))


def flags(name: str) -> frozenset[str]:
    cmd_info = default_table().commands.get(name.split("|")[0])
    if cmd_info is not None and "|" in name:
        cmd_info = cmd_info.subcommands.get(name)
    return frozenset(cmd_info.flags) if cmd_info is not None else frozenset()


def protector(plaintext_reads: str = "refuse") -> Protector:
    return Protector(RULES, Cipher({"k1": KEY}, "k1"), plaintext_reads, flags)


def setup():
    router = FakeRouter()
    session = make_session(router)
    session.ctx.protector = protector()
    return router, session


def backend_commands(router: FakeRouter) -> list[list[bytes]]:
    router.flush()
    framer = RequestFramer()
    return framer.feed(wire(router.shared.conn))


def reply(router: FakeRouter, data: bytes) -> None:
    router.shared.conn.data_received(data)


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def test_set_stores_ciphertext_with_the_default_ttl_and_get_returns_plaintext() -> None:
    router, session = setup()
    session.data_received(cmd("SET", "app:phi:p1", "MRN-1234"))
    sent_set, expire = backend_commands(router)
    assert sent_set[:2] == [b"SET", b"app:phi:p1"] and is_ciphertext(sent_set[2])
    assert b"MRN-1234" not in sent_set[2]
    assert expire == [b"EXPIRE", b"app:phi:p1", b"3600", b"NX"]  # same round trip
    reply(router, b"+OK\r\n:1\r\n")
    assert sent(session) == b"+OK\r\n"  # the client sees only its own reply
    stored = sent_set[2]

    session.data_received(cmd("GET", "app:phi:p1"))
    assert backend_commands(router) == [[b"GET", b"app:phi:p1"]]
    reply(router, bulk(stored))
    assert sent(session) == bulk(b"MRN-1234")


def test_a_value_copied_to_another_key_is_an_error_not_another_patients_data() -> None:
    router, session = setup()
    cipher = Cipher({"k1": KEY}, "k1")
    other = cipher.encrypt(b"someone else", associated(STRING, b"app:phi:p2"))
    session.data_received(cmd("GET", "app:phi:p1"))
    backend_commands(router)
    reply(router, bulk(other))
    answer = sent(session)
    assert answer.startswith(b"-ERR phiproxy: the value at 'app:phi:p1' cannot be decrypted")
    assert b"someone else" not in answer


def test_plaintext_stored_before_protection_is_refused_by_default() -> None:
    router, session = setup()
    session.data_received(cmd("GET", "app:phi:old"))
    backend_commands(router)
    reply(router, bulk(b"legacy plaintext"))
    assert sent(session).startswith(b"-ERR phiproxy: the value stored at 'app:phi:old' is "
                                    b"not encrypted")
    session.ctx.protector = protector("pass")
    session.data_received(cmd("GET", "app:phi:old"))
    backend_commands(router)
    reply(router, bulk(b"legacy plaintext"))
    assert sent(session) == bulk(b"legacy plaintext")


def test_mget_decrypts_protected_keys_and_leaves_others() -> None:
    router, session = setup()
    cipher = Cipher({"k1": KEY}, "k1")
    a = cipher.encrypt(b"A", associated(STRING, b"app:phi:a"))
    session.data_received(cmd("MGET", "app:phi:a", "plain", "app:phi:missing"))
    backend_commands(router)
    reply(router, b"*3\r\n" + bulk(a) + bulk(b"p") + b"$-1\r\n")
    assert sent(session) == b"*3\r\n" + bulk(b"A") + bulk(b"p") + b"$-1\r\n"


@pytest.mark.parametrize("proto", [2, 3])
def test_hash_values_are_bound_to_their_field_and_hgetall_hvals_decrypt(proto: int) -> None:
    router, session = setup()
    session.data_received(cmd("HSET", "app:phi:h", "name", "Ada", "dob", "1815"))
    (hset, expire) = backend_commands(router)
    assert is_ciphertext(hset[3]) and is_ciphertext(hset[5]) and expire[0] == b"EXPIRE"
    reply(router, b":2\r\n:1\r\n")
    assert sent(session) == b":2\r\n"
    name, dob = hset[3], hset[5]
    if proto == 3:
        pairs = b"%2\r\n" + bulk(b"name") + bulk(name) + bulk(b"dob") + bulk(dob)
    else:
        pairs = b"*4\r\n" + bulk(b"name") + bulk(name) + bulk(b"dob") + bulk(dob)
    session.data_received(cmd("HGETALL", "app:phi:h"))
    backend_commands(router)
    reply(router, pairs)
    expected_head = b"%2\r\n" if proto == 3 else b"*4\r\n"
    assert sent(session) == expected_head + bulk(b"name") + bulk(b"Ada") + bulk(b"dob") + \
        bulk(b"1815")
    # HVALS: values alone cannot be decrypted; the proxy asks for the fields too.
    session.data_received(cmd("HVALS", "app:phi:h"))
    assert backend_commands(router) == [[b"HGETALL", b"app:phi:h"]]
    reply(router, pairs)
    assert sent(session) == b"*2\r\n" + bulk(b"Ada") + bulk(b"1815")
    # A value moved to another field does not decrypt there.
    session.data_received(cmd("HGET", "app:phi:h", "dob"))
    backend_commands(router)
    reply(router, bulk(name))
    assert sent(session).startswith(b"-ERR phiproxy:")


def test_list_elements_move_between_lists_of_the_same_rule() -> None:
    router, session = setup()
    session.data_received(cmd("RPUSH", "app:phi:queue", "job-1"))
    (push, _expire) = backend_commands(router)
    element = push[2]
    assert is_ciphertext(element)
    reply(router, b":1\r\n:1\r\n")
    sent(session)
    session.data_received(cmd("LMOVE", "app:phi:queue", "app:phi:work", "LEFT", "RIGHT"))
    moved = backend_commands(router)
    assert moved[0][0] == b"LMOVE" and [c[1] for c in moved[1:]] == [b"app:phi:queue",
                                                                      b"app:phi:work"]
    reply(router, bulk(element) + b":0\r\n:1\r\n")  # LMOVE, then the two EXPIRE NX
    assert sent(session) == bulk(b"job-1")
    # The element is bound to the rule: it decrypts in the other list too.
    session.data_received(cmd("LRANGE", "app:phi:work", "0", "-1"))
    backend_commands(router)
    reply(router, b"*1\r\n" + bulk(element))
    assert sent(session) == b"*1\r\n" + bulk(b"job-1")
    assert Cipher({"k1": KEY}, "k1").decrypt(
        element, associated(LIST, RULES.rules[0].list_binding)) == b"job-1"
    # ... but not out of its rule's keys.
    session.data_received(cmd("LMOVE", "app:phi:queue", "elsewhere", "LEFT", "RIGHT"))
    assert sent(session).startswith(b"-ERR phiproxy: 'LMOVE' is refused on protected key")


@pytest.mark.parametrize(("command", "why"), [
    (("INCR", "app:phi:n"), b"computes on the stored value"),
    (("APPEND", "app:phi:s", "x"), b"computes on the stored value"),
    (("SADD", "app:phi:set", "m"), b"compares members"),
    (("RENAME", "app:phi:a", "app:phi:b"), b"would move a value"),
    (("EVAL", "return 1", "1", "app:phi:a"), b"runs a script"),
    (("DUMP", "app:phi:a"), b"reads or writes the stored bytes"),
])
def test_commands_that_would_break_the_invariants_are_refused_naming_key_and_rule(
        command: tuple[str, ...], why: bytes) -> None:
    router, session = setup()
    session.data_received(cmd(*command))
    router.flush()
    assert wire(router.shared.conn) == b""  # nothing reached Redis
    answer = sent(session)
    assert answer.startswith(b"-ERR phiproxy: '%s' is refused on protected key '"
                             % command[0].encode())
    assert b"[[protect]] #1 (app:phi:*)" in answer and why in answer


@pytest.mark.parametrize("command", [
    ("EXPIRE", "app:phi:a", "86401"), ("PEXPIRE", "app:ttl:a", "100001"),
    ("SET", "app:phi:a", "v", "EX", "90000"), ("SETEX", "app:ttl:a", "101", "v"),
    ("PERSIST", "app:phi:a"), ("GETEX", "app:ttl:a", "PERSIST"),
    ("EXPIREAT", "app:ttl:a", "99999999999"),
])
def test_ttl_beyond_the_rule_and_persist_are_refused(command: tuple[str, ...]) -> None:
    router, session = setup()
    session.data_received(cmd(*command))
    router.flush()
    assert wire(router.shared.conn) == b""
    assert b"max_ttl_s" in sent(session)


def test_ttl_within_the_rule_passes_and_a_write_on_a_ttl_only_rule_gets_its_max() -> None:
    router, session = setup()
    session.data_received(cmd("EXPIRE", "app:ttl:a", "50") + cmd("SET", "app:ttl:b", "v"))
    assert backend_commands(router) == [
        [b"EXPIRE", b"app:ttl:a", b"50"], [b"SET", b"app:ttl:b", b"v"],
        [b"EXPIRE", b"app:ttl:b", b"100", b"NX"]]  # no default: the maximum


def test_every_command_of_the_table_is_classified() -> None:
    """A command Redis adds (and the table learns) cannot reach a protected key unclassified:
    keyed commands must be in CLASSES; unknown names are refused by `plan`."""
    from proxy.commands.keys import has_keys

    table = default_table()
    keyed = set()
    for info in table.commands.values():
        for sub in (info.subcommands.values() if info.subcommands else [info]):
            if has_keys(sub):
                keyed.add(sub.name)
    assert keyed - set(CLASSES) == set()
    assert set(CLASSES) - keyed == set()  # no stale names either
    assert {c for c in CLASSES.values()} >= {TRANSFORM, PASS}


def test_resp_tree_round_trips_every_shape() -> None:
    frames = [b"+OK\r\n", b"-ERR x\r\n", b":1\r\n", b"$-1\r\n", b"*-1\r\n", b"_\r\n",
              b"*2\r\n$1\r\na\r\n*1\r\n:2\r\n", b"%1\r\n$1\r\nk\r\n~1\r\n,1.5\r\n",
              b"|1\r\n+a\r\n+b\r\n", b"=7\r\ntxt:abc\r\n", b"#t\r\n", b"(12\r\n"]
    for frame in frames:
        assert resp.encode(resp.parse(frame)) == frame


def test_hash_field_ad_is_not_the_string_ad() -> None:
    assert associated(HASH, b"k", b"") != associated(STRING, b"k")


@pytest.mark.parametrize("proto", [2, 3])
async def test_a_transaction_on_protected_keys_gets_plaintext_in_execs_array(proto: int) -> None:
    router, session = setup()
    if proto == 3:
        session.data_received(cmd("HELLO", "3"))
        sent(session)
    session.data_received(cmd("MULTI") + cmd("SET", "app:phi:a", "secret") +
                          cmd("INCR", "counter") + cmd("GET", "app:phi:a") + cmd("EXEC"))
    router.flush()
    conn = router.conns[-1]  # MULTI pinned the client to a dedicated connection
    framer = RequestFramer()
    commands = [c for c in framer.feed(wire(conn)) if c[0] not in (b"HELLO", b"SELECT")]
    assert [c[0] for c in commands] == [b"MULTI", b"SET", b"EXPIRE", b"INCR", b"GET", b"EXEC"]
    stored = commands[1][2]
    assert is_ciphertext(stored)
    prefix = b"%1\r\n+proto\r\n:3\r\n" if proto == 3 else b""  # the HELLO 3 prefix
    conn.data_received(prefix + b"+OK\r\n" +
                       b"+QUEUED\r\n" * 4 +
                       b"*4\r\n+OK\r\n:1\r\n:7\r\n" + bulk(stored))
    answer = sent(session)
    # The client sees its own four replies, and EXEC's array without the proxy's EXPIRE.
    assert answer.endswith(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n"
                           b"*3\r\n+OK\r\n:7\r\n" + bulk(b"secret"))
    assert stored not in answer


async def test_a_discarded_transaction_does_not_shift_the_next_ones_elements() -> None:
    router, session = setup()
    session.data_received(cmd("MULTI") + cmd("SET", "app:phi:a", "x") + cmd("DISCARD") +
                          cmd("MULTI") + cmd("GET", "app:phi:a") + cmd("EXEC"))
    router.flush()
    conn = router.conns[-1]
    commands = RequestFramer().feed(wire(conn))
    assert [c[0] for c in commands] == [b"MULTI", b"SET", b"EXPIRE", b"DISCARD", b"MULTI",
                                        b"GET", b"EXEC"]
    stored = Cipher({"k1": KEY}, "k1").encrypt(b"x", associated(STRING, b"app:phi:a"))
    conn.data_received(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+OK\r\n" +  # first MULTI, DISCARD
                       b"+OK\r\n+QUEUED\r\n*1\r\n" + bulk(stored))
    assert sent(session) == (b"+OK\r\n+QUEUED\r\n+OK\r\n" +
                             b"+OK\r\n+QUEUED\r\n*1\r\n" + bulk(b"x"))


def test_the_readme_table_is_the_one_the_code_generates() -> None:
    from pathlib import Path

    from proxy.protect.transform import markdown_table

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert markdown_table() in readme


@pytest.mark.parametrize("command", [
    ("EVAL", "return redis.call('GET', 'app:phi:a')", "0"),
    ("SORT", "ids", "GET", "app:phi:*"),
])
def test_commands_that_reach_keys_they_do_not_name_are_refused_with_encryption(
        command: tuple[str, ...]) -> None:
    router, session = setup()
    session.data_received(cmd(*command))
    router.flush()
    assert wire(router.shared.conn) == b""
    assert b"may reach keys it does not name" in sent(session)


def test_an_error_reply_to_a_protected_read_passes_unchanged_and_counts_as_an_error() -> None:
    router, session = setup()
    session.data_received(cmd("GET", "app:phi:h") + cmd("GET", "app:phi:s"))
    assert backend_commands(router) == [[b"GET", b"app:phi:h"], [b"GET", b"app:phi:s"]]
    stored = Cipher({"k1": KEY}, "k1").encrypt(b"ok", associated(STRING, b"app:phi:s"))
    wrongtype = b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
    reply(router, wrongtype + bulk(stored))
    assert sent(session) == wrongtype + bulk(b"ok")
    assert session.counts["get"][:2] == [1, 1]  # one ok, one error


@pytest.mark.parametrize("command", [
    ("LMOVE", "app:phi:q"), ("HSET", "app:phi:h"), ("XADD", "app:phi:s"),
    ("LPUSH", "app:phi:q"), ("SETEX", "app:phi:a", "10"), ("HGET", "app:phi:h"),
])
def test_malformed_commands_on_protected_keys_never_break_the_session(
        command: tuple[str, ...]) -> None:
    router, session = setup()
    session.data_received(cmd(*command) + cmd("PING"))
    router.flush()
    framer = RequestFramer()
    sent_to_redis = framer.feed(wire(router.shared.conn))
    # Either refused here, or forwarded untouched for Redis to answer its arity error;
    # never plaintext values half-encrypted, and the session goes on.
    assert sent_to_redis[-1] == [b"PING"]
    for argv in sent_to_redis[:-1]:
        assert argv == [a.encode() for a in command] or argv[0] == b"EXPIRE"
