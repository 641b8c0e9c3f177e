"""Redis glob patterns (util.c `stringmatchlen`, case-sensitive), compiled once.

Semantics copied from Redis, quirks included:
  - `*` any run of bytes, `?` one byte, `\\x` a literal x (a trailing `\\` is literal);
  - `[abc]`, `[a-z]` (reversed bounds are swapped), `[^...]` negation, `\\` escapes inside;
    an unterminated class ends at the end of the pattern; in `[a-]` the `]` is the range end;
  - range bounds compare as C `char`, which is signed on the platforms Redis ships on, so
    bytes >= 0x80 sort below ASCII inside ranges;
  - the empty string matches only the empty pattern (`*` does not match "").

`compile_glob` turns a pattern into a matcher: plain equality or `startswith` when it can,
else a regular expression whose middle `*` segments are atomic, which keeps matching
linear in the key length whatever the pattern (plain backtracking is polynomial, and keys
come from clients).
"""

from __future__ import annotations

import re
from collections.abc import Callable

Matcher = Callable[[bytes], object]  # truthy when the key matches

STAR, ANY, LIT, CLASS = "star", "any", "lit", "class"
Token = tuple[str, object]  # (STAR, None) | (ANY, None) | (LIT, int) | (CLASS, frozenset[int])

_SPECIAL = frozenset(b"*?[\\")


def _signed(byte: int) -> int:
    return byte - 256 if byte >= 128 else byte


def parse_glob(pattern: bytes) -> list[Token]:
    """Tokens exactly as stringmatchlen walks the pattern (token bounds never depend on
    the string being matched)."""
    tokens: list[Token] = []
    n, p = len(pattern), 0
    while p < n:
        c = pattern[p]
        if c == 0x2A:  # '*'
            while p + 1 < n and pattern[p + 1] == 0x2A:
                p += 1
            tokens.append((STAR, None))
        elif c == 0x3F:  # '?'
            tokens.append((ANY, None))
        elif c == 0x5B:  # '['
            p += 1
            negate = p < n and pattern[p] == 0x5E  # '^'
            if negate:
                p += 1
            members: set[int] = set()
            while True:
                left = n - p
                if left == 0:  # unterminated: the class ends with the pattern
                    p -= 1
                    break
                ch = pattern[p]
                if ch == 0x5C and left >= 2:  # '\\' escapes the next byte
                    p += 1
                    members.add(pattern[p])
                elif ch == 0x5D:  # ']'
                    break
                elif left >= 3 and pattern[p + 1] == 0x2D:  # 'a-z'
                    lo, hi = _signed(ch), _signed(pattern[p + 2])
                    if lo > hi:
                        lo, hi = hi, lo
                    members.update(b for b in range(256) if lo <= _signed(b) <= hi)
                    p += 2
                else:
                    members.add(ch)
                p += 1
            if negate:
                members = set(range(256)) - members
            tokens.append((CLASS, frozenset(members)))
        elif c == 0x5C:  # '\\'
            if p + 1 < n:
                p += 1
            tokens.append((LIT, pattern[p]))
        else:
            tokens.append((LIT, c))
        p += 1
    return tokens


def _token_matches(token: Token, byte: int) -> bool:
    kind, arg = token
    if kind == ANY:
        return True
    if kind == LIT:
        return arg == byte
    return byte in arg  # type: ignore[operator]


def stringmatch(pattern: bytes, string: bytes) -> bool:
    """Reference matcher (simple backtracking over the tokens); for tests, not the hot path."""
    if not string:
        return not pattern
    tokens = parse_glob(pattern)

    def match(t: int, s: int) -> bool:
        while t < len(tokens):
            if tokens[t][0] == STAR:
                if t == len(tokens) - 1:
                    return True
                return any(match(t + 1, i) for i in range(s, len(string)))
            if s == len(string) or not _token_matches(tokens[t], string[s]):
                return False
            t += 1
            s += 1
        return s == len(string)

    return match(0, 0)


def _class_regex(members: frozenset[int]) -> bytes:
    if not members:
        return b"(?!)"
    if len(members) == 256:
        return b"."
    return b"[" + b"".join(re.escape(bytes([m])) for m in sorted(members)) + b"]"


