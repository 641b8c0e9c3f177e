"""Everything `run` loads, validated together: used by run, check-config and reload (and
the policy part alone by explain and scan-backend)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from proxy.commands.table import CommandTable


def load_everything(path: Path,
                    table: CommandTable | None = None) -> tuple[Config, Any, dict[str, Any]]:
    """Configuration, TLS material and compiled roles, exactly as `run` loads them.

    `table`: the command table for the roles (default: the shipped one; see
    compile_policy). Raises ConfigError with every problem found.
    """
    from proxy.audit.chain import AuditError
    from proxy.audit.writer import AuditWriter
    from proxy.clientcert import ClientCertChecks
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
        ClientCertChecks.load(config.listener.crl)
    except TLSConfigError as exc:
        problems.append(f"{config.path}: {exc}")
    try:
        AuditWriter(config.audit)  # loads the HMAC key: refuses a missing or short one
    except AuditError as exc:
        problems.append(f"{config.path}: {exc}")
    decide, roles = None, {}
    try:
        decide, roles = compile_policy(config, table)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return config, decide, roles


def load_policy_or_report(path: str | Path) -> tuple[Config, Any, dict[str, Any]] | None:
    """Configuration and compiled roles for a command that needs no TLS material or audit
    key (explain, scan-backend): every problem is printed to stderr and None returned."""
    from proxy.policy.loader import compile_policy

    try:
        config = load_config(Path(path))
        decide, roles = compile_policy(config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return None
    return config, decide, roles
