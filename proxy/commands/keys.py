"""Which arguments of a command are keys (and channels), with the flags Redis's ACL uses.

`extract_keys` follows Redis 7's getKeysFromCommandWithSpecs (db.c) exactly: key specs
first; when a spec cannot be applied (INCOMPLETE, unknown, bad numkeys) or its flags
vary (VARIABLE_FLAGS), the command's own getkeys function, hand-coded here for the
commands that have one. Its `keys` are what Redis's ACL checks.

Where Redis's check is weaker than what the command will touch, the result says so:
  - `extra`: argument positions Redis does not check but that may be keys (every STORE
    target of GEORADIUS, which writes the last one while Redis checks the first; the
    keys a malformed command names when Redis's extraction gave up);
  - `located` False: the keys cannot be located at all (numkeys not an integer, ...).
The policy refuses both to a role without allkeys (the `unchecked_keys` extra).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from proxy.commands.table import (
    KEY_ACCESS,
    KEY_DELETE,
    KEY_INCOMPLETE,
    KEY_NOT_KEY,
    KEY_OW,
    KEY_RO,
    KEY_RW,
    KEY_UPDATE,
    CommandInfo,
    KeySpec,
)

KeyRef = tuple[int, int]  # (argv position, key-spec flags)


class KeyResult(NamedTuple):
    keys: tuple[KeyRef, ...]  # what Redis's ACL check sees
    extra: tuple[KeyRef, ...] = ()  # possibly keys Redis does not check
    located: bool = True  # False: some keys cannot be located at all


NO_KEYS = KeyResult(())
_UNLOCATED = KeyResult((), (), False)

_LLONG_MAX = 2**63 - 1


def string2ll(value: bytes) -> int | None:
    """Redis's strict integer parse (util.c string2ll): no sign '+', spaces or leading 0s."""
    n = len(value)
    if n == 0 or n > 20:
        return None
    if value == b"0":
        return 0
    digits = value[1:] if value[:1] == b"-" else value
    if not digits or not 0x31 <= digits[0] <= 0x39 or not digits.isdigit():
        return None
    number = int(digits)
    if value[:1] == b"-":
        return -number if number <= _LLONG_MAX + 1 else None
    return number if number <= _LLONG_MAX else None


def atoi(value: bytes) -> int:
    """C atoi as glibc does it: (int)strtol(s, NULL, 10)."""
    s = value.split(b"\0", 1)[0].lstrip(b" \t\n\v\f\r")
    sign = -1 if s[:1] == b"-" else 1
    if s[:1] in (b"-", b"+"):
        s = s[1:]
    end = 0
    while end < len(s) and 0x30 <= s[end] <= 0x39:
        end += 1
    number = sign * int(s[:end]) if end else 0
    number = max(-(2**63), min(_LLONG_MAX, number))  # strtol clamps to long
    number &= 0xFFFFFFFF  # then the cast to int keeps the low 32 bits
    return number - 2**32 if number >= 2**31 else number


# --------------------------------------------------------------------------- key specs

_OK, _INVALID_BOUNDS, _INVALID = 0, 1, 2


