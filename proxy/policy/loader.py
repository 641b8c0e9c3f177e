"""Configuration roles -> compiled roles and the `decide` function sessions call.

`[policy] disabled_commands` is applied here, before any role's rules: those commands are
refused to every role, `+@all` included, with their own reason (`disabled_command`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from proxy.config import Config, ConfigError
from proxy.policy import errors
from proxy.policy.decision import Decision

if TYPE_CHECKING:
    from proxy.commands.table import CommandTable

Decide = Callable[[Any, Sequence[bytes]], Decision]


def disabled_refusal(disabled: frozenset[str], argv: Sequence[bytes]) -> Decision | None:
    """The refusal for a disabled command (by name or `name|sub`), else None."""
    if not argv:
        return None
    name = argv[0].lower().decode("utf-8", "replace")
    full = f"{name}|{argv[1].lower().decode('utf-8', 'replace')}" if len(argv) > 1 else name
    hit = name if name in disabled else full if full in disabled else None
    if hit is None:
        return None
    return Decision(
        allowed=False, command=hit, extra="disabled_command", rule="[policy] disabled_commands",
        reason=f"disabled_command: '{hit}' is disabled for every role by [policy] "
               "disabled_commands",
        error=errors.noperm_command(hit))


def compile_policy(config: Config,
                   table: CommandTable | None = None) -> tuple[Decide, dict[str, Any]]:
    """Compile every role once; ConfigError names the file, the role and the bad token.

    `table`: the command table to compile against (default: the shipped one); a reload
    passes the table the running roles use, which holds any commands learned since start.
    """
    from proxy.commands.table import default_table
    from proxy.policy.engine import compile_roles, decide

    problems: list[str] = []
    if table is None:  # not `or`: a CommandTable with no commands is falsy
        table = default_table()
    disabled = frozenset(config.policy.disabled_commands)
    for name in sorted(disabled):
        if table.get(name) is None:
            problems.append(f"{config.path}: [policy] disabled_commands: unknown command "
                            f"{name!r}; use Redis command names, e.g. \"DEBUG\" or \"CONFIG|SET\"")
    try:
        roles = compile_roles(config.roles, table)
    except ConfigError as exc:
        problems.extend(f"{config.path}: {p}" for p in exc.problems)
        roles = {}
    if problems:
        raise ConfigError(problems)
    if not disabled:
        return decide, roles

    def decide_unless_disabled(role: Any, argv: Sequence[bytes]) -> Decision:
        return disabled_refusal(disabled, argv) or decide(role, argv)

    return decide_unless_disabled, roles
