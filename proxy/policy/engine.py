"""Compiled roles and `decide`: Redis 7 ACL semantics plus the stricter extras (SPEC §4).

`evaluate` is the reference: it walks the selectors the way Redis's
ACLCheckAllUserCommandPerm does (a command is allowed when one selector allows it; a
refusal reports the most specific failure), then applies the extras to the selector
that allowed it. `decide` is what sessions call: per role it holds a plan per command,
built at compile time, that answers the common allowed cases with a dict lookup and a
precompiled pattern match, and hands everything else to `evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from proxy.commands.keys import (
    CHANNEL_COMMANDS,
    GETKEYS,
    NO_KEYS,
    WIDER,
    KeyResult,
    extract_channels,
    extract_keys,
    has_keys,
)
from proxy.commands.table import (
    ACL_READ,
    ACL_RW,
    ACL_WRITE,
    KEY_INCOMPLETE,
    KEY_NOT_KEY,
    KEY_VARIABLE_FLAGS,
    CommandInfo,
    CommandTable,
    acl_permission,
    default_table,
)
from proxy.config import ConfigError, RoleConfig
from proxy.policy import errors
from proxy.policy import extras as ex
from proxy.policy.acl import AclError, RoleRules, Selector, parse_role
from proxy.policy.decision import Decision
from proxy.policy.filters import ReplyFilter, names_filter, scan_filter
from proxy.policy.glob import Matcher, compile_patterns

# ACL_DENIED_* (server.h): a refusal reports the highest kind any selector hit.
DENIED_COMMAND, DENIED_KEY, DENIED_CHANNEL = 1, 2, 4
_KIND_NAMES = {DENIED_COMMAND: "command", DENIED_KEY: "key", DENIED_CHANNEL: "channel"}

_DANGEROUS_CATEGORIES = frozenset(("admin", "dangerous"))
_PERM_NAMES = {0: "any access", ACL_READ: "read", ACL_WRITE: "write", ACL_RW: "read and write"}

# Commands whose verdict depends on arguments beyond their keys: always `evaluate`.
_ARGUMENT_DEPENDENT = frozenset(("sort", "sort_ro", "client|tracking"))


def _printable(raw: bytes, limit: int = 128) -> str:
    """A client-supplied name made safe for an error line and a log."""
    text = raw[:limit].decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() else "?" for ch in text)


# --------------------------------------------------------------------------- compiled roles


class CompiledSelector:
    """One selector's rules with its key and channel patterns compiled."""

    __slots__ = ("index", "rules", "allkeys", "allchannels", "read_all", "check",
                 "channel_match", "channel_literals")

    def __init__(self, index: int, rules: Selector):
        self.index = index
        self.rules = rules
        self.allkeys = rules.allkeys
        self.allchannels = rules.allchannels
        # check[perm](key): some pattern grants `perm` (every key permission is a subset).
        self.check: dict[int, Matcher] = {
            perm: compile_patterns([p.pattern for p in rules.keys if p.perm & perm == perm])
            for perm in (0, ACL_READ, ACL_WRITE, ACL_RW)
        }
        if rules.allkeys:
            self.check = dict.fromkeys(self.check, _always)
        # Redis's "unrestricted key access" (SORT BY/GET, our keyspace extra).
        self.read_all = rules.allkeys or any(
            p.pattern == b"*" and p.perm & ACL_READ for p in rules.keys)
        self.channel_match = compile_patterns([p for p, _ in rules.channels])
        self.channel_literals = frozenset(p for p, _ in rules.channels)

    def key_token(self, key: bytes, perm: int) -> str | None:
        """The rule that lets this selector touch `key` with `perm` (for explanations)."""
        if self.allkeys:
            return self.rules.allkeys_token
        for pattern in self.rules.keys:
            if pattern.perm & perm == perm and compile_patterns([pattern.pattern])(key):
                return pattern.token
        return None


def _always(_key: bytes) -> bool:
    return True


_new_tuple = tuple.__new__


def _factory(template: Decision) -> Callable[[tuple[bytes, ...]], Decision]:
    """`template` with other keys: its other fields, then the keys (the last field), in
    one tuple construction."""
    head = tuple(template)[:-1]

    def make(keys: tuple[bytes, ...]) -> Decision:
        return _new_tuple(Decision, head + (keys,))

    return make


Plan = Callable[[Sequence[bytes]], Decision]