def _apply_spec(spec: KeySpec, argv: Sequence[bytes], out: list[KeyRef],
                partial: list[KeyRef]) -> int:
    """One spec (db.c getKeysUsingKeySpecs). Appends to `out` what Redis would; to
    `partial` every in-bounds position the spec designates, even when it fails."""
    argc = len(argv)
    if spec.begin_search == "index":
        first = spec.index
    elif spec.begin_search == "keyword":
        startfrom = spec.startfrom
        start = startfrom if startfrom > 0 else argc + startfrom
        end = argc - 1 if startfrom > 0 else 1
        step = 1 if start <= end else -1
        first = 0
        i = start
        while i != end:
            if i >= argc or i < 1:
                break
            if argv[i].lower() == spec.keyword:
                first = i + 1
                break
            i += step
        if not first:
            return _OK  # keyword absent: no keys from this spec
    else:
        return _INVALID

    if spec.find_keys == "range":
        step = spec.keystep
        if spec.lastkey >= 0:
            last = first + spec.lastkey
        elif not spec.limit:
            last = argc + spec.lastkey
        else:
            last = first + ((argc - first) // spec.limit + spec.lastkey)
    elif spec.find_keys == "keynum":
        step = spec.keystep
        if first + spec.keynumidx >= argc:
            return _INVALID_BOUNDS
        numkeys = string2ll(argv[first + spec.keynumidx])
        if numkeys is None or numkeys < 0:
            return _INVALID
        first += spec.firstkey
        last = first + numkeys - 1
    else:
        return _INVALID

    if step < 1:
        return _INVALID
    for i in range(first, min(last, argc - 1) + 1, step):
        partial.append((i, spec.flags))
    if last >= argc or last < first or first >= argc:
        return _INVALID_BOUNDS
    out.extend((i, spec.flags) for i in range(first, last + 1, step))
    return _INVALID if spec.flags & KEY_INCOMPLETE else _OK


def _from_specs(cmd: CommandInfo,
                argv: Sequence[bytes]) -> tuple[list[KeyRef] | None, list[KeyRef], bool]:
    """(keys or None when Redis would give up, partial keys, every spec locatable)."""
    keys: list[KeyRef] = []
    partial: list[KeyRef] = []
    failed = False
    locatable = True
    for spec in cmd.key_specs:
        if spec.flags & KEY_NOT_KEY:
            continue
        status = _apply_spec(spec, argv, keys, partial)
        if status != _OK:
            failed = True
            if status == _INVALID and not spec.flags & KEY_INCOMPLETE:
                locatable = False
    return (None if failed else keys), partial, locatable


# --------------------------------------------------------------------------- getkeys functions
# Hand-coded copies of the Redis 7.0 getkeys_proc of each command that has one; Redis
# calls them when the specs fail (or have VARIABLE_FLAGS). They return a full KeyResult.

GetKeys = Callable[[Sequence[bytes]], KeyResult]


def _generic(store: int, count_at: int, first: int, allow_zero: bool) -> GetKeys:
    """db.c genericGetKeys: numkeys parsed with atoi, keys flagged 0 (any pattern fits)."""

    def getkeys(argv: Sequence[bytes]) -> KeyResult:
        argc = len(argv)
        if count_at >= argc:  # too short to run: only a store key can be there
            return KeyResult((), ((store, 0),) if 0 < store < argc else ())
        num = atoi(argv[count_at])
        strict = string2ll(argv[count_at])
        partial = [(i, 0) for i in range(first, argc)]
        if store and store < argc:
            partial.append((store, 0))
        if num < 1 or num > argc - first:
            if strict == 0 and allow_zero:
                return NO_KEYS  # EVAL script 0: no keys, legitimately
            # Redis checks nothing; the command will fail. Check what may be keys.
            return KeyResult((), tuple(partial), strict is not None and strict >= 0)
        keys = [(first + i, 0) for i in range(num)]
        if store:
            keys.append((store, 0))
        # numkeys only atoi-parses: Redis runs the check, then the command fails on it.
        return KeyResult(tuple(keys), (), strict is not None)

    return getkeys


def _sort_keys(argv: Sequence[bytes]) -> KeyResult:
    """db.c sortGetKeys: the sorted key, and the last STORE target."""
    keys: list[KeyRef] = [(1, KEY_RO | KEY_ACCESS)]
    store = None
    skips = {b"limit": 2, b"get": 1, b"by": 1}
    i, argc = 2, len(argv)
    while i < argc:
        arg = argv[i].lower()
        if arg in skips:
            i += skips[arg]
        elif arg == b"store" and i + 1 < argc:
            store = i + 1
        i += 1
    if store is not None:
        keys.append((store, KEY_OW | KEY_UPDATE))
    return KeyResult(tuple(keys))


def _sort_ro_keys(argv: Sequence[bytes]) -> KeyResult:
    return KeyResult(((1, KEY_RO | KEY_ACCESS),))


_MIGRATE_SKIPS = {b"copy": 0, b"replace": 0, b"auth": 1, b"auth2": 2}
_MIGRATE_FLAGS = KEY_RW | KEY_ACCESS | KEY_DELETE


def _migrate_keys(argv: Sequence[bytes]) -> KeyResult:
    """db.c migrateGetKeys: argv[3], or everything after KEYS when argv[3] is empty."""
    argc = len(argv)
    first, num = 3, 1
    if argc > 6:
        i = 6
        while i < argc:
            arg = argv[i].lower()
            if arg == b"keys":
                if argv[3]:
                    # Redis returns no keys (the command then fails): check them all.
                    extra = tuple((j, _MIGRATE_FLAGS) for j in [3, *range(i + 1, argc)])
                    return KeyResult((), extra)
                first, num = i + 1, argc - i - 1
                break
            i += _MIGRATE_SKIPS.get(arg, 0)
            i += 1
    return KeyResult(tuple((first + j, _MIGRATE_FLAGS) for j in range(num) if first + j < argc))


def _set_keys(argv: Sequence[bytes]) -> KeyResult:
    """t_string.c setGetKeys: with GET the key is also read."""
    for arg in argv[3:]:
        if arg.lower() == b"get":
            return KeyResult(((1, KEY_RW | KEY_ACCESS | KEY_UPDATE),))
    return KeyResult(((1, KEY_OW | KEY_UPDATE),))


def _bitfield_keys(argv: Sequence[bytes]) -> KeyResult:
    """bitops.c bitfieldGetKeys: read-only when every operation is GET (or OVERFLOW)."""
    readonly = True
    i, argc = 2, len(argv)
    while i < argc:
        remaining = argc - i - 1
        arg = argv[i].lower()
        if arg == b"get" and remaining >= 2:
            i += 2
        elif arg in (b"set", b"incrby") and remaining >= 3:
            readonly = False
            break
        elif arg == b"overflow" and remaining >= 1:
            i += 1
        else:
            readonly = False  # syntax error: assume a write, as Redis does
            break
        i += 1
    flags = KEY_RO | KEY_ACCESS if readonly else KEY_RW | KEY_ACCESS | KEY_UPDATE
    return KeyResult(((1, flags),))


def _xread_keys(argv: Sequence[bytes]) -> KeyResult:
    """t_stream.c xreadGetKeys: the first half of what follows STREAMS."""
    argc = len(argv)
    streams = -1
    i = 1
    while i < argc:
        arg = argv[i].lower()
        if arg in (b"block", b"count"):
            i += 1
        elif arg == b"group":
            i += 2
        elif arg == b"noack":
            pass
        elif arg == b"streams":
            streams = i
            break
        else:
            break
        i += 1
    num = argc - streams - 1
    if streams == -1 or num == 0 or num % 2:
        # Redis checks nothing and the command fails: check every argument after STREAMS.
        tail = range(streams + 1, argc) if streams != -1 else range(1, argc)
        return KeyResult((), tuple((j, KEY_RO | KEY_ACCESS) for j in tail))
    return KeyResult(tuple((j, 0) for j in range(streams + 1, streams + 1 + num // 2)))


GETKEYS: dict[str, GetKeys] = {
    "zunionstore": _generic(1, 2, 3, False),
    "zinterstore": _generic(1, 2, 3, False),
    "zdiffstore": _generic(1, 2, 3, False),
    "zunion": _generic(0, 1, 2, False),
    "zinter": _generic(0, 1, 2, False),
    "zdiff": _generic(0, 1, 2, False),
    "zintercard": _generic(0, 1, 2, False),
    "sintercard": _generic(0, 1, 2, False),
    "lmpop": _generic(0, 1, 2, False),
    "zmpop": _generic(0, 1, 2, False),
    "blmpop": _generic(0, 2, 3, False),
    "bzmpop": _generic(0, 2, 3, False),
    "eval": _generic(0, 2, 3, True),
    "evalsha": _generic(0, 2, 3, True),
    "eval_ro": _generic(0, 2, 3, True),
    "evalsha_ro": _generic(0, 2, 3, True),
    "fcall": _generic(0, 2, 3, True),
    "fcall_ro": _generic(0, 2, 3, True),
    "sort": _sort_keys,
    "sort_ro": _sort_ro_keys,
    "migrate": _migrate_keys,
    "set": _set_keys,
    "bitfield": _bitfield_keys,
    "xread": _xread_keys,
    "xreadgroup": _xread_keys,
}


def _all_store_targets(argv: Sequence[bytes]) -> tuple[KeyRef, ...]:
    """GEORADIUS[BYMEMBER] writes the *last* STORE/STOREDIST target; its key specs find
    the first. Every target is a key."""
    out = []
    for i in range(5, len(argv) - 1):
        if argv[i].lower() in (b"store", b"storedist"):
            out.append((i + 1, KEY_OW | KEY_UPDATE))
    return tuple(out)


def _xread_streams(argv: Sequence[bytes]) -> tuple[KeyRef, ...]:
    """XREAD[GROUP] reads the streams its option parser finds; the STREAMS key spec can
    stop at an earlier "streams" (a GROUP name, say) and check other arguments."""
    return tuple((pos, KEY_RO | KEY_ACCESS) for pos, _ in _xread_keys(argv).keys)


# Commands whose specs Redis trusts but that may touch keys the specs do not find.
WIDER: dict[str, Callable[[Sequence[bytes]], tuple[KeyRef, ...]]] = {
    "georadius": _all_store_targets,
    "georadiusbymember": _all_store_targets,
    "xread": _xread_streams,
    "xreadgroup": _xread_streams,
}


def has_keys(cmd: CommandInfo) -> bool:
    """Redis doesCommandHaveKeys: a real key spec or a getkeys function (for a module
    command, `movablekeys` without specs means one we cannot run here)."""
    return cmd.has_key_specs or cmd.name in GETKEYS or "movablekeys" in cmd.flags


def extract_keys(cmd: CommandInfo, argv: Sequence[bytes]) -> KeyResult:
    """Keys of `argv` (argv[0] the command name; subcommands keep their position)."""
    partial: list[KeyRef] = []
    locatable = True
    if cmd.has_key_specs and not cmd.has_variable_flags:
        keys, partial, locatable = _from_specs(cmd, argv)
        if keys is not None:
            wider = WIDER.get(cmd.name)
            if wider is not None:
                seen = {pos for pos, _ in keys}
                return KeyResult(tuple(keys), tuple(k for k in wider(argv) if k[0] not in seen))
            return KeyResult(tuple(keys))
    getkeys = GETKEYS.get(cmd.name)
    if getkeys is not None:
        result = getkeys(argv)
        argc = len(argv)  # a wrong-arity argv can be shorter than the function assumes
        if any(pos >= argc for pos, _ in result.keys):
            return result._replace(keys=tuple(k for k in result.keys if k[0] < argc))
        return result
    if not cmd.has_key_specs:
        # A (module) command whose keys only its own getkeys function knows.
        return _UNLOCATED if "movablekeys" in cmd.flags else NO_KEYS
    # Redis checks no key and lets the command fail later (usually an arity error).
    return KeyResult((), tuple(partial), locatable)


# --------------------------------------------------------------------------- channels

# (first channel position, how many (-1: all the rest), pattern compared literally).
# As Redis 7.0's ACL: the UNSUBSCRIBE family names no channel to check.
CHANNEL_COMMANDS: dict[str, tuple[int, int, bool]] = {
    "publish": (1, 1, False),
    "spublish": (1, 1, False),
    "subscribe": (1, -1, False),
    "ssubscribe": (1, -1, False),
    "psubscribe": (1, -1, True),
}


def extract_channels(cmd: CommandInfo, argv: Sequence[bytes]) -> tuple[int, ...]:
    """Positions of the channels (or PSUBSCRIBE patterns) Redis's ACL checks."""
    rule = CHANNEL_COMMANDS.get(cmd.name)
    if rule is None:
        return ()
    first, count, _ = rule
    stop = len(argv) if count == -1 else min(len(argv), first + count)
    return tuple(range(first, stop))
