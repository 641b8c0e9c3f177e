"""ACL rule harness: a role's `acl` string through parse_role and compile_roles.

Input: byte 0 bit 0 chooses raw mode (the rest, decoded as UTF-8 with replacement, is the
rule string) or token mode (each byte below 0xC0 picks a rule word from VOCABULARY,
bytes from 0xC0 glue a character onto the current word).

Properties, for every input:
- parse_role returns rules or raises AclError (the documented type), nothing else;
  compile_roles returns roles or raises ConfigError, and fails exactly when parse_role
  does; every problem names the role and the rule string;
- compiling is deterministic: twice the same rules, the same problems, and the same
  decisions on a fixed set of commands;
- a password rule's secret (`>pw`, `<pw`, `#hash`, `!hash`, also inside a selector) is
  never repeated in an error message (token mode, whose secrets contain "PWSECRET").
"""

from __future__ import annotations

from proxy.commands.table import default_table
from proxy.config import ConfigError, RoleConfig
from proxy.policy.acl import AclError, parse_role
from proxy.policy.engine import compile_roles, decide

TABLE = default_table()
ROLE = "fuzz"
SECRET = "PWSECRET"

VOCABULARY = [
    "+@all", "-@all", "+@read", "+@write", "-@write", "+@keyspace", "-@dangerous", "+@admin",
    "+@scripting", "+@pubsub", "-@slow", "+@nosuchcat", "+@", "-@", "+get", "-get", "+set",
    "+GET", "+config|get", "-config|set", "+config|nosuch", "+config|", "+client", "-client|kill",
    "+client|list", "+select|0", "+select|1", "+select|", "+debug", "+flushall", "+keys",
    "+scan", "+eval", "+evalsha", "+multi", "+subscribe", "+nosuchcmd", "-nosuchcmd", "+", "-",
    "+get|x", "+config|get|x", "~*", "~app:*", "~app:phi:*", "~[a-", "~\\", "%R~app:*",
    "%W~x", "%RW~*", "%WR~k*", "%RR~a", "%X~a", "%~a", "%R", "%", "~", "allkeys", "resetkeys",
    "&*", "&news.*", "&", "allchannels", "resetchannels", "allcommands", "nocommands", "on",
    "off", "reset", "clearselectors", "nopass", "resetpass", f">{SECRET}1", f"<{SECRET}2",
    f"#{SECRET}3", f"!{SECRET}4", "sanitize-payload", "skip-sanitize-payload", "(", ")",
    "(+get", "~k)", "(+@read ~x)", "()", "(~a", "+set)", f"(>{SECRET}5", f"(>{SECRET}6)",
    f"(+get >{SECRET}7)", "\x00", "+get\x00", "((", "))", "(()", "~é*", "&é",
]
_GLUE = "()~%&@|+-*?[]\\^ :!<>#xRW\t\x00é"

# Commands decided after each compilation: both compilations must answer alike.
SAMPLES = [
    [b"GET", b"app:1"], [b"SET", b"app:phi:1", b"v"], [b"set", b"x", b"v"], [b"KEYS", b"*"],
    [b"CONFIG", b"GET", b"maxmemory"], [b"CONFIG", b"SET", b"a", b"b"], [b"SELECT", b"0"],
    [b"SELECT", b"1"], [b"CLIENT", b"KILL", b"ID", b"1"], [b"EVAL", b"return 1", b"0"],
    [b"SUBSCRIBE", b"news.1"], [b"PUBLISH", b"news.1", b"x"], [b"FLUSHALL"], [b"DEBUG", b"X"],
    [b"NOSUCH"], [b"MSET", b"app:1", b"a", b"k2", b"b"], [b"SCAN", b"0"], [b"PING"],
]


def rule_string(data: bytes) -> tuple[str, bool]:
    """(acl, token mode)."""
    if not data or data[0] & 1:
        return data[1:].decode("utf-8", "replace"), False
    words: list[str] = []
    for b in data[1:]:
        if b < 0xC0 or not words:
            words.append(VOCABULARY[b % len(VOCABULARY)])
        else:
            words[-1] += _GLUE[b % len(_GLUE)]
    return " ".join(words), True


def _parse(acl: str) -> tuple[object, list[str] | None]:
    try:
        return parse_role(ROLE, acl, TABLE), None
    except AclError as exc:
        return None, exc.problems


def _compile(acl: str) -> tuple[dict | None, list[str] | None]:
    try:
        return compile_roles({ROLE: RoleConfig(ROLE, acl)}, TABLE), None
    except ConfigError as exc:
        return None, exc.problems


def check(data: bytes) -> None:
    acl, token_mode = rule_string(data)
    rules, problems = _parse(acl)
    again, problems_again = _parse(acl)
    assert rules == again and problems == problems_again, "parse_role is not deterministic"

    if problems is not None:
        assert problems, "AclError without a problem"
        for problem in problems:
            assert problem.startswith(f"role '{ROLE}': ") and 'in acl = "' in problem, problem
            if token_mode:
                assert SECRET not in problem, f"a password secret in an error: {problem!r}"

    roles, config_problems = _compile(acl)
    assert (roles is None) == (rules is None), "compile_roles and parse_role disagree"
    if roles is None:
        assert config_problems == problems
        return
    roles_again, _ = _compile(acl)
    assert roles_again is not None
    for argv in SAMPLES:
        one = decide(roles[ROLE], argv)
        two = decide(roles_again[ROLE], argv)
        assert one._replace(reply_filter=None) == two._replace(reply_filter=None), argv
        assert (one.reply_filter is None) == (two.reply_filter is None), argv
