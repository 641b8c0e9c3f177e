"""The error lines a policy refusal answers with: built here, and nowhere else.

One table of what a client sees when the proxy refuses (as redis-py keeps one
EXCEPTION_CLASSES), so the engine, the loader and the session cannot drift apart. The
ACL texts copy Redis 7.0's (server.c / acl.c) byte for byte: clients and tests match
them. The proxy's own refusals say `phiproxy:` so nobody takes them for Redis's.

A `*_text` is what a Decision keeps as its reason (the line without `-` and CRLF); the
bytes are the wire reply (`Decision.error`).
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.resp import canned

NOPERM = "NOPERM"

KEY_TEXT = f"{NOPERM} this user has no permissions to access one of the keys used as arguments"
CHANNEL_TEXT = (f"{NOPERM} this user has no permissions to access one of the channels used "
                "as arguments")


def command_text(name: str) -> str:
    """Redis's refusal of a command (also its text for an unknown or disabled one)."""
    return f"{NOPERM} this user has no permissions to run the '{name}' command"


def wire(text: str) -> bytes:
    """The reply line of one of the texts above."""
    return canned.error_line(text)


# Constant texts: encoded once, not per refusal.
NOPERM_KEY = wire(KEY_TEXT)
NOPERM_CHANNEL = wire(CHANNEL_TEXT)


def noperm_command(name: str) -> bytes:
    """`-NOPERM this user has no permissions to run the 'name' command`."""
    return wire(command_text(name))


def _c_string(arg: bytes, limit: int) -> bytes:
    """What C's `%.<limit>s` prints of a Redis argument: up to its first NUL."""
    end = arg.find(b"\0")
    return (arg if end < 0 else arg[:end])[:limit]


def unknown_command(argv: Sequence[bytes]) -> bytes:
    """Redis's reply to a command its table does not have (server.c processCommand):
    `-ERR unknown command 'name', with args beginning with: 'a' 'b' `, byte for byte,
    since clients probe for features this way (the arguments stop once 128 bytes of
    them are shown)."""
    args = b""
    for arg in argv[1:]:
        if len(args) >= 128:
            break
        args += b"'" + _c_string(arg, 128 - len(args)) + b"' "
    return _err(b"unknown command '" + _c_string(argv[0], 128) +
                b"', with args beginning with: " + args)


def unknown_subcommand(argv: Sequence[bytes]) -> bytes:
    """Redis's reply to an unknown subcommand of a known container:
    `-ERR unknown subcommand 'sub'. Try CONFIG HELP.`"""
    container = _c_string(argv[0], len(argv[0])).upper()
    return _err(b"unknown subcommand '" + _c_string(argv[1], 128) + b"'. Try " + container +
                b" HELP.")


def _err(message: bytes) -> bytes:
    # Redis maps CR and LF to spaces (rejectCommandFormat): the arguments are the client's.
    return b"-ERR " + message.translate(_NO_NEWLINES) + b"\r\n"


_NO_NEWLINES = bytes.maketrans(b"\r\n", b"  ")


def noperm_unfilterable_in_multi(command: str) -> bytes:
    """KEYS/SCAN/PUBSUB CHANNELS inside MULTI for a role whose replies must be filtered:
    the reply would come back inside EXEC's array, out of the filter's reach."""
    return wire(f"{NOPERM} phiproxy: '{command}' cannot be filtered inside MULTI; "
                "run it outside the transaction")
