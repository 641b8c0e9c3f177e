"""Policy: Redis 7 ACL rules per role, decided per command (see SPEC §4)."""

from proxy.policy.decision import Decision

__all__ = ["Decision"]
