"""The Redis 7 ACL rule parser: every token kind, Redis's quirks, errors naming role+token."""

from __future__ import annotations

import pytest

from proxy.commands.table import ACL_READ, ACL_RW, ACL_WRITE, default_table
from proxy.policy.acl import AclError, RoleRules, parse_role, split_rules

T = default_table()


def parse(acl: str) -> RoleRules:
    return parse_role("r", acl, T)


def root(acl: str):
    return parse(acl).selectors[0]


def errors(acl: str, name: str = "reader") -> list[str]:
    with pytest.raises(AclError) as caught:
        parse_role(name, acl, T)
    return caught.value.problems


# --------------------------------------------------------------------------- defaults


def test_a_fresh_role_has_nothing_like_a_fresh_redis_7_user() -> None:
    sel = root("")
    assert not sel.allowed or not any(sel.allowed.values())
    assert not sel.allkeys and not sel.keys
    assert not sel.allchannels and not sel.channels  # acl-pubsub-default resetchannels
    assert parse("").empty and not parse("on").empty


# --------------------------------------------------------------------------- commands


def test_category_grant_and_revoke_apply_left_to_right() -> None:
    sel = root("+@read -@dangerous")
    assert sel.permits("get") and sel.permits("mget")
    assert not sel.permits("keys")  # @read and @dangerous: revoked later
    assert sel.decided_by["keys"] == "-@dangerous"
    assert sel.decided_by["get"] == "+@read"
    sel = root("-@dangerous +@read")
    assert sel.permits("keys")  # the later grant wins


def test_command_then_category_revoke() -> None:
    sel = root("+get -@read")
    assert not sel.permits("get")
    sel = root("-@read +get")
    assert sel.permits("get")


def test_allcommands_and_nocommands() -> None:
    for token in ("allcommands", "+@all", "ALLCOMMANDS", "+@ALL"):
        sel = root(token)
        assert all(sel.permits(c.name) for c in T)
    assert not any(root("+@all nocommands").allowed.values())
    assert not any(root("+@all -@all").allowed.values())


def test_container_grant_covers_its_subcommands() -> None:
    sel = root("+config")
    assert sel.permits("config") and sel.permits("config|get") and sel.permits("config|set")
    sel = root("+config -config|set")
    assert sel.permits("config|get") and not sel.permits("config|set")


def test_subcommand_grant_alone() -> None:
    sel = root("+CONFIG|GET")
    assert sel.permits("config|get") and not sel.permits("config|set")
    assert not sel.permits("config")


def test_category_on_a_container_sets_every_subcommand_like_redis() -> None:
    # Containers are @slow in Redis 7, so +@slow grants all their subcommands.
    sel = root("+@slow")
    assert sel.permits("config|set") and sel.permits("client|kill")


def test_first_argument_rules() -> None:
    sel = root("+select|0 +select|1")
    assert not sel.permits("select")
    assert [arg for arg, _ in sel.firstargs["select"]] == [b"0", b"1"]
    assert "select" not in root("+select|0 -select").firstargs  # reset by a later rule
    assert "select" not in root("+select|0 +@all").firstargs
    assert "select" not in root("+select|0 -@connection").firstargs


def test_case_insensitive_names() -> None:
    assert root("+GeT").permits("get")
    assert root("+@ReAd").permits("get")
    assert root("AllKeys").allkeys


def test_explicit_grants_for_the_dangerous_extra() -> None:
    assert root("+flushall").explicit["flushall"]
    assert root("+@dangerous").explicit["flushall"]
    assert root("+@all").explicit["flushall"]
    assert not root("+@write").explicit["flushall"]
    assert root("+flushall +@write").explicit["flushall"]  # a later category keeps it
    assert not root("+flushall -@write +@write").explicit["flushall"]  # revoked, re-granted
    assert root("+@admin").explicit["config|set"]
    assert not root("+@slow").explicit["config|set"]


def test_scripting_grants() -> None:
    assert root("+eval").scripting["eval"]
    assert root("+@scripting").scripting["eval"]
    assert not root("+@all").scripting["eval"]  # +@all is not enough for scripting
    assert root("+eval +@all").scripting["eval"]  # ... nor does it revoke a grant
    assert not root("+eval -@all +@all").scripting["eval"]
    assert root("+function").scripting["function|load"]


# --------------------------------------------------------------------------- keys, channels


def test_key_patterns_and_permissions() -> None:
    sel = root("~app:* %R~ref:* %W~out:* %RW~both:* %wr~low:*")
    assert [(p.pattern, p.perm) for p in sel.keys] == [
        (b"app:*", ACL_RW), (b"ref:*", ACL_READ), (b"out:*", ACL_WRITE), (b"both:*", ACL_RW),
        (b"low:*", ACL_RW)]


def test_repeated_pattern_merges_permissions() -> None:
    sel = root("%R~k %W~k")
    assert [(p.pattern, p.perm) for p in sel.keys] == [(b"k", ACL_RW)]


