"""Everything `run` loads, validated together: used by run, check-config and reload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxy.config import Config, ConfigError, load_config


def load_everything(path: Path) -> tuple[Config, Any, dict[str, Any]]:
    """Configuration, TLS material and compiled roles, exactly as `run` loads them.

    Raises ConfigError with every problem found.
    """
    from proxy.audit.chain import AuditError
    from proxy.audit.writer import AuditWriter
    from proxy.policy.loader import compile_policy
    from proxy.tls import TLSConfigError, backend_context, listener_context

    config = load_config(path)
    problems: list[str] = []
    for build, section in ((listener_context, config.listener), (backend_context, config.backend)):
        try:
            build(section)  # type: ignore[arg-type]
        except TLSConfigError as exc:
            problems.append(f"{config.path}: {exc}")
    try:
        AuditWriter(config.audit)  # loads the HMAC key: refuses a missing or short one
    except AuditError as exc:
        problems.append(f"{config.path}: {exc}")
    decide, roles = None, {}
    try:
        decide, roles = compile_policy(config)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return config, decide, roles
