"""Redis glob semantics (util.c stringmatchlen, case-sensitive), quirks included.

The integration test checks the same matchers against a real Redis (ACL DRYRUN).
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.policy.glob import (
    compile_glob,
    compile_patterns,
    could_match_prefix,
    glob_to_regex,
    literal_prefix,
    stringmatch,
)

CASES = [
    # pattern, string, match
    (b"app:*", b"app:1", True),
    (b"app:*", b"app:", True),
    (b"app:*", b"ap", False),
    (b"*", b"anything", True),
    (b"*", b"", False),  # Redis: the empty string matches only the empty pattern
    (b"**", b"", False),
    (b"", b"", True),
    (b"", b"a", False),
    (b"a*b", b"ab", True),
    (b"a*b", b"axxb", True),
    (b"a*b", b"axxbc", False),
    (b"?", b"a", True),
    (b"?", b"", False),
    (b"??", b"a", False),
    (b"a?c", b"abc", True),
    (b"[abc]", b"b", True),
    (b"[abc]", b"d", False),
    (b"[^abc]", b"d", True),
    (b"[^abc]", b"a", False),
    (b"[a-c]x", b"bx", True),
    (b"[c-a]x", b"bx", True),  # reversed bounds are swapped
    (b"[a-c]", b"d", False),
    (b"[\\]]", b"]", True),  # escaped ] inside a class
    (b"[\\-]", b"-", True),
    (b"\\*", b"*", True),
    (b"\\*", b"a", False),
    (b"\\?x", b"?x", True),
    (b"a\\", b"a\\", True),  # a trailing backslash is literal
    (b"[abc", b"b", True),  # an unterminated class ends with the pattern
    (b"[abc", b"bc", False),
    (b"[", b"a", False),
    (b"[^", b"z", True),
    (b"[]", b"]", False),  # empty class matches nothing
    (b"[]a]", b"]", False),
    (b"[a-]", b"]", True),  # `]` is the range end: [a-]] covers ']'..'a'
    (b"[a-]x", b"x", True),  # ... and the class goes on to the end of the pattern
    (b"[\x80-a]", b"\xff", True),  # signed chars: 0x80..0xff sort below ASCII
    (b"[\x80-a]", b"b", False),
    (b"[a-\xff]", b"0", True),  # a..-1 swapped to -1..a: all ASCII up to 'a', and 0xff
    (b"[a-\xff]", b"b", False),
    (b"App:*", b"app:1", False),  # case-sensitive
    (b"*a*a*a*b", b"aaab", True),
    (b"*:phi:*", b"app:phi:1", True),
]


@pytest.mark.parametrize("pattern,string,expected", CASES)
def test_semantics(pattern: bytes, string: bytes, expected: bool) -> None:
    assert stringmatch(pattern, string) is expected
    assert bool(compile_glob(pattern)(string)) is expected


def test_fast_paths_are_used() -> None:
    assert compile_glob(b"*") is bool
    assert compile_glob(b"exact")(b"exact") is True
    assert compile_glob(b"exact")("exact") is False  # never a truthy NotImplemented
    assert compile_glob(b"app:*")(b"app:x")


ALPHABET = b"ab*?[]^-\\\x80\xffc"


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=8).map(lambda b: bytes(ALPHABET[x % len(ALPHABET)] for x in b)),
       st.binary(max_size=8).map(lambda b: bytes(b"ab]-\\^[*?\x80\xffc"[x % 12] for x in b)))
def test_compiled_matcher_equals_reference(pattern: bytes, string: bytes) -> None:
    assert bool(compile_glob(pattern)(string)) == stringmatch(pattern, string)


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from([b"app:*", b"k?", b"x", b"", b"*2", b"[ab]*", b"a\\*",
                                 b"*", b"app:phi:*"]), max_size=4),
       st.sampled_from([b"app:1", b"k1", b"x", b"", b"b2", b"a*", b"zz", b"app:phi:"]))
def test_pattern_sets_equal_any_of_their_patterns(patterns: list[bytes], key: bytes) -> None:
    expected = any(stringmatch(p, key) for p in patterns)
    assert bool(compile_patterns(patterns)(key)) == expected


def test_matching_stays_linear_on_hostile_keys() -> None:
    # Plain backtracking is O(n^k) here; the atomic middle segments keep it linear.
    matcher = compile_glob(b"*a*a*a*a*a*a*b")
    key = b"a" * 200_000
    start = time.perf_counter()
    assert not matcher(key)
    assert time.perf_counter() - start < 1.0


def test_regex_has_atomic_middle_segments() -> None:
    assert glob_to_regex(b"a*b*c") == b"a(?>.*?b).*c"


def test_literal_prefix() -> None:
    assert literal_prefix(b"app:*") == (b"app:", False)
    assert literal_prefix(b"a\\*b") == (b"a*b", True)
    assert literal_prefix(b"[a]x") == (b"", False)


def test_could_match_prefix() -> None:
    assert could_match_prefix(b"*", b"__keyspace@")
    assert could_match_prefix(b"__key*", b"__keyspace@")
    assert could_match_prefix(b"__keyspace@0__:*", b"__keyspace@")
    assert could_match_prefix(b"_?keyspace@*", b"__keyspace@")
    assert not could_match_prefix(b"news.*", b"__keyspace@")
    assert not could_match_prefix(b"__k", b"__keyspace@")
