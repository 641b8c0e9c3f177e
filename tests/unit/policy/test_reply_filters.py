"""KEYS / SCAN / PUBSUB CHANNELS reply filters: RESP2 and RESP3 shapes, fail closed."""

from __future__ import annotations

from proxy.policy.filters import UNFILTERABLE, names_filter, scan_filter


def visible(name: bytes) -> bool:
    return name.startswith(b"app:")


def array(*names: bytes, kind: bytes = b"*") -> bytes:
    out = kind + str(len(names)).encode() + b"\r\n"
    for name in names:
        out += b"$" + str(len(name)).encode() + b"\r\n" + name + b"\r\n"
    return out


def test_keys_reply_is_filtered() -> None:
    apply = names_filter(visible)
    assert apply(array(b"app:1", b"secret", b"app:2")) == array(b"app:1", b"app:2")
    assert apply(array()) == array()
    assert apply(array(b"secret")) == array()


def test_binary_names_survive() -> None:
    name = b"app:\r\n\x00\xff"
    assert names_filter(visible)(array(name, b"x")) == array(name)


def test_resp3_set_reply_keeps_its_type() -> None:
    assert names_filter(visible)(array(b"app:1", b"x", kind=b"~")) == array(b"app:1", kind=b"~")


def test_scan_keeps_the_cursor_and_may_return_an_empty_page() -> None:
    apply = scan_filter(visible)
    reply = b"*2\r\n$3\r\n128\r\n" + array(b"app:1", b"secret")
    assert apply(reply) == b"*2\r\n$3\r\n128\r\n" + array(b"app:1")
    reply = b"*2\r\n$1\r\n0\r\n" + array(b"secret")
    assert apply(reply) == b"*2\r\n$1\r\n0\r\n" + array()


def test_errors_and_queued_pass_unchanged() -> None:
    for reply in (b"-ERR something\r\n", b"+QUEUED\r\n", b"!21\r\nSYNTAX invalid syntax\r\n"):
        assert names_filter(visible)(reply) == reply
        assert scan_filter(visible)(reply) == reply


def test_unexpected_shapes_fail_closed() -> None:
    for reply in (b":1\r\n", b"*1\r\n:1\r\n", b"*2\r\n$5\r\napp:1\r\n", b"$5\r\napp:1\r\n",
                  array(b"app:1") + b"junk", b"*x\r\n"):
        assert names_filter(visible)(reply) == UNFILTERABLE
    for reply in (array(b"app:1"), b"*3\r\n$1\r\n0\r\n*0\r\n$1\r\nx\r\n", b"*2\r\n$1\r\n0\r\n"):
        assert scan_filter(visible)(reply) == UNFILTERABLE
