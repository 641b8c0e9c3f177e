"""What happens to a command on a protected key (SPEC §9): the request rewritten (values
encrypted, a default TTL added), the reply rewritten (values decrypted), or a refusal that
names the command, the key and the rule.

`plan()` is called by the session for an allowed command with at least one key under a
`[[protect]]` rule. Every command of the table is classified in `CLASSES` (a test walks the
table, so a new command cannot pass unclassified): `transform` (a value crosses and this
module knows where), `pass` (no value crosses: DEL, TTL, TYPE, HKEYS, LLEN, ...) or one of
the refusal reasons. The README's table is generated from `CLASSES`.

Invariants (tested against a real redis-server): Redis never receives a protected value in
plaintext; a client never receives ciphertext in place of a value; a value that cannot be
decrypted is an error naming the key, never the stored bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from proxy.protect import resp
from proxy.protect.crypto import (
    HASH,
    LIST,
    STREAM,
    STRING,
    Cipher,
    DecryptError,
    UnknownKey,
    associated,
    is_ciphertext,
)
from proxy.protect.rules import Protection, ProtectRule

if TYPE_CHECKING:
    from proxy.commands.table import CommandTable
    from proxy.config import Config

TRANSFORM = "transform"
PASS = "pass"
COMPUTES = "computes on the stored value, which is encrypted"
COMPARES = "compares members, which encryption makes incomparable"
MOVES = "would move a value to a key name it is not bound to"
SCRIPT = "runs a script, which would see ciphertext"
RAW = "reads or writes the stored bytes directly"
UNSUPPORTED = "is not supported on protected keys"

_STRINGS = "set get getset getdel getex mget mset msetnx setnx setex psetex"
_HASHES = "hset hmset hsetnx hget hmget hgetall hvals hrandfield hscan"
_LISTS = ("lpush rpush lpushx rpushx lrange lindex lpop rpop lset lmove blmove rpoplpush "
          "brpoplpush blpop brpop lmpop blmpop")
_STREAMS = "xadd xrange xrevrange xread xreadgroup xclaim xautoclaim"
_PASSED = (
    "del unlink exists touch type ttl pttl expiretime pexpiretime expire pexpire expireat "
    "pexpireat persist watch move object|encoding object|freq object|idletime "
    "object|refcount memory|usage hdel hexists hkeys hlen llen ltrim xlen xdel xack xtrim "
    "xsetid xpending xgroup|create xgroup|createconsumer xgroup|delconsumer xgroup|destroy "
    "xgroup|setid xinfo|consumers xinfo|groups scard zcard"
)
_COMPUTES = (
    "append incr incrby incrbyfloat decr decrby getrange substr setrange strlen lcs "
    "bitcount bitfield bitfield_ro bitop bitpos getbit setbit hincrby hincrbyfloat hstrlen "
    "sort sort_ro pfadd pfcount pfdebug pfmerge xinfo|stream"
)
_COMPARES = (
    "lrem lpos linsert sadd srem smembers sismember smismember spop srandmember smove sdiff "
    "sdiffstore sinter sintercard sinterstore sunion sunionstore sscan zadd zcount zdiff "
    "zdiffstore zincrby zinter zintercard zinterstore zlexcount zmpop zmscore zpopmax zpopmin "
    "zrandmember zrange zrangebylex zrangebyscore zrangestore zrank zrem zremrangebylex "
    "zremrangebyrank zremrangebyscore zrevrange zrevrangebylex zrevrangebyscore zrevrank "
    "zscan zscore zunion zunionstore bzmpop bzpopmax bzpopmin geoadd geodist geohash geopos "
    "georadius georadius_ro georadiusbymember georadiusbymember_ro geosearch geosearchstore"
)
_MOVES = "copy rename renamenx migrate restore restore-asking"
_SCRIPTS = "eval eval_ro evalsha evalsha_ro fcall fcall_ro"
_RAW = "dump"

CLASSES: dict[str, str] = {}
for _names, _class in ((_STRINGS, TRANSFORM), (_HASHES, TRANSFORM), (_LISTS, TRANSFORM),
                       (_STREAMS, TRANSFORM), (_PASSED, PASS), (_COMPUTES, COMPUTES),
                       (_COMPARES, COMPARES), (_MOVES, MOVES), (_SCRIPTS, SCRIPT),
                       (_RAW, RAW)):
    for _name in _names.split():
        assert _name not in CLASSES, _name
        CLASSES[_name] = _class

# Transforms that change the request (values encrypted, HVALS asked as HGETALL).
_REWRITES_ARGV = frozenset({
    "set", "getset", "setnx", "setex", "psetex", "mset", "msetnx", "hset", "hmset",
    "hsetnx", "hvals", "lpush", "rpush", "lpushx", "rpushx", "lset", "xadd"})

# Commands that set or keep a TTL themselves (checked against max_ttl_s, never given the
# default); every other write to a key under a TTL rule gets `EXPIRE key ttl NX` after it.
_SETS_TTL = frozenset({"setex", "psetex", "expire", "pexpire", "expireat", "pexpireat",
                       "getex", "restore", "restore-asking"})


_CLASS_WORDS = {
    TRANSFORM: "values encrypted on the way in, decrypted on the way out",
    PASS: "passed unchanged: no value crosses",
    COMPUTES: "refused: it " + COMPUTES,
    COMPARES: "refused: it " + COMPARES,
    MOVES: "refused: it " + MOVES,
    SCRIPT: "refused: it " + SCRIPT,
    RAW: "refused: it " + RAW,
}
TABLE_BEGIN = "<!-- protected-commands table: generated by `python -m proxy.protect.transform` -->"
TABLE_END = "<!-- end of the protected-commands table -->"


def _shown_name(name: str) -> str:
    return name.replace("|", " ").upper()  # "OBJECT ENCODING": a pipe would split the cell


def markdown_table() -> str:
    """README's table of what happens to every keyed command on an encrypted key."""
    rows = [TABLE_BEGIN, "", "| on a key under `encrypt = true` | commands |", "| --- | --- |"]
    for kind, words in _CLASS_WORDS.items():
        names = sorted(name for name, c in CLASSES.items() if c == kind)
        rows.append(f"| {words} | {', '.join(f'`{_shown_name(n)}`' for n in names)} |")
    rows += ["| refused: not supported (any command the table learns from a newer Redis) "
             "| every other command that has keys |", "", TABLE_END]
    return "\n".join(rows)


