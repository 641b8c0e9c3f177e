"""`phiproxy explain`: the decision for one command, as the JSON object of SPEC §2."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from proxy.policy.engine import CompiledRole, evaluate

_ESCAPES = {ord("n"): 0x0A, ord("r"): 0x0D, ord("t"): 0x09, ord("b"): 0x08, ord("a"): 0x07}
_HEX = b"0123456789abcdefABCDEF"
_SPACE = b" \t\n\v\f\r"  # C isspace: skipped between words, allowed after a closing quote
_WORD_END = b" \t\n\r"  # what ends an unquoted word (not \v or \f, as in sds.c)


def explain_command(role_name: str, role: CompiledRole, argv: Sequence[bytes]) -> dict[str, Any]:
    """{"command", "decision", "reason", "rule", "extra"} for `argv` under `role`."""
    evaluation = evaluate(role, argv, explain=True)
    decision = evaluation.decision
    return {
        "command": [arg.decode("utf-8", "surrogateescape") for arg in argv],
        "decision": "allow" if decision.allowed else "deny",
        "reason": f"role '{role_name}': {evaluation.detail or decision.reason}",
        "rule": decision.rule,
        "extra": decision.extra,
    }


def split_args(line: bytes) -> list[bytes]:
    """Split a line the way redis-cli does (sds.c sdssplitargs): double quotes with
    backslash escapes (\\n, \\xHH, ...), single quotes with \\' only; a closing quote
    must end the word. Raises ValueError on unbalanced quotes."""
    out: list[bytes] = []
    line = line.split(b"\0", 1)[0]  # a C string ends at NUL
    n, p = len(line), 0
    while True:
        while p < n and line[p] in _SPACE:
            p += 1
        if p >= n:
            return out
        word = bytearray()
        in_double = in_single = False
        while True:
            if in_double:
                if p >= n:
                    raise ValueError("unbalanced double quotes")
                c = line[p]
                if c == 0x5C and p + 3 < n and line[p + 1] == ord("x") \
                        and line[p + 2] in _HEX and line[p + 3] in _HEX:
                    word.append(int(line[p + 2:p + 4], 16))
                    p += 3
                elif c == 0x5C and p + 1 < n:
                    p += 1
                    word.append(_ESCAPES.get(line[p], line[p]))
                elif c == 0x22:
                    if p + 1 < n and line[p + 1] not in _SPACE:
                        raise ValueError("closing quote must be followed by a space")
                    p += 1
                    break
                else:
                    word.append(c)
            elif in_single:
                if p >= n:
                    raise ValueError("unbalanced single quotes")
                c = line[p]
                if c == 0x5C and p + 1 < n and line[p + 1] == 0x27:
                    p += 1
                    word.append(0x27)
                elif c == 0x27:
                    if p + 1 < n and line[p + 1] not in _SPACE:
                        raise ValueError("closing quote must be followed by a space")
                    p += 1
                    break
                else:
                    word.append(c)
            else:
                if p >= n:
                    break
                c = line[p]
                if c in _WORD_END:
                    break
                if c == 0x22:
                    in_double = True
                elif c == 0x27:
                    in_single = True
                else:
                    word.append(c)
            p += 1
        out.append(bytes(word))


def split_like_redis_cli(line: str) -> list[str]:
    """`split_args` for text; bytes that are not UTF-8 (from \\xHH) survive as surrogates,
    so `s.encode("utf-8", "surrogateescape")` gives the exact argument back."""
    raw = line.encode("utf-8", "surrogateescape")
    return [word.decode("utf-8", "surrogateescape") for word in split_args(raw)]
