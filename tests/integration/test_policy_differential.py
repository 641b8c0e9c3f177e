"""The policy engine against Redis 7 itself (SPEC §4).

A real redis-server is the oracle:
  - `ACL SETUSER u reset on nopass <rules>` + `ACL DRYRUN u <command...>` for decisions,
  - `ACL SETUSER` accepting or refusing a rule string, for the parser,
  - `COMMAND GETKEYSANDFLAGS` for key extraction,
  - `%R~<pattern>` users and `ACL DRYRUN ... GET <key>` for glob matching.

Seeded generators produce role rules (categories, commands, subcommands, first-args, key
patterns with %R/%W, channel patterns, allkeys/resetkeys, selectors) and commands across
the whole command table (argument shapes from COMMAND DOCS, plus raw fuzz), in mixed case.
The contract: phiproxy never allows what Redis refuses, and every refusal Redis would not
make carries a stricter extra. Cases Redis will not dry-run (wrong arity, unknown
subcommand) are excluded, counted and reported, never silently dropped.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy.commands.keys import extract_keys, has_keys
from proxy.commands.table import ACL_CATEGORIES, KEY_FLAG_BITS, CommandTable, default_table
from proxy.config import ConfigError, RoleConfig
from proxy.policy.acl import AclError, parse_role
from proxy.policy.engine import CompiledRole, compile_roles, decide, evaluate
from proxy.policy.glob import compile_glob

SEED = 20240607

# --------------------------------------------------------------------------- the oracle


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Oracle:
    client: redis.Redis
    docs: dict[str, Any]
    version: str

    def raw(self, *args: Any) -> Any:
        conn = self.client.connection_pool.get_connection()
        try:
            conn.send_command(*args)
            return conn.read_response()
        finally:
            self.client.connection_pool.release(conn)

    def pipeline_raw(self, commands: list[tuple[Any, ...]], chunk: int = 5000) -> list[Any]:
        """Replies of many commands, errors as ResponseError objects, no callbacks."""
        out: list[Any] = []
        conn = self.client.connection_pool.get_connection()
        try:
            for start in range(0, len(commands), chunk):
                part = commands[start:start + chunk]
                conn.send_packed_command(conn.pack_commands(part))
                for _ in part:
                    try:
                        out.append(conn.read_response())
                    except redis.ResponseError as exc:
                        out.append(exc)
        finally:
            self.client.connection_pool.release(conn)
        return out


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Oracle]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():  # fail, never skip: this test is the policy's proof
        pytest.fail("redis-server (Redis 7) is required for the policy differential test")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis-oracle")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not start (see {workdir / 'redis.log'})")
                time.sleep(0.05)
        client = redis.Redis(port=port, protocol=3)
        version = client.info("server")["redis_version"]
        assert version.startswith("7."), f"the oracle must be Redis 7, got {version}"
        oracle = Oracle(client, {}, version)
        docs = oracle.raw("COMMAND", "DOCS")
        oracle.docs = {k.decode().lower(): v for k, v in docs.items()}
        yield oracle
        client.close()
    finally:
        proc.terminate()
        proc.wait(5)


# --------------------------------------------------------------------------- generators

KEYS_POOL = [b"app:1", b"app:phi:9", b"app:phi:x:y", b"k1", b"ka", b"kb2", b"x", b"other",
             b"", b"*", b"app:", b"K1", b"stream", b"STORE", b"streams", b"\xff\x00k"]
KEY_PATTERNS = ["app:*", "app:phi:*", "k?", "k[ab]*", "x", "*", "other", "app:phi:x:*", "",
                "k\\?", "[^a]*", "*2", "K*"]
CHANNELS_POOL = [b"news.a", b"news.b", b"chat", b"x", b"*", b"news.*", b"n?ws.a", b"",
                 b"__keyspace@0__:app:1", b"__keyspace@0__:other", b"__keyevent@0__:set"]
CHANNEL_PATTERNS = ["news.*", "chat", "*", "x", "news.a", "n?ws.*", "__keyspace@0__:app:*"]
WORDS = [b"0", b"1", b"2", b"3", b"-1", b"01", b"10", b"1.5", b"STORE", b"STOREDIST", b"BY",
         b"GET", b"LIMIT", b"KEYS", b"STREAMS", b"GROUP", b"COUNT", b"BLOCK", b"#", b"w_*",
         b"nosort", b"AUTH", b"REPLACE", b"DB", b"ON", b"OFF", b"BCAST", b"PREFIX", b"app:"]


def _case(rnd: random.Random, word: str) -> str:
    roll = rnd.random()
    if roll < 0.6:
        return word
    if roll < 0.8:
        return word.upper()
    return "".join(c.upper() if rnd.random() < 0.5 else c for c in word)


def gen_rules(rnd: random.Random, table: CommandTable, depth: int = 0) -> list[str]:
    names = [c.name for c in table]
    tops = list(table.commands.values())
    plain = [c.name for c in tops if not c.subcommands]
    tokens: list[str] = []
    for _ in range(rnd.randint(1, 7)):
        roll = rnd.random()
        if roll < 0.22:
            cat = rnd.choice([*ACL_CATEGORIES, "all"])
            tokens.append(_case(rnd, ("+@" if rnd.random() < 0.65 else "-@") + cat))
        elif roll < 0.40:
            tokens.append(_case(rnd, ("+" if rnd.random() < 0.7 else "-") + rnd.choice(names)))
        elif roll < 0.44:
            first = rnd.choice(["0", "1", "get", "k1", "app:1"])
            tokens.append(f"+{_case(rnd, rnd.choice(plain))}|{first}")
        elif roll < 0.47:
            tokens.append(rnd.choice(["allcommands", "nocommands", "ALLCOMMANDS"]))
        elif roll < 0.68:
            prefix = rnd.choice(["~", "~", "%R~", "%W~", "%RW~", "%wr~"])
            tokens.append(prefix + rnd.choice(KEY_PATTERNS))
        elif roll < 0.74:
            tokens.append(rnd.choice(["allkeys", "resetkeys", "~*", "AllKeys"]))
        elif roll < 0.84:
            tokens.append("&" + rnd.choice(CHANNEL_PATTERNS))
        elif roll < 0.88:
            tokens.append(rnd.choice(["allchannels", "resetchannels", "&*"]))
        elif roll < 0.94 and depth == 0:
            tokens.append("(" + " ".join(gen_rules(rnd, table, 1)) + ")")
        elif depth == 0:
            tokens.append(rnd.choice(["clearselectors", "reset", "on"]))
    return tokens


def _token_value(rnd: random.Random, arg: dict, ctx: Context) -> list[bytes]:
    kind = arg[b"type"]
    name = arg[b"name"].decode()
    if kind == b"key":
        return [ctx.key()]
    if kind == b"pure-token":
        return []
    if kind == b"integer":
        return [rnd.choice([b"0", b"1", b"2", b"10", b"-1"])]
    if kind == b"double":
        return [rnd.choice([b"1.5", b"0", b"-2"])]
    if kind == b"unix-time":
        return [b"1700000000"]
    if kind in (b"string", b"pattern"):
        if "channel" in name or (ctx.pubsub and name == "pattern"):
            return [rnd.choice(CHANNELS_POOL)]
        return [rnd.choice(WORDS + KEYS_POOL)]
    if kind == b"oneof":
        return _gen_arg(rnd, rnd.choice(arg[b"arguments"]), ctx, forced=True)
    if kind == b"block":
        return _gen_args(rnd, arg[b"arguments"], ctx)
    return [b"?"]


def _gen_arg(rnd: random.Random, arg: dict, ctx: Context, forced: bool = False,
             count: int | None = None) -> list[bytes]:
    flags = {f.decode() for f in arg.get(b"flags", [])}
    if "optional" in flags and not forced and rnd.random() < 0.5:
        return []
    if count is None:
        count = rnd.randint(1, 3) if "multiple" in flags else 1
    token = arg.get(b"token")
    out: list[bytes] = []
    for i in range(count):
        if token is not None and (i == 0 or "multiple_token" in flags):
            out.append(_case(rnd, token.decode()).encode())
        out.extend(_token_value(rnd, arg, ctx))
    return out


def _gen_args(rnd: random.Random, args: list[dict], ctx: Context) -> list[bytes]:
    out: list[bytes] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg[b"name"].decode()
        nxt = args[i + 1] if i + 1 < len(args) else None
        nxt_flags = {f.decode() for f in nxt.get(b"flags", [])} if nxt else set()
        if name == "numkeys" and nxt is not None and "multiple" in nxt_flags:
            count = rnd.randint(0 if "optional" in nxt_flags else 1, 3)
            values = _gen_arg(rnd, nxt, ctx, forced=True, count=count) if count else []
            out.append(str(count).encode())
            out.extend(values)
            i += 2
            continue
        flags = {f.decode() for f in arg.get(b"flags", [])}
        if "multiple" in flags and nxt is not None and "multiple" in nxt_flags \
                and arg[b"type"] == b"key":
            count = rnd.randint(1, 3)  # XREAD STREAMS key... id...: as many ids as keys
            out.extend(_gen_arg(rnd, arg, ctx, forced=True, count=count))
            out.extend(_gen_arg(rnd, nxt, ctx, forced=True, count=count))
            i += 2
            continue
        out.extend(_gen_arg(rnd, arg, ctx))
        i += 1
    return out


@dataclass
class Context:
    rnd: random.Random
    role_keys: list[bytes]
    pubsub: bool = False

    def key(self) -> bytes:
        if self.role_keys and self.rnd.random() < 0.5:
            return self.rnd.choice(self.role_keys)
        return self.rnd.choice(KEYS_POOL)


def _keys_for(role: CompiledRole) -> list[bytes]:
    """Keys that match some pattern of the role, to get past key checks often enough."""
    patterns = [p.pattern for s in role.rules.selectors for p in s.keys]
    return [k for k in KEYS_POOL if any(compile_glob(p)(k) for p in patterns)]


def gen_command(rnd: random.Random, oracle: Oracle, table: CommandTable, name: str,
                role: CompiledRole | None) -> list[bytes]:
    cmd = table.get(name)
    assert cmd is not None
    ctx = Context(rnd, _keys_for(role) if role else [], pubsub=cmd.group == "pubsub")
    if cmd.parent:
        head = [_case(rnd, cmd.parent).encode(), _case(rnd, name.partition("|")[2]).encode()]
        doc = oracle.docs[cmd.parent][b"subcommands"].get(name.encode(), {})
    else:
        head = [_case(rnd, name).encode()]
        doc = oracle.docs.get(name, {})
    if rnd.random() < 0.2 or not doc:
        # Raw fuzz: arguments from a small vocabulary, any number the arity allows.
        need = abs(cmd.arity) - len(head)
        extra = need if cmd.arity > 0 else need + rnd.randint(0, 5)
        pool = WORDS + KEYS_POOL + ctx.role_keys * 3
        return head + [rnd.choice(pool) for _ in range(max(extra, 0))]
    return head + _gen_args(rnd, doc.get(b"arguments", []), ctx)


# --------------------------------------------------------------------------- comparison


@dataclass
class Split:
    cases: int = 0
    both_allow: int = 0
    both_deny: int = 0
    stricter: Counter = field(default_factory=Counter)  # extra -> count (Redis allowed)
    extra_on_redis_deny: Counter = field(default_factory=Counter)  # both deny, ours by extra
    excluded: Counter = field(default_factory=Counter)  # why Redis could not dry-run it
    rule_sets: int = 0
    rule_sets_refused_by_both: int = 0
    failures: list[str] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)  # a few per category

    def example(self, category: str, rules: str, argv: list[bytes], note: str = "") -> None:
        bucket = self.examples.setdefault(category, [])
        if len(bucket) < 3:
            bucket.append(f"{rules!r} {argv!r} {note}".rstrip())

    def report(self) -> str:
        stricter = sum(self.stricter.values())
        return (f"cases={self.cases} both_allow={self.both_allow} both_deny={self.both_deny} "
                f"stricter_by_extra={stricter} {dict(self.stricter)} "
                f"(both deny, ours by extra: {dict(self.extra_on_redis_deny)}) "
                f"excluded={sum(self.excluded.values())} {dict(self.excluded)} "
                f"rule_sets={self.rule_sets} refused_by_both={self.rule_sets_refused_by_both}")


def _dryrun_text(kind: str, arg: bytes | None, command: str) -> bytes:
    if kind == "command":
        return f"This user has no permissions to run the '{command}' command".encode()
    assert arg is not None
    name = arg.split(b"\0", 1)[0]  # DRYRUN formats with %s: a C string
    return b"This user has no permissions to access the '" + name + b"' " + kind.encode()


def run_differential(oracle: Oracle, rnd: random.Random, rule_sets: int,
                     commands_per_set: int) -> Split:
    table = default_table()
    split = Split()
    all_names = [c.name for c in table]
    pending: list[tuple[str, str, CompiledRole | None, list[bytes]]] = []
    setusers: list[tuple[Any, ...]] = []
    roles: list[tuple[str, str, CompiledRole | None]] = []
    for i in range(rule_sets):
        rules = gen_rules(rnd, table)
        user = f"d{i}"
        try:
            role = compile_roles({user: RoleConfig(user, " ".join(rules))})[user]
        except ConfigError:
            role = None
        roles.append((user, " ".join(rules), role))
        setusers.append(("ACL", "SETUSER", user, "reset", "on", "nopass", *rules))
    replies = oracle.pipeline_raw(setusers)
    dryruns: list[tuple[Any, ...]] = []
    for (user, rules, role), reply in zip(roles, replies, strict=True):
        split.rule_sets += 1
        redis_ok = not isinstance(reply, Exception)
        if role is not None and not redis_ok:
            split.failures.append(f"rules {rules!r}: Redis refuses them ({reply}), phiproxy "
                                  "accepts them")
            continue
        if role is None:
            if redis_ok:
                split.failures.append(f"rules {rules!r}: phiproxy refuses rules Redis accepts")
            else:
                split.rule_sets_refused_by_both += 1
            continue
        granted = [c.name for c in table
                   if any(s.rules.allowed.get(c.name) for s in role.selectors)]
        for _ in range(commands_per_set):
            name = rnd.choice(granted) if granted and rnd.random() < 0.6 else rnd.choice(all_names)
            argv = gen_command(rnd, oracle, table, name, role)
            pending.append((user, rules, role, argv))
            dryruns.append(("ACL", "DRYRUN", user, *argv))
    results = oracle.pipeline_raw(dryruns)
    for (_user, rules, role, argv), reply in zip(pending, results, strict=True):
        assert role is not None
        evaluation = evaluate(role, argv)
        ours = decide(role, argv)
        if ours != evaluation.decision:
            split.failures.append(f"{rules!r} {argv!r}: decide() {ours} != evaluate() "
                                  f"{evaluation.decision}")
        if isinstance(reply, Exception):
            text = str(reply)
            reason = ("wrong arity" if "wrong number of arguments" in text else
                      "command not found" if "not found" in text else text)
            split.excluded[reason] += 1
            split.example("excluded: " + reason, rules, argv)
            continue
        split.cases += 1
        redis_allows = reply in (b"OK", "OK")
        if ours.allowed and redis_allows:
            split.both_allow += 1
        elif ours.allowed:
            split.failures.append(f"{rules!r} {argv!r}: phiproxy ALLOWS, Redis refuses: {reply!r}")
        elif redis_allows:
            if ours.extra is None:
                split.failures.append(f"{rules!r} {argv!r}: phiproxy refuses without an extra "
                                      f"({ours.reason}), Redis allows")
            else:
                split.stricter[ours.extra] += 1
                split.example("stricter: " + ours.extra, rules, argv, ours.reason)
        else:
            split.both_deny += 1
            if ours.extra is not None:
                split.extra_on_redis_deny[ours.extra] += 1
            else:
                expected = _dryrun_text(evaluation.denied_kind or "", evaluation.denied_arg,
                                        ours.command)
                if reply != expected:
                    split.failures.append(f"{rules!r} {argv!r}: refusal differs: Redis "
                                          f"{reply!r}, phiproxy {expected!r}")
    return split


def _assert_clean(split: Split) -> None:
    print("\npolicy differential:", split.report())
    for category, examples in sorted(split.examples.items()):
        for example in examples:
            print(f"  {category}: {example}")
    assert not split.failures, "\n".join(split.failures[:30])


def test_policy_differential(oracle: Oracle) -> None:
    split = run_differential(oracle, random.Random(SEED), rule_sets=300, commands_per_set=24)
    _assert_clean(split)
    assert split.cases >= 5000
    assert split.both_allow >= 500 and split.both_deny >= 500


@pytest.mark.slow
def test_policy_differential_large(oracle: Oracle) -> None:
    total = Split()
    for round_ in range(20):
        split = run_differential(oracle, random.Random(SEED + 1 + round_), rule_sets=1000,
                                 commands_per_set=6)
        total.cases += split.cases
        total.both_allow += split.both_allow
        total.both_deny += split.both_deny
        total.stricter.update(split.stricter)
        total.extra_on_redis_deny.update(split.extra_on_redis_deny)
        total.excluded.update(split.excluded)
        total.rule_sets += split.rule_sets
        total.rule_sets_refused_by_both += split.rule_sets_refused_by_both
        total.failures.extend(split.failures)
    _assert_clean(total)
    assert total.cases >= 100_000


# --------------------------------------------------------------------------- parts


def test_rule_parser_accepts_what_redis_accepts(oracle: Oracle) -> None:
    rnd = random.Random(SEED + 100)
    table = default_table()
    samples = [gen_rules(rnd, table) for _ in range(1500)]
    samples += [t.split() for t in (
        "+get|", "-get|x", "+config|get|x", "+@nosuch", "~x allkeys", "allkeys ~x", "&* &x",
        "%RW~* ~x", "&x", "+CONFIG|GET", "-config|get", "()", "(+get ~x)", "(+get", "(on)",
        "+select|0", "%rw~k", "%RR~x", "%X~k", "+nosuch", "+get|x|y", "-@ALL", "-config|",
        "+", "-", "+@", "~", "&", "resetkeys ~* resetkeys ~x", "(allkeys ~x)")]
    replies = oracle.pipeline_raw([("ACL", "SETUSER", f"p{i}", "reset", "on", "nopass", *rules)
                                   for i, rules in enumerate(samples)])
    mismatches = []
    for rules, reply in zip(samples, replies, strict=True):
        try:
            parse_role("r", " ".join(rules), table)
            ours = True
        except AclError:
            ours = False
        if ours != (not isinstance(reply, Exception)):
            mismatches.append((rules, reply))
    assert not mismatches, mismatches[:20]


def test_glob_matches_redis(oracle: Oracle) -> None:
    rnd = random.Random(SEED + 200)
    alphabet = b"ab*?[]^-\\\x80\xffc"
    patterns = [bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 7)))
                for _ in range(1500)]
    oracle.pipeline_raw([("ACL", "SETUSER", f"g{i}", "reset", "on", "nopass", "+get",
                          b"%R~" + p) for i, p in enumerate(patterns)])
    cases, commands = [], []
    for i, pattern in enumerate(patterns):
        for _ in range(8):
            key = bytes(rnd.choice(b"ab]-\\^[*?\x80\xffc") for _ in range(rnd.randint(0, 6)))
            cases.append((pattern, key))
            commands.append(("ACL", "DRYRUN", f"g{i}", "GET", key))
    replies = oracle.pipeline_raw(commands)
    wrong = [(p, k, r) for (p, k), r in zip(cases, replies, strict=True)
             if bool(compile_glob(p)(k)) != (r in (b"OK", "OK"))]
    assert not wrong, wrong[:20]


def _flag_names(flags: int) -> set[str]:
    return {name for name, bit in KEY_FLAG_BITS.items() if flags & bit}


def test_key_extraction_matches_redis(oracle: Oracle) -> None:
    """Our `keys` are exactly COMMAND GETKEYSANDFLAGS's (valid-arity commands)."""
    rnd = random.Random(SEED + 300)
    table = default_table()
    keyed = [c.name for c in table if has_keys(c)]
    argvs = []
    for _ in range(6000):
        argv = gen_command(rnd, oracle, table, rnd.choice(keyed), None)
        if table.lookup(argv) is not None and table.lookup(argv).arity_ok(len(argv)):
            argvs.append(argv)
    replies = oracle.pipeline_raw([("COMMAND", "GETKEYSANDFLAGS", *argv) for argv in argvs])
    wrong = []
    for argv, reply in zip(argvs, replies, strict=True):
        cmd = table.lookup(argv)
        result = extract_keys(cmd, argv)
        ours = [(argv[pos], _flag_names(flags)) for pos, flags in result.keys]
        if isinstance(reply, Exception):
            theirs: list[tuple[bytes, set[str]]] = []
        else:
            theirs = [(key, {f.decode() if isinstance(f, bytes) else f for f in flags})
                      for key, flags in reply]
        if ours != theirs:
            wrong.append((argv, ours, theirs))
    assert len(argvs) > 4000
    assert not wrong, wrong[:10]


def test_noperm_texts_match_redis(oracle: Oracle) -> None:
    """The refusal lines are Redis's own (a restricted user, real commands)."""
    oracle.raw("ACL", "SETUSER", "np", "reset", "on", ">pw", "+get", "+publish", "~app:*",
               "&news.*", "+config|help")
    role = compile_roles({"r": RoleConfig("r", "+get +publish ~app:* &news.* +config|help")})["r"]
    client = redis.Redis(port=oracle.client.connection_pool.connection_kwargs["port"],
                         username="np", password="pw")
    try:
        for argv in ([b"flushall"], [b"get", b"other"], [b"publish", b"chat", b"m"],
                     [b"config", b"get", b"maxmemory"]):
            with pytest.raises(redis.exceptions.NoPermissionError) as caught:
                client.execute_command(*argv)
            assert decide(role, argv).error == f"-NOPERM {caught.value}\r\n".encode()
    finally:
        client.close()
