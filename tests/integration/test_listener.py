"""Every refusal path of the listener, against the real proxy process and real clients."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.helpers import PKI, Proxy, RedisServer, free_port, start_proxy, write_proxy_config


def wait_for_log(proxy: Proxy, needle: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = proxy.stderr()
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in proxy log:\n{proxy.stderr()}")


def tls_exchange(proxy: Proxy, client: str | None, payload: bytes = b"PING\r\n") -> bytes:
    """Handshake with `client`'s certificate (None: no certificate), send, read the answer."""
    ctx = proxy.ssl_context(client)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(payload)
        return tls.recv(1024)


def test_mapped_client_is_served(proxy: Proxy) -> None:
    assert tls_exchange(proxy, "app-writer") == b"+PONG\r\n"
    text = wait_for_log(proxy, "as role writer")
    assert "CN=app-writer" in text


@pytest.mark.parametrize(
    ("client", "reason"),
    [(None, "no_client_cert"), ("other-ca", "cert_untrusted"), ("expired", "cert_expired"),
     ("revoked-client", "cert_revoked")],
)
def test_bad_client_certificate_is_refused(proxy: Proxy, client: str | None, reason: str) -> None:
    # With TLS 1.3 the client may finish its side first; the refusal then shows on read.
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)) as info:
        answer = tls_exchange(proxy, client)
        if not answer:
            raise ConnectionResetError("closed without an answer")
    assert "PONG" not in str(info.value)
    wait_for_log(proxy, "refused from 127.0.0.1")
    wait_for_log(proxy, reason)


def test_redis_py_without_certificate_gets_connection_error(proxy: Proxy) -> None:
    client = redis.Redis(host="127.0.0.1", port=proxy.port, ssl=True, socket_timeout=5,
                         ssl_ca_certs=str(proxy.pki.path("clients-ca.pem")))
    with pytest.raises(redis.ConnectionError):
        client.ping()


def test_unmapped_identity_is_closed(proxy: Proxy) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)) as info:
        answer = tls_exchange(proxy, "nobody")
        if not answer:
            raise ConnectionResetError("closed without an answer")
    assert "PONG" not in str(info.value)
    text = wait_for_log(proxy, "no [[identities]] rule matches")
    assert "CN=nobody" in text


def test_tls_1_1_is_refused(proxy: Proxy) -> None:
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}", "-tls1_1",
         "-cipher", "DEFAULT:@SECLEVEL=0",
         "-cert", str(proxy.pki.clients["app-writer"][0]),
         "-key", str(proxy.pki.clients["app-writer"][1])],
        input=b"PING\r\n", capture_output=True, timeout=10)
    assert result.returncode != 0
    assert b"PONG" not in result.stdout
    wait_for_log(proxy, "tls_version")


def test_tls_1_2_with_aead_cipher_is_accepted(proxy: Proxy) -> None:
    ctx = proxy.ssl_context("app-writer")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() == "TLSv1.2"
        assert "GCM" in tls.cipher()[0] or "CHACHA20" in tls.cipher()[0]
        tls.sendall(b"PING\r\n")
        assert tls.recv(64) == b"+PONG\r\n"


def test_tls_1_2_cbc_cipher_is_refused(proxy: Proxy) -> None:
    ctx = proxy.ssl_context("app-writer")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw, \
            pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw, server_hostname="localhost")


def test_tls_1_3_is_preferred(proxy: Proxy) -> None:
    ctx = proxy.ssl_context("app-writer")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() == "TLSv1.3"


