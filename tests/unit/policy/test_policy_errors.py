"""proxy.policy.errors: the one place every policy refusal's error line is built."""

from __future__ import annotations

import pytest

from proxy.config import RoleConfig
from proxy.policy import errors
from proxy.policy.engine import compile_roles, decide
from proxy.policy.loader import disabled_refusal
from proxy.resp.reply import REPLY, ReplyFramer

# Redis 7.0's own texts, written out here rather than imported: the module must match them.
REDIS_COMMAND = b"-NOPERM this user has no permissions to run the 'set' command\r\n"
REDIS_KEY = b"-NOPERM this user has no permissions to access one of the keys used as arguments\r\n"
REDIS_CHANNEL = (b"-NOPERM this user has no permissions to access one of the channels used as "
                 b"arguments\r\n")


def decide_as(acl: str, *argv: bytes) -> bytes:
    role = compile_roles({"r": RoleConfig("r", acl, None)})["r"]
    return decide(role, list(argv)).error


def test_texts_are_redis_byte_for_byte() -> None:
    assert errors.noperm_command("set") == REDIS_COMMAND
    assert errors.NOPERM_KEY == REDIS_KEY and errors.wire(errors.KEY_TEXT) == REDIS_KEY
    assert errors.NOPERM_CHANNEL == REDIS_CHANNEL
    assert errors.command_text("set") == REDIS_COMMAND[1:-2].decode()


def test_unfilterable_in_multi_is_the_sessions_text() -> None:
    reply = errors.noperm_unfilterable_in_multi("keys")
    assert reply == (b"-NOPERM phiproxy: 'keys' cannot be filtered inside MULTI; "
                     b"run it outside the transaction\r\n")
    assert ReplyFramer().feed(reply) == [(len(reply), REPLY, None)]


def test_engine_and_loader_build_no_text_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    # Swap the one builder: every refusal path must change with it.
    monkeypatch.setattr(errors, "command_text", lambda name: f"NOPERM marked '{name}'")
    marked = b"-NOPERM marked '%s'\r\n"
    assert decide_as("+get ~*", b"SET", b"k", b"v") == marked % b"set"  # not granted
    assert decide_as("+@all ~*", b"NOSUCH") == errors.unknown_command([b"NOSUCH"])  # Redis's
    assert decide_as("+@all -@dangerous +@write", b"FLUSHALL") == marked % b"flushall"  # extra
    refusal = disabled_refusal(frozenset({"debug"}), [b"DEBUG", b"SLEEP", b"0"])
    assert refusal is not None and refusal.error == marked % b"debug"


def test_engine_key_and_channel_refusals_use_the_shared_lines() -> None:
    assert decide_as("+get ~a:*", b"GET", b"b") is errors.NOPERM_KEY
    assert decide_as("+publish", b"PUBLISH", b"c", b"m") is errors.NOPERM_CHANNEL


def test_unknown_command_texts_follow_redis_truncation() -> None:
    # Arguments stop once 128 bytes of them are shown; each is cut to what is left; C
    # strings end at NUL; CR/LF become spaces (server.c commandCheckExistence).
    reply = errors.unknown_command([b"no\0pe", b"x" * 100, b"y" * 100, b"z"])
    assert reply == (b"-ERR unknown command 'no', with args beginning with: '" + b"x" * 100 +
                     b"' '" + b"y" * 25 + b"' \r\n")
    assert errors.unknown_subcommand([b"Client", b"a\r\nb"]) == \
        b"-ERR unknown subcommand 'a  b'. Try CLIENT HELP.\r\n"
