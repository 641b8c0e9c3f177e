"""`backend.learn_commands`: commands the backend knows and the shipped table does not
become known to the policy, with their real categories.

A newer Redis cannot be had here, so the test makes the shipped table older instead:
GETDEL is removed from it, and the real backend's COMMAND reply must bring it back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import proxy.commands.table as table_module
from proxy.config import load_config
from proxy.policy.engine import compile_roles, decide
from proxy.reload import reload
from proxy.server import ServerState, learn_backend_commands
from tests.helpers import PKI, RedisServer, free_port, write_proxy_config

ROLES = '[roles.writer]\nacl = "+@all ~*"\n[roles.reader]\nacl = "+@read ~app:*"\n'


def table_without_getdel() -> table_module.CommandTable:
    table = table_module.CommandTable.from_json(
        table_module.TABLE_PATH.read_text(encoding="utf-8"))
    remaining = {name: cmd for name, cmd in table.commands.items() if name != "getdel"}
    return table_module.CommandTable(remaining, table.source)


async def test_learning_restores_a_command_missing_from_the_table(
        pki: PKI, backend: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table_module, "default_table", table_without_getdel)
    config = load_config(write_proxy_config(pki, tmp_path, backend.port, free_port(),
                                            roles=ROLES, extra="learn_commands = true"))
    roles = compile_roles(config.roles, table_without_getdel())
    argv = [b"GETDEL", b"app:k"]
    before = decide(roles["writer"], argv)
    assert not before.allowed and before.extra == "unknown_command"

    state = ServerState(config, decide, roles)
    await learn_backend_commands(state)

    assert decide(state.roles["writer"], argv).allowed
    # Its real categories came with it: @write, so a read-only role is still refused.
    refused = decide(state.roles["reader"], argv)
    assert not refused.allowed and refused.extra is None


async def test_a_reload_keeps_the_learned_commands(
        pki: PKI, backend: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table_module, "default_table", table_without_getdel)
    config = load_config(write_proxy_config(pki, tmp_path, backend.port, free_port(),
                                            roles=ROLES, extra="learn_commands = true"))
    state = ServerState(config, decide, compile_roles(config.roles, table_without_getdel()))
    await learn_backend_commands(state)
    assert decide(state.roles["writer"], [b"GETDEL", b"app:k"]).allowed

    # A reload compiles the new roles against the running (learned) table, not the
    # shipped one: otherwise GETDEL would be unknown again after every SIGHUP.
    assert reload(state)
    assert decide(state.roles["writer"], [b"GETDEL", b"app:k"]).allowed


async def test_learning_leaves_the_shared_table_alone_and_counts_by_name(
        pki: PKI, backend: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = table_without_getdel()  # stands for the cached default_table()
    monkeypatch.setattr(table_module, "default_table", lambda: shipped)
    config = load_config(write_proxy_config(pki, tmp_path, backend.port, free_port(),
                                            roles=ROLES, extra="learn_commands = true"))
    state = ServerState(config, decide, compile_roles(config.roles, shipped))
    counts = state.metrics.command_counter("writer")
    await learn_backend_commands(state)

    assert decide(state.roles["writer"], [b"GETDEL", b"app:k"]).allowed
    assert shipped.get("getdel") is None  # learning extended a copy
    assert counts["getdel"] is not counts.unknown  # counted under its own name
