"""Argument checks behind the stricter extras of SPEC §4 that depend on the arguments.

Each parser reads arguments the way the Redis command itself does (so a refusal never
depends on a reading Redis would not make), and errs on the side of finding more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from proxy.commands.keys import string2ll
from proxy.policy.glob import STAR, could_match_prefix, literal_prefix, parse_glob

# Extras, as named in explain's `extra` field and the audit `reason`.
UNKNOWN_COMMAND = "unknown_command"
DANGEROUS = "dangerous"
SCRIPTING = "scripting"
KEYSPACE = "keyspace"
SORT_PATTERN = "sort_pattern"
DB = "db"
UNCHECKED_KEYS = "unchecked_keys"  # extension: keys Redis's own ACL check does not see

SCRIPT_RUNNERS = frozenset(("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"))

# Commands that can read or destroy keys without naming them (audited whatever the keys).
KEYLESS_SENSITIVE = frozenset((
    "keys", "scan", "randomkey", "flushall", "flushdb", "swapdb", "monitor", "sync", "psync",
    "replicaof", "slaveof", "migrate", "debug", "failover", "shutdown", "restore-asking",
    "module|load", "module|loadex", "config|set", "cluster|getkeysinslot",
    "function|load", "function|restore", "function|flush", "function|delete",
    "script|load", "script|flush",
)) | SCRIPT_RUNNERS


# Commands that reveal key names (or whole commands with their keys) they were not given.
REVEALS_KEYS = frozenset(("randomkey", "cluster|getkeysinslot", "monitor", "slowlog|get",
                          "sync", "psync"))


def is_scripting(name: str) -> bool:
    return name in SCRIPT_RUNNERS or name == "function" or name.startswith("function|")


# ------------------------------------------------------------------------------- SORT


def sort_uses_patterns(argv: Sequence[bytes]) -> bool:
    """SORT/SORT_RO with `BY <pattern with *>` or any `GET`: Redis looks up keys built
    from the pattern (sort.c; `BY nosort`-style patterns without '*' look up nothing).
    Scans every argument, even past one Redis would stop at with a syntax error."""
    i, argc = 2, len(argv)
    while i < argc:
        arg = argv[i].lower()
        left = argc - i - 1
        if arg == b"limit" and left >= 2:
            i += 2
        elif arg == b"store" and left >= 1:
            i += 1
        elif arg == b"by" and left >= 1:
            if b"*" in argv[i + 1]:
                return True
            i += 1
        elif arg == b"get" and left >= 1:
            return True
        i += 1
    return False


# ------------------------------------------------------------------------------- databases


def _db_arguments(name: str, argv: Sequence[bytes]) -> list[bytes] | None:
    """The database numbers a command targets; None for any database (FLUSHALL, and
    scripts, which can SELECT inside)."""
    argc = len(argv)
    if name == "reset":
        return [b"0"]  # RESET takes the connection back to database 0
    if name in SCRIPT_RUNNERS:
        return None
    if name == "select" or name == "swapdb":
        return list(argv[1:3])
    if name == "move":
        return list(argv[2:3])
    if name == "migrate":
        return list(argv[4:5])
    if name == "flushall":
        return None
    if name == "copy":
        out = []
        i = 3
        while i < argc:
            arg = argv[i].lower()
            if arg == b"db" and i + 1 < argc:
                out.append(argv[i + 1])
                i += 1
            elif arg != b"replace":
                break  # Redis: syntax error, nothing is copied
            i += 1
        return out
    return []


DB_COMMANDS = frozenset(("select", "swapdb", "move", "migrate", "flushall", "copy",
                         "reset")) | SCRIPT_RUNNERS


def dbs_allowed(name: str, argv: Sequence[bytes], dbs: frozenset[int]) -> bool:
    targets = _db_arguments(name, argv)
    if targets is None:
        return False  # FLUSHALL empties every database; a script can SELECT any
    for raw in targets:
        number = string2ll(raw)
        if number is None or number not in dbs:
            return False  # not a number Redis would accept, or not one of the role's
    return True


# ------------------------------------------------------------------------------- keyspace
# Keyspace notifications carry key names: `__keyspace@<db>__:<key>` channels, and the
# payload of `__keyevent@<db>__:<event>` messages.

KEYSPACE_PREFIX = b"__keyspace@"
KEYEVENT_PREFIX = b"__keyevent@"


def _notification_key(channel: bytes) -> bytes | None:
    """The key of a `__keyspace@<digits>__:<key>` channel name, or None."""
    if not channel.startswith(KEYSPACE_PREFIX):
        return None
    db, sep, key = channel[len(KEYSPACE_PREFIX):].partition(b"__:")
    return key if sep and db.isdigit() else None


def channel_reveals_keys(channel: bytes, key_readable: Callable[[bytes], object]) -> bool:
    """True when messages on `channel` (a SUBSCRIBE argument) would name keys the role
    cannot read."""
    if channel.startswith(KEYEVENT_PREFIX):
        return True
    if channel.startswith(KEYSPACE_PREFIX):
        key = _notification_key(channel)
        return key is None or not key_readable(key)
    return False


def pattern_reveals_keys(pattern: bytes, read_prefixes: tuple[bytes, ...],
                         read_patterns: frozenset[bytes]) -> bool:
    """True when a PSUBSCRIBE pattern may match notification channels of keys the role
    cannot read. Conservative: a keyspace pattern is accepted only as
    `__keyspace@<digits>__:<P>` with P one of the role's read patterns or inside one of
    its `prefix*` read patterns."""
    if not (could_match_prefix(pattern, KEYSPACE_PREFIX)
            or could_match_prefix(pattern, KEYEVENT_PREFIX)):
        return False
    literal, _ = literal_prefix(pattern)
    key_pattern = _notification_key(literal) if literal.startswith(KEYSPACE_PREFIX) else None
    if key_pattern is None:
        return True
    tail = pattern[len(literal) - len(key_pattern):]
    if tail in read_patterns:
        return False
    tail_literal, _ = literal_prefix(tail)
    return not any(tail_literal.startswith(prefix) for prefix in read_prefixes)


def prefix_star(pattern: bytes) -> bytes | None:
    """`app:*` -> b"app:"; None for any other shape."""
    tokens = parse_glob(pattern)
    prefix, literal = literal_prefix(pattern)
    if not literal and len(tokens) == len(prefix) + 1 and tokens[-1][0] == STAR:
        return prefix
    return None
