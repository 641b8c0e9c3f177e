"""Regression (found by tests/fuzz/fuzz_reply.py): a RESP3 client on a dedicated
connection sends UNSUBSCRIBE with no subscriptions left. Redis 7 confirms it with RESP3's
null as the channel (`>3 $11 unsubscribe _ :0`); the reply framer took that for a push, so
the UNSUBSCRIBE was answered by the next reply and every later locally answered reply
(here SELECT's +OK) came one reply late: PONG before OK.
"""

from __future__ import annotations

import socket

import hiredis

from tests.helpers import Proxy


def test_resp3_unsubscribe_with_nothing_subscribed_keeps_reply_order(proxy: Proxy) -> None:
    ctx = proxy.ssl_context("app-writer")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        reader = hiredis.Reader()
        replies: list[object] = []

        def read(count: int) -> None:
            while len(replies) < count:
                chunk = tls.recv(65536)
                assert chunk, f"closed after {replies}"
                reader.feed(chunk)
                while (item := reader.gets()) is not False:
                    replies.append(item)

        # CLIENT TRACKING pins the client to a dedicated RESP3 connection, so the
        # UNSUBSCRIBE below reaches Redis instead of being answered by the proxy.
        tls.sendall(b"HELLO 3\r\nCLIENT TRACKING on\r\nSUBSCRIBE ch\r\nUNSUBSCRIBE ch\r\n")
        read(4)
        tls.sendall(b"SET app:k v\r\nUNSUBSCRIBE\r\nGET app:k\r\nSELECT 0\r\nPING\r\n")
        read(9)
    assert replies[4:] == [b"OK", [b"unsubscribe", None, 0], b"v", b"OK", b"PONG"]
