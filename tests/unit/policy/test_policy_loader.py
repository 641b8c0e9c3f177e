"""compile_policy: the command table it compiles against (a reload keeps learned ones)."""

from __future__ import annotations

from pathlib import Path

from proxy.commands.table import default_table, extend_from_command_reply
from proxy.config import load_config
from proxy.policy.loader import compile_policy
from tests.helpers import PKI, free_port, write_proxy_config

# A module command as a backend's COMMAND reply decodes it.
MODULE_COMMAND = [b"mymod.get", 2, [b"readonly", b"module"], 1, 1, 1, [b"@read"], [], [], []]


def test_roles_compile_against_the_table_given(pki: PKI, tmp_path: Path) -> None:
    path = write_proxy_config(pki, tmp_path, free_port(), free_port())
    path.write_text(path.read_text() + '\n[policy]\ndisabled_commands = ["MYMOD.GET"]\n')
    config = load_config(path)
    learned = default_table().copy()
    assert extend_from_command_reply(learned, [MODULE_COMMAND]) == ["mymod.get"]

    # Only a table that knows the command accepts it in disabled_commands ...
    decide, roles = compile_policy(config, learned)
    refusal = decide(roles["writer"], [b"MYMOD.GET", b"k"])
    assert refusal.extra == "disabled_command" and roles["writer"].table is learned

    # ... and grants it to a role (without [policy], on the same table).
    path.write_text(path.read_text().split("\n[policy]")[0])
    decide, roles = compile_policy(load_config(path), learned)
    assert decide(roles["writer"], [b"MYMOD.GET", b"k"]).allowed
    assert not decide(roles["reader"], [b"MYMOD.GET", b"k"]).allowed  # ~app:phi:* only
    # The shipped table still does not know it.
    decide, roles = compile_policy(load_config(path))
    assert decide(roles["writer"], [b"MYMOD.GET", b"k"]).extra == "unknown_command"