def command_flags(table: CommandTable) -> Callable[[str], frozenset[str]]:
    """name ("set", "object|encoding") -> Redis's command flags ("write", ...)."""
    flags: dict[str, frozenset[str]] = {}
    for info in table.commands.values():
        flags[info.name] = frozenset(info.flags)
        for sub in (info.subcommands or {}).values():
            flags[sub.name] = frozenset(sub.flags)
    return lambda name: flags.get(name, frozenset())


def make_protector(config: Config, table: CommandTable) -> Protector | None:
    """The sessions' Protector for a configuration (None without [[protect]] rules)."""
    if not config.protection:
        return None
    encryption = config.encryption
    return Protector(config.protection, encryption.cipher, encryption.plaintext_reads,
                     command_flags(table))


class Refusal(Exception):
    """The command is refused on a protected key: `error` is the reply line."""

    def __init__(self, command: str, key: bytes, rule: ProtectRule, why: str) -> None:
        shown = key.decode("utf-8", "replace")
        self.reason = f"protected: '{command}' on '{shown}' ({rule.name}) {why}"
        super().__init__(self.reason)
        text = (f"ERR phiproxy: '{command.upper()}' is refused on protected key '{shown}' "
                f"({rule.name}): it {why}")
        self.error = b"-" + text.replace("\r", " ").replace("\n", " ").encode(
            "utf-8", "replace") + b"\r\n"


class Plan:
    """What to send instead (`argv`, changed in place), how to rewrite the reply, and the
    proxy's own follow-ups (their replies are dropped)."""

    __slots__ = ("argv", "reply", "extra")

    def __init__(self, argv: list[bytes]) -> None:
        self.argv = argv
        self.reply: Callable[[bytes], bytes] | None = None
        self.extra: list[list[bytes]] = []

    def changes_request(self, command: str) -> bool:
        """Whether what goes to Redis differs from what the client sent (if not, the
        session may forward the client's bytes as they are)."""
        return command in _REWRITES_ARGV or bool(self.extra)