class CompiledRole:
    """A role ready for `decide`: selectors, filters and one plan per command."""

    def __init__(self, config: RoleConfig, rules: RoleRules, table: CommandTable):
        self.name = config.name
        self.acl = config.acl
        self.dbs: frozenset[int] | None = None if config.dbs is None else frozenset(config.dbs)
        self.table = table
        self.rules = rules
        self.empty = rules.empty
        self.selectors = tuple(CompiledSelector(i, s) for i, s in enumerate(rules.selectors))
        self.read_all = any(s.read_all for s in self.selectors)
        read_patterns = [p.pattern for s in rules.selectors for p in s.keys if p.perm & ACL_READ]
        self.read_patterns = frozenset(read_patterns)
        self.read_prefixes = tuple(
            prefix for prefix in map(ex.prefix_star, read_patterns) if prefix is not None)
        self.key_readable: Matcher = _always if self.read_all else compile_patterns(read_patterns)
        self.all_channels = any(s.allchannels for s in self.selectors)
        channel_match = compile_patterns([p for s in rules.selectors for p, _ in s.channels])

        def channel_visible(channel: bytes) -> bool:
            if not (self.all_channels or channel_match(channel)):
                return False
            return self.read_all or not ex.channel_reveals_keys(channel, self.key_readable)

        self.channel_visible = channel_visible
        self.keys_filter: ReplyFilter | None = None
        self.scan_filter: ReplyFilter | None = None
        self.channels_filter: ReplyFilter | None = None
        if not self.read_all:
            self.keys_filter = names_filter(self.key_readable)
            self.scan_filter = scan_filter(self.key_readable)
        if not (self.all_channels and self.read_all):
            self.channels_filter = names_filter(channel_visible)
        self.plans: dict[bytes, Plan] = {}
        self._slow: Plan = lambda argv: evaluate(self, argv).decision
        for cmd in table.commands.values():
            plan = _container_plan(self, cmd) if cmd.subcommands else _leaf_plan(self, cmd)
            for spelling in {cmd.name, cmd.name.upper()}:
                self.plans[spelling.encode()] = plan

    def __repr__(self) -> str:
        return f"CompiledRole({self.name!r}, acl={self.acl!r})"


def compile_roles(roles: Mapping[str, RoleConfig],
                  table: CommandTable | None = None) -> dict[str, CompiledRole]:
    """Compile every role; ConfigError lists every bad role and token at once."""
    table = table or default_table()
    problems: list[str] = []
    compiled: dict[str, CompiledRole] = {}
    for name, config in roles.items():
        try:
            rules = parse_role(config.name or name, config.acl, table)
        except AclError as exc:
            problems.extend(exc.problems)
            continue
        if config.dbs is not None and any(db < 0 for db in config.dbs):
            problems.append(f"role '{name}': dbs must be database numbers (0 or more)")
            continue
        compiled[name] = CompiledRole(config, rules, table)
    if problems:
        raise ConfigError(problems)
    return compiled


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True, slots=True)
class Evaluation:
    """A decision with everything behind it (for explain and tests)."""

    decision: Decision
    # What Redis 7's ACL would say (None: Redis would not get that far, unknown command).
    redis_allowed: bool | None
    denied_kind: str | None = None  # "command" | "key" | "channel" (a Redis refusal)
    denied_arg: bytes | None = None  # the key or channel ACL DRYRUN would name
    detail: str = ""  # a sentence for humans
    selector: int | None = None  # the selector that allowed (0: root)


def _grant(sel: CompiledSelector, cmd: CommandInfo,
           argv: Sequence[bytes]) -> tuple[bool, str | None, bool]:
    """(permitted, deciding rule token, granted by a first-argument rule)."""
    rules = sel.rules
    name = cmd.name
    if "no_auth" in cmd.flags:
        return True, None, False  # Redis never checks no_auth commands (AUTH, HELLO, ...)
    if rules.allowed.get(name, False):
        return True, rules.decided_by.get(name), False
    firstargs = rules.firstargs.get(name)
    if firstargs and len(argv) >= 2:
        arg = argv[2 if cmd.parent else 1].split(b"\0", 1)[0].lower()  # C strcasecmp
        for allowed, token in firstargs:
            if allowed == arg:
                return True, token, True
    return False, rules.decided_by.get(name), False


