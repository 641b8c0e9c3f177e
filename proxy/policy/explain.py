"""`phiproxy explain`: the decision for one command, as the JSON object of SPEC §2."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from proxy.policy.engine import CompiledRole, evaluate
from proxy.resp.request import ProtocolError, split_inline


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
    """Split a line the way redis-cli does: sdssplitargs, as Redis splits inline commands
    (double quotes with backslash escapes, single quotes with \\' only; a closing quote
    must end the word). A C string ends at NUL. Raises ValueError on unbalanced quotes."""
    try:
        return split_inline(line.split(b"\0", 1)[0])
    except ProtocolError as exc:
        raise ValueError(str(exc)) from exc


def split_like_redis_cli(line: str) -> list[str]:
    """`split_args` for text; bytes that are not UTF-8 (from \\xHH) survive as surrogates,
    so `s.encode("utf-8", "surrogateescape")` gives the exact argument back."""
    raw = line.encode("utf-8", "surrogateescape")
    return [word.decode("utf-8", "surrogateescape") for word in split_args(raw)]
