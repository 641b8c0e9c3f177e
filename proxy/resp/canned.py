"""Replies the proxy writes itself, built once where they are constant.

The proxy's own errors say they are the proxy's (`backend unavailable`, `audit
unavailable`); errors that clients parse copy Redis's exact text (EXECABORT,
`Protocol error: ...`).
"""

from __future__ import annotations

OK = b"+OK\r\n"
BACKEND_UNAVAILABLE = b"-ERR backend unavailable\r\n"
AUDIT_UNAVAILABLE = b"-ERR audit unavailable\r\n"
EXECABORT = b"-EXECABORT Transaction discarded because of previous errors.\r\n"

# A CR or LF inside an error line would end it early and inject a second reply.
_LINE_SAFE = str.maketrans({"\r": " ", "\n": " "})


def error(msg: str, prefix: str = "ERR") -> bytes:
    """`-ERR msg\\r\\n`; prefix picks Redis's error code (NOPERM, WRONGTYPE, ...).

    CR and LF in msg become spaces; text is UTF-8 (Redis errors are ASCII).
    """
    return error_line(f"{prefix} {msg}")


def error_line(text: str) -> bytes:
    """`-text\\r\\n` for a text that starts with its own code (`NOPERM this user ...`).

    For texts kept whole because they also serve as a Decision's reason. CR and LF
    become spaces; a character UTF-8 cannot encode becomes `?` (an error reply must
    never raise).
    """
    return b"-" + text.translate(_LINE_SAFE).encode("utf-8", "replace") + b"\r\n"


def protocol_error(msg: str) -> bytes:
    """`-ERR Protocol error: msg\\r\\n`, Redis's reply before it closes a connection."""
    return error(f"Protocol error: {msg}")