def _extra(role: CompiledRole, sel: CompiledSelector, cmd: CommandInfo, argv: Sequence[bytes],
           keys: KeyResult, by_name: bool) -> tuple[str, str] | None:
    """The stricter extra refusing what Redis allowed through `sel`, with a sentence."""
    name = cmd.name
    rules = sel.rules
    if role.empty:
        return ex.UNKNOWN_COMMAND, "the role has no rules, so every command is refused"
    dangerous = cmd.categories & _DANGEROUS_CATEGORIES
    if dangerous and not (by_name or rules.explicit.get(name, False)):
        category = "@" + "/@".join(sorted(dangerous))
        return ex.DANGEROUS, (
            f"'{name}' is in {category} and the role grants it only through "
            f"{rules.decided_by.get(name)!r}; grant it by name (+{name}), +@admin, "
            "+@dangerous or +@all")
    if ex.is_scripting(name) and not sel.allkeys and not (
            by_name or rules.scripting.get(name, False)):
        return ex.SCRIPTING, (
            f"'{name}' runs code that can touch any key; a role without allkeys needs "
            f"it granted by name (+{name}) or by +@scripting")
    if not sel.read_all:
        if name in ex.REVEALS_KEYS:
            return ex.KEYSPACE, f"'{name}' reveals key names and the role cannot read every key"
        if name in ("sort", "sort_ro") and ex.sort_uses_patterns(argv):
            return ex.SORT_PATTERN, (
                "SORT with BY/GET patterns reads keys it does not name; it needs allkeys "
                "(or %R~*), as Redis itself requires")
    if not role.read_all:
        reason = _keyspace_channels(role, name, argv)
        if reason:
            return ex.KEYSPACE, reason
    if role.dbs is not None and name in ex.DB_COMMANDS and not ex.dbs_allowed(name, argv, role.dbs):
        return ex.DB, _db_sentence(name, sorted(role.dbs))
    if not sel.allkeys:
        if not keys.located:
            return ex.UNCHECKED_KEYS, (
                "the keys of this command cannot be located (malformed arguments), and the "
                "role lacks allkeys")
        for pos, flags in keys.extra:
            if not sel.check[acl_permission(flags)](argv[pos]):
                return ex.UNCHECKED_KEYS, (
                    f"argument {_printable(argv[pos])!r} may be a key Redis's own check "
                    "skips, and no key pattern allows it")
    return None


def _db_sentence(name: str, dbs: list[int]) -> str:
    if name in ex.SCRIPT_RUNNERS:
        why = "a script can SELECT any database"
    elif name == "flushall":
        why = "FLUSHALL empties every database"
    elif name == "reset":
        why = "RESET returns the connection to database 0"
    else:
        why = f"'{name}' names a database outside them"
    return f"the role is limited to databases {dbs} and {why}"


def _keyspace_channels(role: CompiledRole, name: str, argv: Sequence[bytes]) -> str:
    if name == "subscribe":
        for channel in argv[1:]:
            if ex.channel_reveals_keys(channel, role.key_readable):
                return (f"channel {_printable(channel)!r} carries key names the role "
                        "cannot read (keyspace notifications)")
    elif name == "psubscribe":
        for pattern in argv[1:]:
            if ex.pattern_reveals_keys(pattern, role.read_prefixes, role.read_patterns):
                return (f"pattern {_printable(pattern)!r} may match keyspace notification "
                        "channels of keys the role cannot read")
    elif name == "client|tracking":
        lowered = [a.lower() for a in argv[2:]]
        if lowered[:1] == [b"on"] and b"bcast" in lowered:
            prefixes = [argv[i + 3] for i, a in enumerate(lowered[:-1]) if a == b"prefix"]
            if not prefixes or not all(
                    p.startswith(role.read_prefixes) if role.read_prefixes else False
                    for p in prefixes):
                return ("CLIENT TRACKING BCAST would report changes to keys outside the "
                        "role's read patterns; give PREFIXes inside them")
    return ""


def _reply_filter(role: CompiledRole, name: str) -> ReplyFilter | None:
    if name == "keys":
        return role.keys_filter
    if name == "scan":
        return role.scan_filter
    if name in ("pubsub|channels", "pubsub|shardchannels"):
        return role.channels_filter
    return None


def _keyless_sensitive(name: str, argv: Sequence[bytes]) -> bool:
    if name in ("sort", "sort_ro"):
        return ex.sort_uses_patterns(argv)
    return name in ex.KEYLESS_SENSITIVE