class Protector:
    """The live rules and keys (replaced as a whole on reload)."""

    def __init__(self, protection: Protection, cipher: Cipher | None,
                 plaintext_reads: str = "refuse", flags: Callable[[str], frozenset[str]]
                 | None = None) -> None:
        self.protection = protection
        self.cipher = cipher
        self.plaintext_reads = plaintext_reads
        self._flags = flags or (lambda name: frozenset())

    def __bool__(self) -> bool:
        return bool(self.protection)

    def plan(self, command: str, argv: list[bytes], keys: Sequence[bytes],
             keyless_sensitive: bool = False) -> Plan | None:
        """None when no key of the command is protected (nothing changes).
        `keyless_sensitive`: the command may reach keys it does not name (a script, SORT
        with BY/GET patterns): with encrypted keys configured, it could hand a client
        ciphertext, so it is refused unless its named keys prove otherwise."""
        rule_for = self.protection.rule_for
        if len(keys) == 1:  # the common case, without the comprehensions
            key = keys[0]
            rule = rule_for(key)
            if rule is not None:
                plan = Plan(argv)
                if rule.encrypt:
                    kind = CLASSES.get(command, UNSUPPORTED)
                    if kind is TRANSFORM:
                        self._transform(plan, command, {key: rule})
                    elif kind is not PASS:
                        raise Refusal(command, key, rule, kind)
                if rule.limits_ttl:
                    self._ttl(plan, command, [(key, rule)])
                return plan
            ruled = []
        else:
            ruled = [(key, rule) for key in keys if (rule := rule_for(key)) is not None]
        if not ruled:
            if keyless_sensitive and CLASSES.get(command) in (SCRIPT, COMPUTES):
                encrypting = next((r for r in self.protection.rules if r.encrypt), None)
                if encrypting is not None:
                    raise Refusal(command, b"*", encrypting,
                                  "may reach keys it does not name, and values there are "
                                  "encrypted")
            return None
        plan = Plan(argv)
        encrypted = {key: rule for key, rule in ruled if rule.encrypt}
        if encrypted:
            kind = CLASSES.get(command, UNSUPPORTED)
            if kind is TRANSFORM:
                self._transform(plan, command, encrypted)
            elif kind is not PASS:
                key, rule = next(iter(encrypted.items()))
                raise Refusal(command, key, rule, kind)
        if any(rule.limits_ttl for _, rule in ruled):
            self._ttl(plan, command, ruled)
        return plan

    def _transform(self, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
        """The command's transform; a malformed command (too few arguments for where the
        values are) is refused rather than sent half-transformed (fail closed)."""
        try:
            _TRANSFORMS[command](self, plan, command, rules)
        except (IndexError, ValueError):
            key, rule = next(iter(rules.items()))
            raise Refusal(command, key, rule, "is malformed (wrong number of arguments)") \
                from None

    # ------------------------------------------------------------------ TTL rules
    def _ttl(self, plan: Plan, command: str, ruled: list[tuple[bytes, ProtectRule]]) -> None:
        limited = [(key, rule) for key, rule in ruled
                   if rule.max_ttl_s is not None or rule.default_ttl_s is not None]
        if not limited:
            return
        requested = _requested_ttl_ms(command, plan.argv)
        for key, rule in limited:
            if requested == "persist":
                raise Refusal(command, key, rule, "would remove the key's TTL "
                              f"(max_ttl_s = {rule.max_ttl_s or rule.default_ttl_s})")
            if isinstance(requested, int) and rule.max_ttl_s is not None \
                    and requested > rule.max_ttl_s * 1000:
                raise Refusal(command, key, rule, f"asks for a TTL of {requested / 1000:g} s, "
                              f"beyond max_ttl_s = {rule.max_ttl_s}")
        if command in _SETS_TTL or requested not in (None, "keep"):
            return
        if "write" not in self._flags(command):
            return
        for key, rule in limited:
            ttl = rule.default_ttl_s or rule.max_ttl_s
            plan.extra.append([b"EXPIRE", key, str(ttl).encode(), b"NX"])

    # ------------------------------------------------------------------ values
    def enc(self, value: bytes, ad: bytes) -> bytes:
        assert self.cipher is not None
        return self.cipher.encrypt(value, ad)

    def dec(self, key: bytes, value: bytes, ad: bytes) -> bytes:
        """The plaintext of a stored value; DecryptError (with the key in its text)."""
        if self.cipher is None:
            raise DecryptError("no keyring is configured")
        if not is_ciphertext(value):
            if self.plaintext_reads == "pass":
                return value
            raise DecryptError(f"the value stored at '{_shown(key)}' is not encrypted "
                               "(written before protection; [encryption] plaintext_reads "
                               "= \"pass\" reads such values)")
        try:
            return self.cipher.decrypt(value, ad)
        except UnknownKey as exc:
            raise DecryptError(f"the value at '{_shown(key)}' is encrypted under key id "
                               f"'{exc.key_id}', which is not in the keyring") from None
        except DecryptError as exc:
            raise DecryptError(f"the value at '{_shown(key)}' cannot be decrypted: {exc}") \
                from None


def _shown(key: bytes) -> str:
    return key.decode("utf-8", "replace")


def _error(exc: Exception) -> bytes:
    text = f"ERR phiproxy: {exc}".replace("\r", " ").replace("\n", " ")
    return b"-" + text.encode("utf-8", "replace") + b"\r\n"


def _rewriting(fn: Callable[[resp.Node], resp.Node | None]) -> Callable[[bytes], bytes]:
    """A reply filter from a tree rewrite; a value that cannot be decrypted turns the whole
    reply into an error (never ciphertext, never a partial answer)."""

    def reply(frame: bytes) -> bytes:
        try:
            node = resp.parse(frame)
            new = fn(node)
            return resp.encode(new if new is not None else node)
        except DecryptError as exc:
            return _error(exc)

    return reply


def _now_ms() -> int:
    return int(time.time() * 1000)


def _requested_ttl_ms(command: str, argv: list[bytes]) -> int | str | None:
    """The TTL (ms from now) a command asks for; "persist" when it removes the TTL, "keep"
    for KEEPTTL, None when it says nothing."""
    name = command
    try:
        if name in ("expire", "pexpire", "expireat", "pexpireat"):
            n = int(argv[2])
            if name == "expire":
                return n * 1000
            if name == "pexpire":
                return n
            if name == "expireat":
                return n * 1000 - _now_ms()
            return n - _now_ms()
        if name == "setex":
            return int(argv[2]) * 1000
        if name == "psetex":
            return int(argv[2])
        if name == "persist":
            return "persist"
        if name in ("restore", "restore-asking"):
            ttl = int(argv[2])
            if any(a.lower() == b"absttl" for a in argv[4:]):
                return ttl - _now_ms() if ttl else "persist"
            return ttl if ttl else "persist"
        if name in ("set", "getex"):
            options = argv[3:] if name == "set" else argv[2:]
            for i, opt in enumerate(options):
                word = opt.lower()
                if word == b"persist" and name == "getex":
                    return "persist"
                if word == b"keepttl":
                    return "keep"
                if word in (b"ex", b"px", b"exat", b"pxat") and i + 1 < len(options):
                    n = int(options[i + 1])
                    return {b"ex": n * 1000, b"px": n, b"exat": n * 1000 - _now_ms(),
                            b"pxat": n - _now_ms()}[word]
    except (ValueError, IndexError):
        return None  # Redis refuses the malformed command itself
    return None


# ---------------------------------------------------------------------- transforms
Transform = Callable[[Protector, Plan, str, dict[bytes, ProtectRule]], None]
_TRANSFORMS: dict[str, Transform] = {}


def _transform(*names: str) -> Callable[[Transform], Transform]:
    def register(fn: Transform) -> Transform:
        for name in names:
            _TRANSFORMS[name] = fn
        return fn
    return register


def _bulk_reply(p: Protector, key: bytes, ad: bytes) -> Callable[[bytes], bytes]:
    """GET and friends: one bulk string (or a null), handled on the bytes directly."""

    def reply(frame: bytes) -> bytes:
        if frame[:1] != b"$" or frame[:3] == b"$-1":
            return frame  # null, or not a bulk string: nothing to decrypt
        start = frame.index(b"\r\n") + 2
        try:
            value = p.dec(key, frame[start:-2], ad)
        except DecryptError as exc:
            return _error(exc)
        return b"$%d\r\n%s\r\n" % (len(value), value)

    return reply


@_transform("get", "getdel", "getex")
def _get(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    key = plan.argv[1]
    plan.reply = _bulk_reply(p, key, associated(STRING, key))


@_transform("set")
def _set(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    argv = plan.argv
    key = argv[1]
    if len(argv) < 3:
        return  # Redis answers the arity error
    ad = associated(STRING, key)
    argv[2] = p.enc(argv[2], ad)
    if len(argv) > 3 and any(a.lower() == b"get" for a in argv[3:]):
        plan.reply = _bulk_reply(p, key, ad)


@_transform("getset")
def _getset(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    argv = plan.argv
    if len(argv) != 3:
        return
    key = argv[1]
    ad = associated(STRING, key)
    argv[2] = p.enc(argv[2], ad)
    plan.reply = _bulk_reply(p, key, ad)


@_transform("setnx")
def _setnx(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    if len(plan.argv) == 3:
        plan.argv[2] = p.enc(plan.argv[2], associated(STRING, plan.argv[1]))


@_transform("setex", "psetex")
def _setex(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    if len(plan.argv) == 4:
        plan.argv[3] = p.enc(plan.argv[3], associated(STRING, plan.argv[1]))


@_transform("mset", "msetnx")
def _mset(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    argv = plan.argv
    for i in range(1, len(argv) - 1, 2):
        if argv[i] in rules:
            argv[i + 1] = p.enc(argv[i + 1], associated(STRING, argv[i]))


@_transform("mget")
def _mget(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    keys = plan.argv[1:]

    def fn(node: resp.Node) -> resp.Node | None:
        if node.kind == resp.ARRAY and node.value is not None:
            for key, item in zip(keys, node.value, strict=False):
                if key in rules and item.kind == resp.BULK and item.value is not None:
                    item.value = p.dec(key, item.value, associated(STRING, key))
        return None

    plan.reply = _rewriting(fn)


# Hashes: a field's value is bound to key and field.
@_transform("hset", "hmset")
def _hset(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    argv = plan.argv
    key = argv[1]
    for i in range(2, len(argv) - 1, 2):
        argv[i + 1] = p.enc(argv[i + 1], associated(HASH, key, argv[i]))


@_transform("hsetnx")
def _hsetnx(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    argv = plan.argv
    if len(argv) == 4:
        argv[3] = p.enc(argv[3], associated(HASH, argv[1], argv[2]))


@_transform("hget")
def _hget(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    if len(plan.argv) == 3:
        key, fld = plan.argv[1], plan.argv[2]
        plan.reply = _bulk_reply(p, key, associated(HASH, key, fld))


@_transform("hmget")
def _hmget(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    key, fields = plan.argv[1], plan.argv[2:]

    def fn(node: resp.Node) -> resp.Node | None:
        if node.kind == resp.ARRAY and node.value is not None:
            for fld, item in zip(fields, node.value, strict=False):
                if item.kind == resp.BULK and item.value is not None:
                    item.value = p.dec(key, item.value, associated(HASH, key, fld))
        return None

    plan.reply = _rewriting(fn)


def _decrypt_pairs(p: Protector, key: bytes, items: list[resp.Node]) -> None:
    """field, value, field, value, ... (HGETALL in RESP2, a map's items in RESP3)."""
    for i in range(0, len(items) - 1, 2):
        fld, value = items[i], items[i + 1]
        if value.kind == resp.BULK and value.value is not None:
            value.value = p.dec(key, value.value, associated(HASH, key, fld.value or b""))


@_transform("hgetall")
def _hgetall(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    key = plan.argv[1]

    def fn(node: resp.Node) -> resp.Node | None:
        if node.kind in (resp.ARRAY, resp.MAP) and node.value:
            _decrypt_pairs(p, key, node.value)
        return None

    plan.reply = _rewriting(fn)


@_transform("hvals")
def _hvals(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    # The values alone cannot be decrypted (each is bound to its field): ask for the
    # fields too, and answer with the values, as HVALS would.
    if len(plan.argv) != 2:
        return
    key = plan.argv[1]
    plan.argv = [b"HGETALL", key]

    def fn(node: resp.Node) -> resp.Node | None:
        if node.kind not in (resp.ARRAY, resp.MAP) or node.value is None:
            return None
        _decrypt_pairs(p, key, node.value)
        return resp.Node(resp.ARRAY, node.value[1::2])

    plan.reply = _rewriting(fn)


@_transform("hrandfield")
def _hrandfield(p: Protector, plan: Plan, command: str,
                rules: dict[bytes, ProtectRule]) -> None:
    key = plan.argv[1]
    if not any(a.lower() == b"withvalues" for a in plan.argv[3:]):
        return  # field names only: no value crosses

    def fn(node: resp.Node) -> resp.Node | None:
        if node.kind != resp.ARRAY or not node.value:
            return None
        if node.value[0].kind == resp.ARRAY:  # RESP3: [[field, value], ...]
            for pair in node.value:
                if pair.value:
                    _decrypt_pairs(p, key, pair.value)
        else:
            _decrypt_pairs(p, key, node.value)
        return None

    plan.reply = _rewriting(fn)


@_transform("hscan")
def _hscan(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    key = plan.argv[1]

    def fn(node: resp.Node) -> resp.Node | None:
        if node.kind == resp.ARRAY and node.value and len(node.value) == 2 \
                and node.value[1].value:
            _decrypt_pairs(p, key, node.value[1].value)
        return None

    plan.reply = _rewriting(fn)


# Lists: elements are bound to their rule, so that they can move between its lists.
def _list_ad(rule: ProtectRule) -> bytes:
    return associated(LIST, rule.list_binding)


@_transform("lpush", "rpush", "lpushx", "rpushx")
def _push(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    argv = plan.argv
    ad = _list_ad(rules[argv[1]])
    for i in range(2, len(argv)):
        argv[i] = p.enc(argv[i], ad)


@_transform("lset")
def _lset(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    if len(plan.argv) == 4:
        plan.argv[3] = p.enc(plan.argv[3], _list_ad(rules[plan.argv[1]]))


def _decrypt_elements(p: Protector, key: bytes, ad: bytes, node: resp.Node) -> None:
    if node.kind == resp.BULK and node.value is not None:
        node.value = p.dec(key, node.value, ad)
    elif node.kind == resp.ARRAY and node.value:
        for item in node.value:
            if item.kind == resp.BULK and item.value is not None:
                item.value = p.dec(key, item.value, ad)


@_transform("lrange", "lindex", "lpop", "rpop")
def _list_read(p: Protector, plan: Plan, command: str,
               rules: dict[bytes, ProtectRule]) -> None:
    key = plan.argv[1]
    ad = _list_ad(rules[key])

    def fn(node: resp.Node) -> resp.Node | None:
        _decrypt_elements(p, key, ad, node)
        return None

    plan.reply = _rewriting(fn)


def _one_rule_for_all(command: str, keys: Sequence[bytes],
                      rules: dict[bytes, ProtectRule]) -> ProtectRule:
    """Commands that pop from or move between several lists: every list must be under the
    same rule (its elements are bound to it)."""
    first_key = next(k for k in keys if k in rules)
    rule = rules[first_key]
    for key in keys:
        if rules.get(key) is not rule:
            raise Refusal(command, key, rule, MOVES)
    return rule


@_transform("lmove", "blmove", "rpoplpush", "brpoplpush")
def _move(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    src, dst = plan.argv[1], plan.argv[2]
    rule = _one_rule_for_all(command, (src, dst), rules)
    ad = _list_ad(rule)

    def fn(node: resp.Node) -> resp.Node | None:
        _decrypt_elements(p, src, ad, node)
        return None

    plan.reply = _rewriting(fn)


def _popped_keys(command: str, argv: list[bytes]) -> list[bytes]:
    if command in ("blpop", "brpop"):
        return argv[1:-1]
    start = 2 if command == "blmpop" else 1  # blmpop timeout numkeys key ...
    try:
        count = int(argv[start])
    except (ValueError, IndexError):
        return []
    return argv[start + 1:start + 1 + count]


@_transform("blpop", "brpop", "lmpop", "blmpop")
def _pop_any(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    keys = _popped_keys(command, plan.argv)
    rule = _one_rule_for_all(command, keys, rules)
    ad = _list_ad(rule)

    def fn(node: resp.Node) -> resp.Node | None:
        # [key, element] (B*POP) or [key, [elements]] (*MPOP)
        if node.kind == resp.ARRAY and node.value and len(node.value) == 2:
            key = node.value[0].value or b""
            _decrypt_elements(p, key, ad, node.value[1])
        return None

    plan.reply = _rewriting(fn)


# Streams: a field's value is bound to key and field name.
def _xadd_fields_start(argv: list[bytes]) -> int:
    """Where XADD's field-value pairs begin (after the options and the id)."""
    i = 2
    while i < len(argv):
        word = argv[i].lower()
        if word == b"nomkstream":
            i += 1
        elif word in (b"maxlen", b"minid"):
            i += 2
            if i - 1 < len(argv) and argv[i - 1] in (b"=", b"~"):
                i += 1
            if i < len(argv) and argv[i].lower() == b"limit":
                i += 2
        else:
            return i + 1  # the id, then the pairs
    return len(argv)


@_transform("xadd")
def _xadd(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    argv = plan.argv
    key = argv[1]
    start = _xadd_fields_start(argv)
    for i in range(start, len(argv) - 1, 2):
        argv[i + 1] = p.enc(argv[i + 1], associated(STREAM, key, argv[i]))


def _decrypt_entries(p: Protector, key: bytes, entries: resp.Node) -> None:
    """[[id, [field, value, ...]], ...]; an entry or its fields may be null (deleted)."""
    for entry in entries.value or ():
        if entry.kind != resp.ARRAY or not entry.value or len(entry.value) < 2:
            continue
        fields = entry.value[1]
        items = fields.value or []
        for i in range(0, len(items) - 1, 2):
            value = items[i + 1]
            if value.kind == resp.BULK and value.value is not None:
                value.value = p.dec(key, value.value,
                                    associated(STREAM, key, items[i].value or b""))


@_transform("xrange", "xrevrange")
def _xrange(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    key = plan.argv[1]

    def fn(node: resp.Node) -> resp.Node | None:
        if node.kind == resp.ARRAY:
            _decrypt_entries(p, key, node)
        return None

    plan.reply = _rewriting(fn)


@_transform("xread", "xreadgroup")
def _xread(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    def fn(node: resp.Node) -> resp.Node | None:
        if node.value is None:
            return None
        if node.kind == resp.MAP:  # RESP3: key -> entries
            pairs = zip(node.value[0::2], node.value[1::2], strict=False)
        elif node.kind == resp.ARRAY:  # RESP2: [[key, entries], ...]
            pairs = ((item.value[0], item.value[1]) for item in node.value
                     if item.kind == resp.ARRAY and item.value and len(item.value) == 2)
        else:
            return None
        for key_node, entries in pairs:
            key = key_node.value or b""
            if key in rules:
                _decrypt_entries(p, key, entries)
        return None

    plan.reply = _rewriting(fn)


@_transform("xclaim")
def _xclaim(p: Protector, plan: Plan, command: str, rules: dict[bytes, ProtectRule]) -> None:
    key = plan.argv[1]
    if any(a.lower() == b"justid" for a in plan.argv[6:]):
        return

    def fn(node: resp.Node) -> resp.Node | None:
        if node.kind == resp.ARRAY:
            _decrypt_entries(p, key, node)
        return None

    plan.reply = _rewriting(fn)


@_transform("xautoclaim")
def _xautoclaim(p: Protector, plan: Plan, command: str,
                rules: dict[bytes, ProtectRule]) -> None:
    key = plan.argv[1]
    if any(a.lower() == b"justid" for a in plan.argv[6:]):
        return

    def fn(node: resp.Node) -> resp.Node | None:
        if node.kind == resp.ARRAY and node.value and len(node.value) >= 2:
            _decrypt_entries(p, key, node.value[1])
        return None

    plan.reply = _rewriting(fn)


assert set(_TRANSFORMS) == {n for n, c in CLASSES.items() if c == TRANSFORM}, \
    set(_TRANSFORMS) ^ {n for n, c in CLASSES.items() if c == TRANSFORM}


if __name__ == "__main__":
    print(markdown_table())