def _segment_regex(tokens: list[Token]) -> bytes:
    out = []
    for kind, arg in tokens:
        if kind == ANY:
            out.append(b".")
        elif kind == LIT:
            out.append(re.escape(bytes([arg])))  # type: ignore[list-item]
        else:
            out.append(_class_regex(arg))  # type: ignore[arg-type]
    return b"".join(out)


def glob_to_regex(pattern: bytes) -> bytes:
    """A regex for non-empty strings: fullmatch it (DOTALL)."""
    segments: list[list[Token]] = [[]]
    for token in parse_glob(pattern):
        if token[0] == STAR:
            segments.append([])
        else:
            segments[-1].append(token)
    parts = [_segment_regex(segments[0])]
    if len(segments) > 1:
        # Leftmost placement of each middle segment is always safe for globs, so commit to
        # it (atomic group): no backtracking into earlier stars.
        for middle in segments[1:-1]:
            parts.append(b"(?>.*?" + _segment_regex(middle) + b")")
        parts.append(b".*" + _segment_regex(segments[-1]))
    return b"".join(parts)


def literal_prefix(pattern: bytes) -> tuple[bytes, bool]:
    """(leading literal bytes, whether the pattern is only that literal)."""
    out = bytearray()
    for kind, arg in parse_glob(pattern):
        if kind != LIT:
            return bytes(out), False
        out.append(arg)  # type: ignore[arg-type]
    return bytes(out), True


def compile_glob(pattern: bytes) -> Matcher:
    """A fast matcher for `pattern`, equivalent to Redis's stringmatchlen(nocase=0)."""
    tokens = parse_glob(pattern)
    prefix, literal = literal_prefix(pattern)
    if literal:
        return lambda key: key == prefix  # not prefix.__eq__: NotImplemented is truthy
    if tokens[-1][0] == STAR and len(tokens) == len(prefix) + 1:
        if not prefix:
            return bool  # "*": any non-empty key
        return lambda key: key.startswith(prefix)
    # Every token but `*` consumes a byte, so this regex never matches "" (as in Redis).
    return re.compile(glob_to_regex(pattern), re.DOTALL).fullmatch


def could_match_prefix(pattern: bytes, prefix: bytes) -> bool:
    """Conservative: False only when no string matching `pattern` can start with `prefix`."""
    tokens = parse_glob(pattern)
    for i, byte in enumerate(prefix):
        if i >= len(tokens):
            return False
        kind = tokens[i][0]
        if kind == STAR:
            return True
        if not _token_matches(tokens[i], byte):
            return False
    return True


def compile_patterns(patterns: list[bytes]) -> Matcher:
    """One matcher for "any of these patterns": literals in a set, `prefix*` patterns in a
    single `startswith(tuple)`, the rest as regexes, cheapest first."""
    exact: set[bytes] = set()
    prefixes: list[bytes] = []
    regexes: list[Matcher] = []
    any_nonempty = False
    for pattern in patterns:
        tokens = parse_glob(pattern)
        prefix, literal = literal_prefix(pattern)
        if literal:
            exact.add(prefix)
        elif len(tokens) == len(prefix) + 1 and tokens[-1][0] == STAR:
            if prefix:
                prefixes.append(prefix)
            else:
                any_nonempty = True
        else:
            regexes.append(compile_glob(pattern))
    if any_nonempty:
        return (lambda key: bool(key) or key in exact) if b"" in exact else bool
    prefix_tuple = tuple(prefixes)
    if not regexes:
        if not exact:
            if not prefix_tuple:
                return lambda key: False
            if len(prefix_tuple) == 1:
                only = prefix_tuple[0]
                return lambda key: key.startswith(only)
            return lambda key: key.startswith(prefix_tuple)
        if not prefix_tuple:
            return exact.__contains__
        return lambda key: key in exact or key.startswith(prefix_tuple)

    def match_any(key: bytes) -> bool:
        if key in exact or key.startswith(prefix_tuple):
            return True
        return any(regex(key) for regex in regexes)

    return match_any