def _key_positions(result: KeyResult) -> list[int]:
    if not result.extra and len(result.keys) == 1:
        return [result.keys[0][0]]
    return sorted({pos for pos, _ in result.keys} | {pos for pos, _ in result.extra})


def _unknown(argv: Sequence[bytes], table: CommandTable) -> Evaluation:
    label = _printable(argv[0].lower()) if argv else ""
    container = table.by_bytes.get(argv[0].lower()) if argv else None
    if container is not None and len(argv) > 1:
        label += "|" + _printable(argv[1].lower())
        what = f"'{label}' is not a subcommand the command table knows"
        error = errors.unknown_subcommand(argv)
    else:
        what = f"'{label}' is not a command the command table knows"
        error = errors.unknown_command(argv) if argv else errors.noperm_command(label)
    # Answered as Redis answers it (clients probe for features so), and still a refusal
    # with its audit record: the default deny of a command nobody could have granted.
    return Evaluation(
        Decision(False, label, reason=f"{ex.UNKNOWN_COMMAND}: {what}", extra=ex.UNKNOWN_COMMAND,
                 error=error),
        None, detail=f"refused: {what} (default deny)")


def evaluate(role: CompiledRole, argv: Sequence[bytes], explain: bool = False) -> Evaluation:
    """The full decision for one command (argv[0] in any case); `explain` also names the
    rule behind each key in `detail` (slower)."""
    cmd = role.table.lookup(argv) if argv else None
    if cmd is None:
        return _unknown(argv, role.table)
    name = cmd.name
    keys = extract_keys(cmd, argv) if has_keys(cmd) else NO_KEYS
    positions = _key_positions(keys) if keys.keys or keys.extra else []
    key_bytes = tuple(argv[p] for p in positions)
    channel_rule = CHANNEL_COMMANDS.get(name)
    channels = extract_channels(cmd, argv) if channel_rule else ()
    literal = bool(channel_rule and channel_rule[2])
    sensitive = _keyless_sensitive(name, argv)

    best_kind, best_idx = DENIED_COMMAND, 0
    refusal: tuple[str, str, CompiledSelector, str | None] | None = None
    for sel in role.selectors:
        granted, token, by_name = _grant(sel, cmd, argv)
        if not granted:
            continue
        failed_kind, failed_idx = 0, 0
        if not sel.allkeys:
            for pos, flags in keys.keys:
                if not sel.check[acl_permission(flags)](argv[pos]):
                    failed_kind, failed_idx = DENIED_KEY, pos
                    break
        if not failed_kind and channel_rule and not sel.allchannels:
            for pos in channels:
                channel = argv[pos]
                ok = (channel.split(b"\0", 1)[0] in sel.channel_literals if literal
                      else sel.channel_match(channel))
                if not ok:
                    failed_kind, failed_idx = DENIED_CHANNEL, pos
                    break
        if failed_kind:
            if failed_kind > best_kind or (failed_kind == best_kind and failed_idx > best_idx):
                best_kind, best_idx = failed_kind, failed_idx
            continue
        extra = _extra(role, sel, cmd, argv, keys, by_name)
        if extra is None:
            decision = Decision(
                True, name, reason=_allowed_reason(name, token), rule=token, keys=key_bytes,
                reply_filter=_reply_filter(role, name), keyless_sensitive=sensitive)
            detail = (_allowed_detail(sel, cmd, argv, keys, token) if explain
                      else decision.reason)
            return Evaluation(decision, True, detail=detail, selector=sel.index)
        if refusal is None:
            refusal = (extra[0], extra[1], sel, token)

    if refusal is not None:
        extra_name, sentence, sel, token = refusal
        decision = Decision(False, name, reason=f"{extra_name}: {sentence}", rule=token,
                            extra=extra_name, error=errors.noperm_command(name),
                            keys=key_bytes, keyless_sensitive=sensitive)
        return Evaluation(decision, True, detail=f"refused by the {extra_name} extra: {sentence}",
                          selector=sel.index)

    kind = _KIND_NAMES[best_kind]
    detail = ""
    if best_kind == DENIED_COMMAND:
        text = errors.command_text(name)
        error = errors.wire(text)
        token = role.selectors[0].rules.decided_by.get(name)
        arg = None
        if explain:
            detail = (f"refused: '{name}' is not granted" +
                      (f" (last changed by {token!r})" if token else " by any rule"))
    else:
        text, error = ((errors.KEY_TEXT, errors.NOPERM_KEY) if best_kind == DENIED_KEY
                       else (errors.CHANNEL_TEXT, errors.NOPERM_CHANNEL))
        token = None
        arg = argv[best_idx]
        if explain:
            perm = next((acl_permission(f) for p, f in keys.keys if p == best_idx), 0)
            detail = (f"refused: {kind} {_printable(arg)!r} matches no {kind} pattern" +
                      (f" allowing {_PERM_NAMES[perm]}" if best_kind == DENIED_KEY else ""))
    decision = Decision(False, name, reason=text, rule=token, error=error,
                        keys=key_bytes, keyless_sensitive=sensitive)
    return Evaluation(decision, False, denied_kind=kind, denied_arg=arg, detail=detail)


