"""Configuration roles -> compiled roles and the `decide` function sessions call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.config import Config, ConfigError
from proxy.policy.decision import Decision


def compile_policy(config: Config) -> tuple[Callable[[Any, list[bytes]], Decision], dict[str, Any]]:
    """Compile every role once; ConfigError names the file, the role and the bad token."""
    from proxy.policy.engine import compile_roles, decide

    try:
        roles = compile_roles(config.roles)
    except ConfigError as exc:
        raise ConfigError([f"{config.path}: {p}" for p in exc.problems]) from exc
    return decide, roles
