"""`[[protect]]` rules: which keys are protected and how (SPEC §3, §9). First match wins."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.policy.glob import Matcher, compile_patterns


@dataclass(frozen=True)
class ProtectRule:
    """One `[[protect]]` table, in file order (`index` from 0)."""

    index: int
    keys: tuple[str, ...]  # Redis glob patterns, as written
    encrypt: bool = False
    max_ttl_s: int | None = None  # no protected key lives longer than this
    default_ttl_s: int | None = None  # given to a protected key written without a TTL
    _matchers: tuple[Matcher, ...] = field(default=(), compare=False, repr=False)

    @property
    def name(self) -> str:
        """How errors and the audit trail name the rule."""
        return f"[[protect]] #{self.index + 1} ({', '.join(self.keys)})"

    @property
    def list_binding(self) -> bytes:
        """What list elements under this rule are bound to (crypto's module docstring)."""
        return "\n".join(self.keys).encode()

    @property
    def limits_ttl(self) -> bool:
        return self.max_ttl_s is not None or self.default_ttl_s is not None

    def matches(self, key: bytes) -> bool:
        return bool(self._matchers[0](key))


def make_rule(index: int, keys: tuple[str, ...], *, encrypt: bool = False,
              max_ttl_s: int | None = None, default_ttl_s: int | None = None) -> ProtectRule:
    # One matcher for all of the rule's patterns (one regular expression where it can).
    return ProtectRule(index, keys, encrypt, max_ttl_s, default_ttl_s,
                       (compile_patterns([k.encode() for k in keys]),))


class Protection:
    """Every rule, and the lookup the hot path makes per key."""

    def __init__(self, rules: tuple[ProtectRule, ...] = ()) -> None:
        self.rules = rules

    def __bool__(self) -> bool:
        return bool(self.rules)

    def rule_for(self, key: bytes) -> ProtectRule | None:
        for rule in self.rules:
            if rule._matchers[0](key):
                return rule
        return None