def _allowed_reason(name: str, token: str | None) -> str:
    if token is None:
        return f"'{name}' is always allowed (Redis does not check it)"
    return f"'{name}' allowed by {token}"


def _allowed_detail(sel: CompiledSelector, cmd: CommandInfo, argv: Sequence[bytes],
                    keys: KeyResult, token: str | None) -> str:
    where = "" if sel.index == 0 else f" in selector {sel.index}"
    parts = [_allowed_reason(cmd.name, token) + where]
    for pos, flags in keys.keys + keys.extra:
        perm = acl_permission(flags)
        parts.append(f"key {_printable(argv[pos])!r} ({_PERM_NAMES[perm]}) allowed by "
                     f"{sel.key_token(argv[pos], perm)}")
    return "; ".join(parts)


def decide(role: CompiledRole, argv: Sequence[bytes]) -> Decision:
    """The decision for one command; argv[0] in any case."""
    try:
        plan = role.plans.get(argv[0])
    except IndexError:  # an empty command: nothing to run
        return evaluate(role, argv).decision
    if plan is None:
        plan = role.plans.get(argv[0].lower())
        if plan is None:
            return evaluate(role, argv).decision
    return plan(argv)


# --------------------------------------------------------------------------- plans


def _container_plan(role: CompiledRole, cmd: CommandInfo) -> Plan:
    subplans: dict[bytes, Plan] = {}
    for key, sub in cmd.subcommands.items():
        plan = _leaf_plan(role, sub)
        subplans[key] = plan
        subplans[key.upper()] = plan
    slow = role._slow

    def plan(argv: Sequence[bytes]) -> Decision:
        if len(argv) < 2:
            return slow(argv)
        sub = subplans.get(argv[1]) or subplans.get(argv[1].lower())
        return slow(argv) if sub is None else sub(argv)

    return plan


def _simple_specs(cmd: CommandInfo) -> list[tuple[int, int, int, int]] | None:
    """(index, lastkey, keystep, permission) per key spec, when every spec is a plain
    index+range (positions follow from argc alone, no getkeys function involved)."""
    if cmd.name in GETKEYS or cmd.name in WIDER:
        return None
    out = []
    for spec in cmd.key_specs:
        if spec.flags & KEY_NOT_KEY:
            continue
        if spec.flags & (KEY_INCOMPLETE | KEY_VARIABLE_FLAGS) or spec.begin_search != "index" \
                or spec.find_keys != "range" or spec.limit or spec.keystep < 1:
            return None
        out.append((spec.index, spec.lastkey, spec.keystep, acl_permission(spec.flags)))
    return out or None  # no spec: only a getkeys function knows the keys


def _leaf_plan(role: CompiledRole, cmd: CommandInfo) -> Plan:
    slow = role._slow
    name = cmd.name
    if role.empty or name in _ARGUMENT_DEPENDENT or name in CHANNEL_COMMANDS:
        return slow
    if role.dbs is not None and name in ex.DB_COMMANDS:
        return slow
    if any(s.rules.firstargs.get(name) for s in role.selectors):
        return slow
    argv0 = [cmd.parent.encode(), name.partition("|")[2].encode()] if cmd.parent else \
        [name.encode()]
    # Selectors that grant the command and add no static extra, in order.
    open_selectors = []
    for sel in role.selectors:
        granted, token, by_name = _grant(sel, cmd, argv0)
        if granted and _extra(role, sel, cmd, argv0, NO_KEYS, by_name) is None:
            open_selectors.append((sel, token))
    if not has_keys(cmd):
        constant = evaluate(role, argv0).decision  # keyless: the arguments change nothing
        return lambda argv: constant
    if not open_selectors:
        return slow
    specs = _simple_specs(cmd)
    if specs is None:
        return _keyed_plan(role, cmd, open_selectors)
    return _simple_keys_plan(role, cmd, specs, open_selectors)


