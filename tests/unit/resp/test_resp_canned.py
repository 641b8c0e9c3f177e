"""Canned replies: exact bytes, and no way to smuggle a second reply into an error."""

from __future__ import annotations

from proxy.resp import canned
from proxy.resp.reply import REPLY, ReplyFramer


def test_constants_are_redis_shaped() -> None:
    assert canned.OK == b"+OK\r\n"
    assert canned.BACKEND_UNAVAILABLE == b"-ERR backend unavailable\r\n"
    assert canned.AUDIT_UNAVAILABLE == b"-ERR audit unavailable\r\n"
    assert canned.EXECABORT == b"-EXECABORT Transaction discarded because of previous errors.\r\n"


def test_error_lines() -> None:
    assert canned.error("unknown command 'foo'") == b"-ERR unknown command 'foo'\r\n"
    assert canned.error("no permissions", prefix="NOPERM") == b"-NOPERM no permissions\r\n"
    assert canned.protocol_error("invalid bulk length") == (
        b"-ERR Protocol error: invalid bulk length\r\n"
    )


def test_error_messages_cannot_inject_a_second_reply() -> None:
    for reply in (
        canned.error("bad\r\n+OK\r\nkey"),
        canned.error("a\nb\rc"),
        canned.protocol_error("x\r\n:1"),
        canned.error_line("NOPERM x\r\n+OK"),
    ):
        assert reply.count(b"\r") == 1 and reply.count(b"\n") == 1
        assert reply.endswith(b"\r\n")
        assert ReplyFramer().feed(reply) == [(len(reply), REPLY, None)]
    assert canned.error("bad\r\n+OK") == b"-ERR bad  +OK\r\n"
    assert canned.error_line("NOPERM \udcff") == b"-NOPERM ?\r\n"  # never raises