def test_allkeys_resetkeys() -> None:
    assert root("allkeys").allkeys and root("~*").allkeys
    assert not root("%RW~*").allkeys  # a "*" pattern, not the allkeys flag (as in Redis)
    sel = root("~a allkeys")
    assert sel.allkeys and not sel.keys
    sel = root("allkeys resetkeys ~b")
    assert not sel.allkeys and [p.pattern for p in sel.keys] == [b"b"]


def test_channels() -> None:
    sel = root("&news.* &chat &chat")
    assert [p for p, _ in sel.channels] == [b"news.*", b"chat"]
    assert root("allchannels").allchannels and root("&*").allchannels
    assert not root("&* resetchannels").allchannels


# --------------------------------------------------------------------------- selectors


def test_selectors() -> None:
    rules = parse("+get ~a (+set ~b) (%R~c +@read)")
    assert len(rules.selectors) == 3
    first, second, third = rules.selectors
    assert first.root and not second.root
    assert second.permits("set") and not second.permits("get")
    assert [p.pattern for p in third.keys] == [b"c"]


def test_selector_tokens_are_merged_like_redis() -> None:
    assert split_rules("+get (+set ~b) ( +get )") == (["+get", "(+set ~b)", "( +get )"], None)
    assert split_rules("(+get ~x") == ([], "(+get")
    assert split_rules("()") == (["()"], None)


def test_reset_and_clearselectors() -> None:
    rules = parse("+get ~a (+set) reset +del")
    assert len(rules.selectors) == 1
    sel = rules.selectors[0]
    assert sel.permits("del") and not sel.permits("get") and not sel.keys
    assert len(parse("(+get) (+set) clearselectors").selectors) == 1


# --------------------------------------------------------------------------- errors


def test_unknown_token_message_names_role_and_token() -> None:
    (problem,) = errors("+@read foo", name="reader")
    assert problem == "role 'reader': unknown ACL token 'foo' in acl = \"+@read foo\""


@pytest.mark.parametrize("acl,needle", [
    ("+nosuch", "unknown command 'nosuch'"),
    ("-nosuch", "unknown command 'nosuch'"),
    ("+@nosuch", "unknown ACL category '@nosuch'"),
    ("+", "unknown command ''"),
    ("+@", "unknown ACL category '@'"),
    ("-get|x", "unknown command 'get|x'"),
    ("+config|nosuch", "unknown subcommand 'nosuch'"),
    ("+config|", "empty subcommand"),
    ("+config|get|x", "first argument of a subcommand"),
    ("+get|x|y", "unknown command 'get|x'"),
    ("~* ~x", "after allkeys"),
    ("allkeys %R~x", "after allkeys"),
    ("&* &x", "after allchannels"),
    ("%X~k", "bad key permission"),
    ("%RR~k", "bad key permission"),
    ("%R", "bad key permission"),  # Redis takes it as %R~"" - refused here as a likely typo
    ("%~k", "bad key permission"),
    ("nopass", "passwords do not apply"),
    (">secret", "passwords do not apply"),
    ("#" + "a" * 64, "passwords do not apply"),
    ("<secret", "passwords do not apply"),
    ("!" + "a" * 64, "passwords do not apply"),
    ("resetpass", "passwords do not apply"),
    ("off", "'off' does not apply"),
    ("skip-sanitize-payload", "backend user"),
    ("(+get", "unmatched parenthesis"),
    ("(on)", "unknown ACL token 'on'"),
    ("(reset)", "unknown ACL token 'reset'"),
])
def test_errors(acl: str, needle: str) -> None:
    problems = errors(acl)
    assert len(problems) == 1
    assert problems[0].startswith("role 'reader': ")
    assert needle in problems[0]
    if acl[0] not in "><#!":
        assert problems[0].endswith(f'in acl = "{acl}"')


def test_every_bad_token_is_reported() -> None:
    problems = errors("+get foo +nosuch nopass ~ok (bar)")
    assert len(problems) == 4
    assert ["'foo'" in problems[0], "'+nosuch'" in problems[1], "'nopass'" in problems[2],
            "'bar'" in problems[3]] == [True] * 4


def test_passwords_are_redacted_across_lines() -> None:
    (problem,) = errors("+get\n>hunter2\t~x")
    assert "hunter2" not in problem


def test_passwords_are_redacted_in_messages() -> None:
    (problem,) = errors("+get >hunter2")
    assert "hunter2" not in problem
    assert problem == ("role 'reader': ACL token '>***': passwords do not apply to a role (the "
                       "client certificate is the identity); remove this token in acl = "
                       "\"+get >***\"")


@pytest.mark.parametrize("acl", ["+get (>hunter2 ~x)", "+get (>hunter2)", "(#hunter2 +get",
                                 "+nosuch (<hunter2 ~x)"])
def test_passwords_opening_a_selector_are_redacted(acl: str) -> None:
    # Found by tests/fuzz/fuzz_acl.py: `(>pw` was shown as written in the rule string.
    problems = errors(acl)
    assert problems and all("hunter2" not in problem for problem in problems)


def test_on_is_accepted() -> None:
    assert root("on +get").permits("get")
