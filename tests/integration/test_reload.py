"""SIGHUP reload, per-role certificate validity, disabled commands, graceful drain."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.certs import Issued, issue_cert, make_crl, write_pem
from tests.helpers import PKI, Proxy, RedisServer, free_port, start_proxy, write_proxy_config

ROLES = """
[roles.writer]
acl = "+@all ~* &*"

[roles.reader]
acl = "+@read ~app:phi:*"
"""


def own_pki(pki: PKI, dest: Path) -> PKI:
    """A private copy: these tests rewrite certificates and the CRL."""
    shutil.copytree(pki.dir, dest)
    copy = PKI(dest)
    copy.clients = {name: (dest / c.name, dest / k.name) for name, (c, k) in pki.clients.items()}
    return copy


def clients_ca(pki: PKI) -> Issued:
    cert = x509.load_pem_x509_certificate((pki.dir / "clients-ca.pem").read_bytes())
    key = serialization.load_pem_private_key((pki.dir / "clients-ca-key.pem").read_bytes(), None)
    return Issued(cert=cert, key=key)  # type: ignore[arg-type]


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def hup_and_wait(proxy: Proxy, needle: str, timeout: float = 5.0) -> None:
    before = proxy.stderr().count(needle)
    proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while proxy.stderr().count(needle) <= before:
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not logged after SIGHUP:\n{proxy.stderr()}")
        time.sleep(0.05)


def trail(proxy: Proxy) -> list[dict]:
    text = (proxy.config.parent / "audit.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def tls_socket(proxy: Proxy, client: str) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    return proxy.ssl_context(client).wrap_socket(raw, server_hostname="localhost")


@pytest.fixture()
def reloadable(pki: PKI, backend: RedisServer, tmp_path: Path) -> Proxy:
    mine = own_pki(pki, tmp_path / "pki")
    port = free_port()
    config = write_proxy_config(mine, tmp_path / "p", backend.port, port, roles=ROLES)
    proxy = start_proxy(config, mine, port)
    yield proxy
    proxy.stop()


def test_server_certificate_rotation_under_a_pipelining_client(reloadable: Proxy) -> None:
    client = reloadable.client("app-writer")
    errors: list[Exception] = []
    done = threading.Event()
    rounds = [0]

    def pipeline() -> None:
        try:
            while not done.is_set():
                pipe = client.pipeline(transaction=False)
                for i in range(50):
                    pipe.set(f"app:phi:r{i}", i).get(f"app:phi:r{i}")
                results = pipe.execute()
                assert results[1::2] == [str(i).encode() for i in range(50)]
                rounds[0] += 1
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    thread = threading.Thread(target=pipeline)
    thread.start()
    time.sleep(0.3)
    pki = reloadable.pki
    new = issue_cert(clients_ca(pki), "phiproxy", server=True,
                     server_names=["localhost", "127.0.0.1"])
    write_pem(pki.dir / "proxy.pem", new.cert_pem(), private=False)
    write_pem(pki.dir / "proxy-key.pem", new.key_pem(), private=True)
    hup_and_wait(reloadable, "reload done")
    time.sleep(0.3)
    done.set()
    thread.join(10)
    assert not errors, errors
    assert rounds[0] > 3
    with tls_socket(reloadable, "app-writer") as tls:  # new connections get the new cert
        peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        assert peer.serial_number == new.cert.serial_number
    assert any(r["event"] == "reload" and "server certificate" in r["reason"]
               for r in trail(reloadable))


def test_revoking_a_connected_client_closes_only_that_connection(reloadable: Proxy) -> None:
    pki = reloadable.pki
    with tls_socket(reloadable, "app-writer") as writer, \
            tls_socket(reloadable, "app-reader") as reader:
        writer.sendall(b"PING\r\n")
        assert writer.recv(64) == b"+PONG\r\n"
        crl = make_crl(clients_ca(pki), [serial_of(pki.clients["app-writer"][0])])
        write_pem(pki.dir / "clients.crl", crl.public_bytes(serialization.Encoding.PEM),
                  private=False)
        hup_and_wait(reloadable, "reload done")
        try:
            assert writer.recv(64) == b""  # closed by the proxy
        except (ConnectionResetError, ssl.SSLError):
            pass
        reader.sendall(b"GET app:phi:x\r\n")
        assert reader.recv(64) == b"$-1\r\n"  # untouched
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)), \
            tls_socket(reloadable, "app-writer") as again:  # and refused from now on
        again.sendall(b"PING\r\n")
        if not again.recv(64):
            raise ConnectionResetError
    records = trail(reloadable)
    assert any(r["event"] == "disconnect" and r["identity"]["cn"] == "app-writer"
               and "revoked" in (r.get("reason") or "") for r in records)
    reload_record = [r for r in records if r["event"] == "reload"][-1]
    assert "1 closed" in reload_record["reason"]


def test_role_change_applies_from_the_next_command(reloadable: Proxy) -> None:
    with tls_socket(reloadable, "app-reader") as reader:
        reader.sendall(b"SET app:phi:k v\r\n")
        assert reader.recv(256).startswith(b"-NOPERM")
        config = reloadable.config
        config.write_text(config.read_text().replace(
            'acl = "+@read ~app:phi:*"', 'acl = "+@read +@write ~app:phi:*"'))
        hup_and_wait(reloadable, "reload done")
        reader.sendall(b"SET app:phi:k v\r\n")
        assert reader.recv(64) == b"+OK\r\n"


def test_broken_reload_keeps_serving_the_old_configuration(reloadable: Proxy) -> None:
    client = reloadable.client("app-reader")
    config = reloadable.config
    good = config.read_text()
    config.write_text(good.replace('acl = "+@read ~app:phi:*"', 'acl = "+@read +bogus ~x"'))
    hup_and_wait(reloadable, "reload refused")
    assert client.get("app:phi:x") is None  # old rules still serve
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.set("app:phi:x", "1")
    failed = [r for r in trail(reloadable) if r["event"] == "reload"]
    assert failed and "bogus" in failed[-1]["reason"]
    config.write_text(good)


def test_max_cert_validity_and_disabled_commands(pki: PKI, backend: RedisServer,
                                                 tmp_path: Path) -> None:
    roles = ROLES.replace('[roles.reader]\nacl = "+@read ~app:phi:*"',
                          '[roles.reader]\nacl = "+@read ~app:phi:*"\nmax_cert_validity_h = 8')
    port = free_port()
    config = write_proxy_config(pki, tmp_path / "p", backend.port, port, roles=roles)
    config.write_text(config.read_text() + '\n[policy]\ndisabled_commands = ["DEBUG", '
                      '"CONFIG|SET"]\n')
    proxy = start_proxy(config, pki, port)
    try:
        # The reader's certificate is valid for a year: refused for a role that wants 8 h.
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)), \
                tls_socket(proxy, "app-reader") as tls:
            tls.sendall(b"PING\r\n")
            if not tls.recv(64):
                raise ConnectionResetError
        writer = proxy.client("app-writer")  # +@all, yet DEBUG and CONFIG SET are off
        with pytest.raises(redis.exceptions.NoPermissionError, match="'debug'"):
            writer.execute_command("DEBUG", "SLEEP", "0")
        with pytest.raises(redis.exceptions.NoPermissionError, match="'config|set'"):
            writer.config_set("maxmemory", "1")
        assert writer.config_get("maxmemory")  # CONFIG GET is not disabled
        records = (proxy.config.parent / "audit.jsonl").read_text()
        assert "max_cert_validity_h" in records and "disabled_command" in records
    finally:
        proxy.stop()


def test_drain_answers_in_flight_work_then_exits_zero(pki: PKI, backend: RedisServer,
                                                      tmp_path: Path) -> None:
    port = free_port()
    config = write_proxy_config(pki, tmp_path / "p", backend.port, port, roles=ROLES,
                                extra_listener="drain_timeout_s = 3")
    proxy = start_proxy(config, pki, port)
    answered: list[object] = []
    idle = proxy.client("app-writer")
    idle.ping()
    busy = proxy.client("app-writer")
    forever = proxy.client("app-writer")

    def blpop(client: redis.Redis, timeout: float) -> None:
        try:
            answered.append(client.blpop(["app:phi:q"], timeout=timeout))
        except Exception as exc:  # noqa: BLE001 - the forced one ends in an error
            answered.append(type(exc).__name__)

    threads = [threading.Thread(target=blpop, args=(busy, 1)),
               threading.Thread(target=blpop, args=(forever, 0))]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert proxy.stop(timeout=15) == 0
    assert time.monotonic() - started < 6  # bounded by drain_timeout_s
    for thread in threads:
        thread.join(5)
    assert None in answered  # the 1 s BLPOP was answered (timed out) before exit
    stop = [json.loads(line) for line in (proxy.config.parent / "audit.jsonl").read_text()
            .splitlines() if '"event":"stop"' in line][-1]
    assert "3 connections" in stop["reason"] and "1 forced" in stop["reason"]
