"""The result of deciding one command for one role: the seam between session and policy."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class Decision(NamedTuple):
    """Immutable. A NamedTuple rather than a frozen dataclass: an allowed keyed command
    gets a fresh Decision per call, and a tuple is built in one C call (~0.1 µs against
    ~0.4 µs for the dataclass); see `engine._factory`. `keys` stays the last field so
    that factory can append it to the other fields, which are constant per plan."""

    allowed: bool
    command: str  # canonical lower-case name; "config|get" where there is a subcommand
    reason: str = ""  # why (for a refusal: the NOPERM text without the leading '-')
    rule: str | None = None  # the rule token that decided, e.g. "+@read" or "~app:phi:*"
    extra: str | None = None  # the stricter extra of SPEC §4 that refused, e.g. "dangerous"
    error: bytes = b""  # wire reply for a refusal, e.g. b"-NOPERM ...\r\n"
    # For KEYS/SCAN/PUBSUB CHANNELS: rewrites the complete raw reply (filtering names).
    reply_filter: Callable[[bytes], bytes] | None = None
    # The command can read or destroy keys without naming them (KEYS, SCAN, FLUSHALL,
    # scripts, SORT with BY/GET patterns, ...): the audit records it whatever its keys.
    keyless_sensitive: bool = False
    keys: tuple[bytes, ...] = ()  # keys the command touches (for audit); keep it last
