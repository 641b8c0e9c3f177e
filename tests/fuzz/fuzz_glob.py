"""Key and channel patterns of ACL rules: the compiled matchers against the reference.

`compile_glob` turns a Redis glob into a fast matcher (equality, startswith, or a regex
with atomic segments); `stringmatch` walks the pattern like Redis's stringmatchlen. A
difference is a key a role can reach that Redis would refuse, or the reverse.

Input: patterns and keys separated by 0xFE (patterns first), each list split at 0xFD; keys
are also derived from each pattern (wildcards filled in), so matches are common.

Properties, for every pattern p and key k:
- compile_glob(p)(k) == stringmatch(p, k), and compile_patterns(ps)(k) == any of them;
- literal_prefix(p) = (prefix, exact): a matching key starts with prefix; when exact, only
  the prefix itself matches;
- could_match_prefix(p, k[:n]) is true for every n when p matches k (it may only rule out).
"""

from __future__ import annotations

from proxy.policy.glob import (
    compile_glob,
    compile_patterns,
    could_match_prefix,
    literal_prefix,
    stringmatch,
)


def _fill(pattern: bytes, filler: bytes) -> bytes:
    """A key that often matches pattern: wildcards replaced, escapes and classes undone."""
    out = bytearray()
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == 0x2A:
            out += filler
        elif c == 0x3F:
            out += filler[:1] or b"x"
        elif c == 0x5C and i + 1 < len(pattern):
            i += 1
            out.append(pattern[i])
        elif c == 0x5B:
            end = pattern.find(b"]", i + 1)
            member = pattern[i + 1 : i + 2] if end != i + 1 else b""
            out += member.replace(b"^", b"z")
            i = end if end > 0 else len(pattern)
        else:
            out.append(c)
        i += 1
    return bytes(out)


def check(data: bytes) -> None:
    head, _, tail = data.partition(b"\xfe")
    patterns = head.split(b"\xfd")[:4]
    keys = [k for k in tail.split(b"\xfd")[:6]]
    for p in patterns:
        keys += [_fill(p, b""), _fill(p, b"ab"), _fill(p, b"\x80:")]
    union = compile_patterns(patterns)
    for p in patterns:
        matcher = compile_glob(p)
        prefix, exact = literal_prefix(p)
        for k in keys:
            expected = stringmatch(p, k)
            assert bool(matcher(k)) == expected, (p, k, expected)
            if expected:
                assert k.startswith(prefix), (p, k, prefix)
                assert all(could_match_prefix(p, k[:n]) for n in range(len(k) + 1)), (p, k)
            if exact:
                assert expected == (k == prefix), (p, k, prefix)
    for k in keys:
        assert bool(union(k)) == any(stringmatch(p, k) for p in patterns), (patterns, k)