def _template(name: str, token: str | None, sensitive: bool) -> Decision:
    return Decision(True, name, _allowed_reason(name, token), token, keyless_sensitive=sensitive)


def _simple_keys_plan(role: CompiledRole, cmd: CommandInfo, specs: list[tuple[int, int, int, int]],
                      open_selectors: list[tuple[CompiledSelector, str | None]]) -> Plan:
    """Keys at positions that follow from argc (GET, MSET, LMOVE...)."""
    slow = role._slow
    name, arity = cmd.name, cmd.arity
    sensitive = name in ex.KEYLESS_SENSITIVE
    allowed = [(sel.check, _factory(_template(name, token, sensitive)))
               for sel, token in open_selectors]

    if len(specs) == 1 and specs[0][1] == 0 and 0 < specs[0][0] < arity and len(allowed) == 1:
        # One key at a fixed position (GET, HGET, INCR, ...): the hot path.
        pos, _, _, perm = specs[0]
        check, make = allowed[0][0][perm], allowed[0][1]

        def one_key(argv: Sequence[bytes]) -> Decision:
            if len(argv) == arity:
                key = argv[pos]
                if check(key):
                    return make((key,))
            return slow(argv)

        return one_key

    if len(specs) == 1:
        # One range (MGET, MSET, DEL, ...): the keys are a slice of argv.
        first, lastkey, step, perm = specs[0]
        ranged = [(checks[perm], make) for checks, make in allowed]

        def one_range(argv: Sequence[bytes]) -> Decision:
            argc = len(argv)
            if argc == arity if arity > 0 else argc >= -arity:
                last = first + lastkey if lastkey >= 0 else argc + lastkey
                if first <= last < argc:
                    keys = tuple(argv[first:last + 1:step])
                    for check, make in ranged:
                        if all(map(check, keys)):
                            return make(keys)
            return slow(argv)

        return one_range

    def many_keys(argv: Sequence[bytes]) -> Decision:
        argc = len(argv)
        if not (argc == arity if arity > 0 else argc >= -arity):
            return slow(argv)
        found: list[tuple[int, int]] = []
        for first, lastkey, step, perm in specs:
            last = first + lastkey if lastkey >= 0 else argc + lastkey
            if last >= argc or last < first or first >= argc:
                return slow(argv)
            found.extend((i, perm) for i in range(first, last + 1, step))
        for checks, make in allowed:
            for pos, perm in found:
                if not checks[perm](argv[pos]):
                    break
            else:
                return make(tuple(argv[p] for p in sorted({p for p, _ in found})))
        return slow(argv)

    return many_keys


def _keyed_plan(role: CompiledRole, cmd: CommandInfo,
                open_selectors: list[tuple[CompiledSelector, str | None]]) -> Plan:
    """Keys found by the general extraction (SET's getkeys, keyword and numkeys specs);
    anything unusual (malformed, keys Redis does not check) goes to `evaluate`."""
    slow = role._slow
    name = cmd.name
    sensitive = name in ex.KEYLESS_SENSITIVE
    allowed = [(sel.check, _factory(_template(name, token, sensitive)))
               for sel, token in open_selectors]

    if name == "set" and len(allowed) == 1:
        # The commonest write. Its key is read too when GET is among the options.
        write, read_write = allowed[0][0][ACL_WRITE], allowed[0][0][ACL_RW]
        make = allowed[0][1]

        def set_plan(argv: Sequence[bytes]) -> Decision:
            argc = len(argv)
            if argc == 3:
                if write(argv[1]):
                    return make((argv[1],))
            elif argc > 3:
                check = read_write if b"get" in [a.lower() for a in argv[3:]] else write
                if check(argv[1]):
                    return make((argv[1],))
            return slow(argv)

        return set_plan

    def keyed(argv: Sequence[bytes]) -> Decision:
        if not cmd.arity_ok(len(argv)):
            return slow(argv)
        result = extract_keys(cmd, argv)
        if result.extra or not result.located:
            return slow(argv)
        found = [(pos, acl_permission(flags)) for pos, flags in result.keys]
        for checks, make in allowed:
            for pos, perm in found:
                if not checks[perm](argv[pos]):
                    break
            else:
                positions = _key_positions(result) if found else []
                return make(tuple(argv[p] for p in positions))
        return slow(argv)

    return keyed