def test_plaintext_client_is_closed_without_a_plaintext_answer(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        data = b""
        try:
            while chunk := sock.recv(1024):
                data += chunk
        except ConnectionResetError:
            pass
    assert b"PONG" not in data
    assert not data.startswith((b"+", b"-"))  # nothing in RESP: at most a TLS alert record
    wait_for_log(proxy, "not_tls")
    assert tls_exchange(proxy, "app-writer") == b"+PONG\r\n"  # the proxy is still serving


def _proxy_with(pki: PKI, backend: RedisServer, tmp_path: Path, listener: str) -> Proxy:
    port = free_port()
    config = write_proxy_config(pki, tmp_path / "p", backend.port, port, extra_listener=listener)
    return start_proxy(config, pki, port)


def test_source_outside_allow_networks_is_closed_before_handshake(
        pki: PKI, backend: RedisServer, tmp_path: Path) -> None:
    proxy = _proxy_with(pki, backend, tmp_path, 'allow_networks = ["10.0.0.0/8"]')
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            try:
                assert sock.recv(1024) == b""  # closed with no TLS ServerHello at all
            except ConnectionResetError:
                pass
        wait_for_log(proxy, "network")
    finally:
        proxy.stop()


def test_max_connections(pki: PKI, backend: RedisServer, tmp_path: Path) -> None:
    proxy = _proxy_with(pki, backend, tmp_path, "max_connections = 2")
    try:
        first, second = proxy.client(), proxy.client()
        assert first.ping() and second.ping()
        third = proxy.client()
        with pytest.raises(redis.ConnectionError):
            third.ping()
        wait_for_log(proxy, "max_connections")
        first.close()
        time.sleep(0.3)
        assert proxy.client().ping()  # a slot is free again
    finally:
        proxy.stop()


def test_handshake_timeout_closes_silent_connection(
        pki: PKI, backend: RedisServer, tmp_path: Path) -> None:
    proxy = _proxy_with(pki, backend, tmp_path, "")  # handshake_timeout_s = 2 in the fixture
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            started = time.monotonic()
            try:
                assert sock.recv(1024) == b""
            except ConnectionResetError:
                pass
            assert 1.5 < time.monotonic() - started < 6
        wait_for_log(proxy, "handshake_timeout")
    finally:
        proxy.stop()


def test_idle_timeout_closes_idle_client_but_not_blocked_one(
        pki: PKI, backend: RedisServer, tmp_path: Path) -> None:
    proxy = _proxy_with(pki, backend, tmp_path, "idle_timeout_s = 1")
    try:
        ctx = proxy.ssl_context("app-writer")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as idle:
            idle.sendall(b"PING\r\n")
            assert idle.recv(64) == b"+PONG\r\n"
            blocked = proxy.client()
            # BLPOP for 2.5 s: longer than the idle timeout, yet it must be answered.
            assert blocked.blpop(["app:phi:never"], timeout=2.5) is None
            assert blocked.ping()
            try:
                assert idle.recv(64) == b""  # the idle one was closed meanwhile
            except (ConnectionResetError, ssl.SSLError):
                pass
        wait_for_log(proxy, "closing idle connection")
    finally:
        proxy.stop()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_no_session_resumption(proxy: Proxy, version: ssl.TLSVersion) -> None:
    """Every connection verifies its certificate in full: a session (ticket or session
    ID) from an earlier connection is never resumed, so a CRL or CA change applied by a
    reload cannot be sidestepped by resuming."""
    ctx = proxy.ssl_context("app-writer")
    ctx.maximum_version = version

    def connect(session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool]:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            tls.sendall(b"PING\r\n")
            assert tls.recv(64) == b"+PONG\r\n"  # TLS 1.3 tickets arrive before this
            return tls.session, tls.session_reused

    first, _ = connect(None)
    second, reused = connect(first)
    assert not reused
    if version == ssl.TLSVersion.TLSv1_3:
        assert first is None or not first.has_ticket


def test_first_command_of_a_nagle_client_is_not_held_by_a_delayed_ack(proxy: Proxy) -> None:
    """TLS 1.3 ends with the client's Finished and (without session tickets) the server
    sends nothing after it; unless the proxy ACKs it at once, a client socket that uses
    Nagle holds its first command until the kernel's delayed ACK (~40 ms on Linux)."""
    ctx = proxy.ssl_context("app-writer")
    firsts = []
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:  # Nagle on
            assert tls.version() == "TLSv1.3"
            start = time.perf_counter()
            tls.sendall(b"PING\r\n")
            assert tls.recv(64) == b"+PONG\r\n"
            firsts.append(time.perf_counter() - start)
    assert min(firsts) < 0.025, [f"{t * 1e3:.1f} ms" for t in firsts]
