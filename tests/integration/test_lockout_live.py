"""The lockout keyed on who failed, L4 probes, post-handshake certificate checks and
`[listener] x509_strict`, against the real proxy process, real TLS clients and a real
redis-server."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.certs import Issued, issue_cert, make_crl, write_pem
from tests.helpers import PKI, Proxy, RedisServer, free_port, start_proxy, write_proxy_config
from tests.integration.test_metrics_live import scrape, value


def start(pki: PKI, backend: RedisServer, tmp_path: Path, *, lockout: str = "",
          listener: str = "", crl: Path | None = None) -> tuple[Proxy, int]:
    port, mport = free_port(), free_port()
    config = write_proxy_config(pki, tmp_path / "p", backend.port, port, metrics_port=mport,
                                extra_listener=listener)
    text = config.read_text()
    if crl is not None:
        text = text.replace(f'crl = "{pki.dir / "clients.crl"}"', f'crl = "{crl}"')
    config.write_text(text + f"\n[lockout]\n{lockout}\n")
    return start_proxy(config, pki, port), mport


def attempt(proxy: Proxy, cert: Path | None, key: Path | None = None) -> bytes | None:
    """One TLS connection with this certificate: the answer to PING, or None if refused."""
    ctx = ssl.create_default_context(cafile=str(proxy.pki.path("clients-ca.pem")))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"PING\r\n")
            return tls.recv(64) or None
    except (ssl.SSLError, ConnectionError, OSError):
        return None


def client(proxy: Proxy, name: str) -> bytes | None:
    cert, key = proxy.pki.clients[name] if name else (None, None)
    return attempt(proxy, cert, key)


def trail(proxy: Proxy) -> list[dict]:
    lines = (proxy.config.parent / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def audit_verify(proxy: Proxy) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "audit", "verify",
         str(proxy.config.parent / "audit.jsonl"),
         "--key-file", str(proxy.config.parent / "audit.key")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def fingerprint(cert: Path) -> str:
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(
        serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def client_ca(pki: PKI) -> Issued:
    cert = x509.load_pem_x509_certificate(pki.path("clients-ca.pem").read_bytes())
    key = serialization.load_pem_private_key(pki.path("clients-ca-key.pem").read_bytes(), None)
    return Issued(cert=cert, key=key)  # type: ignore[arg-type]


def wait_for(predicate, timeout: float = 5.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# --- failures with a trusted certificate count against the certificate -------------------


@pytest.mark.parametrize(("name", "reason"), [
    ("revoked-client", "cert_revoked"), ("expired", "cert_expired"),
    ("nobody", "no [[identities]]"),
])
def test_a_failing_certificate_is_blocked_not_its_host(
        pki: PKI, backend: RedisServer, tmp_path: Path, name: str, reason: str) -> None:
    proxy, mport = start(pki, backend, tmp_path, lockout="failures = 3\nblock_s = 30")
    try:
        for _ in range(3):
            assert client(proxy, name) is None
        # the same host, another certificate: still served (the lockout is on the cert)
        good = proxy.client("app-writer")
        assert good.ping() and good.set("app:phi:1", "x")
        assert client(proxy, "app-writer") == b"+PONG\r\n"
        # the failing certificate stays refused, now before any check or identity work
        for _ in range(3):
            assert client(proxy, name) is None
        _, text = scrape(mport)
        assert value(text, "phiproxy_lockout_blocked_certificates") == 1
        assert value(text, "phiproxy_lockout_blocked_sources") == 0
        assert value(text, "phiproxy_connections_total", result="refused",
                     reason="lockout") == 3
        assert "blocked for 30 s after 3 failures" in proxy.stderr()
    finally:
        assert proxy.stop() == 0
    records = trail(proxy)
    refusals = [r for r in records if r["event"] in ("tls_failed", "identity_refused")]
    assert len(refusals) == 3  # the three refused after the block were not checked again
    assert all(reason in r["reason"] for r in refusals)
    fp = fingerprint(pki.clients[name][0])
    assert all(r["fingerprint"] == fp for r in refusals)
    (block,) = [r for r in records if r["event"] == "lockout"]
    assert block["blocked"]["kind"] == "certificate"
    assert block["blocked"]["fingerprint"] == fp
    assert block["identity"]["fingerprint"] == fp and block["src"].startswith("127.0.0.1:")
    assert block["failures"] == 3 and block["block_s"] == 30
    audit_verify(proxy)


def test_over_max_cert_validity_counts_against_the_certificate(
        pki: PKI, backend: RedisServer, tmp_path: Path) -> None:
    port, mport = free_port(), free_port()
    roles = ('[roles.writer]\nacl = "+@all ~* &*"\n\n[roles.reader]\nacl = "+@read ~*"\n'
             "max_cert_validity_h = 24\n")
    config = write_proxy_config(pki, tmp_path / "p", backend.port, port, metrics_port=mport,
                                roles=roles)
    config.write_text(config.read_text() + "\n[lockout]\nfailures = 2\n")
    proxy = start_proxy(config, pki, port)
    try:
        for _ in range(2):
            assert client(proxy, "app-reader") is None  # valid 365 days > 24 h
        wait_for(lambda: value(scrape(mport)[1],
                               "phiproxy_lockout_blocked_certificates") == 1)
        assert client(proxy, "app-writer") == b"+PONG\r\n"
        assert "max_cert_validity_h" in proxy.stderr()
    finally:
        proxy.stop()


def test_failures_without_a_trusted_certificate_block_the_source(
        pki: PKI, backend: RedisServer, tmp_path: Path) -> None:
    proxy, mport = start(pki, backend, tmp_path, lockout="failures = 3\nblock_s = 30")
    try:
        assert client(proxy, "") is None  # no certificate
        assert client(proxy, "other-ca") is None  # untrusted issuer
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not TLS
            try:
                sock.recv(64)
            except ConnectionResetError:
                pass
        wait_for(lambda: value(scrape(mport)[1], "phiproxy_lockout_blocked_sources") == 1)
        with pytest.raises(redis.ConnectionError):  # the source now: even a good client
            proxy.client("app-writer").ping()
    finally:
        assert proxy.stop() == 0
    (block,) = [r for r in trail(proxy) if r["event"] == "lockout"]
    assert block["blocked"] == {"kind": "source", "address": "127.0.0.1"}
    assert block["identity"] is None
    audit_verify(proxy)


def test_a_good_client_on_the_same_host_does_not_launder_an_attackers_failures(
        pki: PKI, backend: RedisServer, tmp_path: Path) -> None:
    proxy, mport = start(pki, backend, tmp_path, lockout="failures = 3\nblock_s = 30")
    try:
        for _ in range(2):  # failures interleaved with successes from the same address
            assert client(proxy, "") is None
            assert client(proxy, "app-writer") == b"+PONG\r\n"
        assert client(proxy, "other-ca") is None  # the third failure within the window
        wait_for(lambda: value(scrape(mport)[1], "phiproxy_lockout_blocked_sources") == 1)
    finally:
        assert proxy.stop() == 0


def test_exempt_networks_are_never_blocked_as_a_source(
        pki: PKI, backend: RedisServer, tmp_path: Path) -> None:
    proxy, mport = start(pki, backend, tmp_path,
                         lockout='failures = 2\nexempt_networks = ["127.0.0.0/8"]')
    try:
        for _ in range(5):
            assert client(proxy, "other-ca") is None
        assert client(proxy, "app-writer") == b"+PONG\r\n"
        # a certificate is still blocked from an exempt network
        for _ in range(2):
            assert client(proxy, "revoked-client") is None
        wait_for(lambda: value(scrape(mport)[1], "phiproxy_connections_total",
                               result="refused", reason="cert_untrusted") == 5)
        _, text = scrape(mport)
        assert value(text, "phiproxy_lockout_blocked_sources") == 0
        assert value(text, "phiproxy_lockout_blocked_certificates") == 1
    finally:
        proxy.stop()


# --- L4 health checks ---------------------------------------------------------------------


def test_l4_probes_are_counted_not_failures(pki: PKI, backend: RedisServer,
                                            tmp_path: Path) -> None:
    proxy, mport = start(pki, backend, tmp_path, lockout="failures = 2")
    try:
        # start_proxy's own wait for the port (one connect-and-close) was one already
        wait_for(lambda: value(scrape(mport)[1], "phiproxy_l4_probes_total") == 1)
        before = 1
        for i in range(10):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            if i % 2:  # some checkers reset instead of closing
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        wait_for(lambda: value(scrape(mport)[1], "phiproxy_l4_probes_total") == before + 10)
        assert client(proxy, "app-writer") == b"+PONG\r\n"  # not blocked
        _, text = scrape(mport)
        assert value(text, "phiproxy_lockout_blocked_sources") == 0
        assert value(text, "phiproxy_tls_handshake_failures_total", reason="client_closed") == 0
        assert "WARNING" not in proxy.stderr()
    finally:
        assert proxy.stop() == 0
    assert not [r for r in trail(proxy) if r["event"] == "tls_failed"]


# --- post-handshake checks keep every refusal -----------------------------------------------


def test_not_yet_valid_certificate_is_refused(pki: PKI, backend: RedisServer,
                                              tmp_path: Path) -> None:
    now = datetime.now(UTC)
    early = issue_cert(client_ca(pki), "app-writer", client=True,
                       not_before=now + timedelta(days=1), not_after=now + timedelta(days=30))
    cert, key = tmp_path / "early.pem", tmp_path / "early-key.pem"
    write_pem(cert, early.cert_pem(), private=False)
    write_pem(key, early.key_pem(), private=True)
    proxy, _ = start(pki, backend, tmp_path)
    try:
        assert attempt(proxy, cert, key) is None
        assert "cert_untrusted (certificate is not yet valid)" in proxy.stderr()
    finally:
        proxy.stop()


def test_expired_crl_refuses_every_client_and_blocks_nobody(
        pki: PKI, backend: RedisServer, tmp_path: Path) -> None:
    """Fail closed as OpenSSL's CRL check did; the proxy's stale CRL is no client's
    failure, so it never feeds the lockout."""
    ca = client_ca(pki)
    old = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
           .last_update(datetime.now(UTC) - timedelta(days=10))
           .next_update(datetime.now(UTC) - timedelta(days=1))
           .sign(ca.key, hashes.SHA256()))
    stale = tmp_path / "stale.crl"
    write_pem(stale, old.public_bytes(serialization.Encoding.PEM), private=False)
    proxy, mport = start(pki, backend, tmp_path, lockout="failures = 2", crl=stale)
    try:
        for _ in range(3):
            assert client(proxy, "app-writer") is None
        text = proxy.stderr()
        assert "ERROR" in text and "crl_unavailable" in text and "expired" in text
        _, metrics = scrape(mport)
        assert value(metrics, "phiproxy_connections_total", result="refused",
                     reason="crl_unavailable") == 3
        assert value(metrics, "phiproxy_lockout_blocked_certificates") == 0
        assert value(metrics, "phiproxy_lockout_blocked_sources") == 0
    finally:
        proxy.stop()


def test_crl_signed_by_another_ca_refuses(pki: PKI, backend: RedisServer,
                                          tmp_path: Path) -> None:
    from proxy.certs import new_ca

    forged_by = new_ca("not-the-client-ca")
    forged = (x509.CertificateRevocationListBuilder()
              .issuer_name(client_ca(pki).cert.subject)  # claims to be the client CA's
              .last_update(datetime.now(UTC) - timedelta(hours=1))
              .next_update(datetime.now(UTC) + timedelta(days=1))
              .sign(forged_by.key, hashes.SHA256()))
    path = tmp_path / "forged.crl"
    write_pem(path, forged.public_bytes(serialization.Encoding.PEM), private=False)
    proxy, _ = start(pki, backend, tmp_path, crl=path)
    try:
        assert client(proxy, "app-writer") is None
        assert "holds no CRL signed by" in proxy.stderr()
    finally:
        proxy.stop()


def test_revocation_and_a_fresh_crl_through_reload(pki: PKI, backend: RedisServer,
                                                   tmp_path: Path) -> None:
    ca = client_ca(pki)
    crl_path = tmp_path / "clients.crl"
    write_pem(crl_path, make_crl(ca, []).public_bytes(serialization.Encoding.PEM), False)
    proxy, _ = start(pki, backend, tmp_path, crl=crl_path)
    try:
        assert client(proxy, "revoked-client") == b"+PONG\r\n"  # not on this CRL
        serial = x509.load_pem_x509_certificate(
            pki.clients["revoked-client"][0].read_bytes()).serial_number
        write_pem(crl_path, make_crl(ca, [serial]).public_bytes(serialization.Encoding.PEM),
                  False)
        proxy.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload done" in proxy.stderr())
        assert client(proxy, "revoked-client") is None
        assert client(proxy, "app-writer") == b"+PONG\r\n"
    finally:
        proxy.stop()


# --- [listener] x509_strict ----------------------------------------------------------------


def legacy_client(pki: PKI, out: Path) -> tuple[Path, Path]:
    """A client certificate as older internal CAs issue them: no authority or subject key
    identifier, signed by the test client CA."""
    ca = client_ca(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "app-writer")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca.key, hashes.SHA256()))
    assert not any(isinstance(e.value, x509.AuthorityKeyIdentifier | x509.SubjectKeyIdentifier)
                   for e in cert.extensions)
    cert_path, key_path = out / "legacy.pem", out / "legacy-key.pem"
    write_pem(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    write_pem(key_path, Issued(cert, key).key_pem(), private=True)
    return cert_path, key_path


def test_strict_refusal_names_the_rule_and_the_option(pki: PKI, backend: RedisServer,
                                                      tmp_path: Path) -> None:
    cert, key = legacy_client(pki, tmp_path)
    proxy, mport = start(pki, backend, tmp_path)  # x509_strict defaults to true
    try:
        assert attempt(proxy, cert, key) is None
        # a handshake refusal: the client may see it before the proxy has logged it
        wait_for(lambda: "Missing Authority Key Identifier" in proxy.stderr())
        text = proxy.stderr()
        assert "set [listener] x509_strict = false to admit legacy certificates" in text
        assert value(scrape(mport)[1], "phiproxy_connections_total", result="refused",
                     reason="cert_untrusted") == 1
    finally:
        proxy.stop()
    (failed,) = [r for r in trail(proxy) if r["event"] == "tls_failed"]
    assert "Missing Authority Key Identifier" in failed["reason"]
    assert "x509_strict = false" in failed["reason"]


def test_x509_strict_false_admits_legacy_certificates(pki: PKI, backend: RedisServer,
                                                      tmp_path: Path) -> None:
    cert, key = legacy_client(pki, tmp_path)
    proxy, _ = start(pki, backend, tmp_path, listener="x509_strict = false")
    try:
        assert attempt(proxy, cert, key) == b"+PONG\r\n"
        assert "x509_strict = false" in proxy.stderr()  # warned at start
        # every other check stays: untrusted, expired, revoked are still refused
        for name in ("other-ca", "expired", "revoked-client"):
            assert client(proxy, name) is None, name
    finally:
        proxy.stop()
    checked = subprocess.run([sys.executable, "-m", "proxy", "check-config", "-c",
                              str(proxy.config)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "warning:" in checked.stderr and "x509_strict = false" in checked.stderr


def test_x509_strict_through_reload(pki: PKI, backend: RedisServer, tmp_path: Path) -> None:
    cert, key = legacy_client(pki, tmp_path)
    proxy, _ = start(pki, backend, tmp_path)
    try:
        assert attempt(proxy, cert, key) is None
        config = proxy.config.read_text()
        proxy.config.write_text(config.replace("handshake_timeout_s = 2",
                                               "handshake_timeout_s = 2\nx509_strict = false"))
        proxy.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload done" in proxy.stderr())
        assert "x509_strict = false: new connections use it" in proxy.stderr()
        assert attempt(proxy, cert, key) == b"+PONG\r\n"
        proxy.config.write_text(config)  # strict again
        proxy.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: proxy.stderr().count("reload done") == 2)
        assert attempt(proxy, cert, key) is None
    finally:
        proxy.stop()
