"""The development PKI: files, modes, chains, usages, reuse, revocation, a real handshake."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.certs import issue_cert, new_ca, revoke, write_dev_pki, write_pem

CLIENTS = ["billing", "reports"]
COMMON = [
    "clients-ca.pem", "clients-ca-key.pem", "proxy.pem", "proxy-key.pem", "clients.crl",
    "backend-ca.pem", "backend-ca-key.pem", "backend.pem", "backend-key.pem",
    "proxy-client.pem", "proxy-client-key.pem",
]
SERVER = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT = ExtendedKeyUsageOID.CLIENT_AUTH


@pytest.fixture
def out(tmp_path: Path) -> Path:
    out = tmp_path / "pki"
    written = write_dev_pki(out, CLIENTS)
    expected = COMMON + [f"client-{n}{s}" for n in CLIENTS for s in (".pem", "-key.pem")]
    assert sorted(p.name for p in written) == sorted(expected)
    assert all(p.parent == out for p in written)
    return out


def cert(out: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((out / name).read_bytes())


def cn(certificate: x509.Certificate) -> str:
    return certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def eku(certificate: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def sans(certificate: x509.Certificate) -> list[object]:
    ext = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [name.value for name in ext]


def is_ca(certificate: x509.Certificate) -> bool:
    return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_directory_contents_and_modes(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(
        COMMON + [f"client-{n}{s}" for n in CLIENTS for s in (".pem", "-key.pem")])
    assert out.stat().st_mode & 0o777 == 0o700
    for path in out.iterdir():
        mode = path.stat().st_mode & 0o777
        if path.name.endswith("-key.pem"):
            assert mode == 0o600, path
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            assert key.key_size == 256  # P-256
        else:
            assert mode == 0o644, path


def test_each_key_belongs_to_its_cert(out: Path) -> None:
    for key_path in out.glob("*-key.pem"):
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        certificate = cert(out, key_path.name.replace("-key.pem", ".pem"))
        assert key.public_key().public_numbers() == certificate.public_key().public_numbers()


@pytest.mark.parametrize(
    ("leaf", "issuer", "other"),
    [
        ("proxy.pem", "clients-ca.pem", "backend-ca.pem"),
        ("client-billing.pem", "clients-ca.pem", "backend-ca.pem"),
        ("client-reports.pem", "clients-ca.pem", "backend-ca.pem"),
        ("backend.pem", "backend-ca.pem", "clients-ca.pem"),
        ("proxy-client.pem", "backend-ca.pem", "clients-ca.pem"),
    ],
)
def test_chains_to_the_right_ca(out: Path, leaf: str, issuer: str, other: str) -> None:
    certificate = cert(out, leaf)
    certificate.verify_directly_issued_by(cert(out, issuer))
    with pytest.raises((ValueError, InvalidSignature)):
        certificate.verify_directly_issued_by(cert(out, other))
    assert not is_ca(certificate)
    assert certificate.signature_hash_algorithm.name == "sha256"


def test_cas_are_self_signed_cas(out: Path) -> None:
    for name in ("clients-ca.pem", "backend-ca.pem"):
        ca = cert(out, name)
        ca.verify_directly_issued_by(ca)
        assert is_ca(ca)
    assert cert(out, "clients-ca.pem").public_key() != cert(out, "backend-ca.pem").public_key()


def test_names_and_usages(out: Path) -> None:
    local = ["localhost", ipaddress.ip_address("127.0.0.1")]
    proxy = cert(out, "proxy.pem")
    assert (cn(proxy), sans(proxy), eku(proxy)) == ("phiproxy", local, {SERVER})
    backend = cert(out, "backend.pem")
    assert (sans(backend), eku(backend)) == (local, {SERVER, CLIENT})
    proxy_client = cert(out, "proxy-client.pem")
    assert (cn(proxy_client), eku(proxy_client)) == ("phiproxy-backend-client", {CLIENT})
    for name in CLIENTS:
        client = cert(out, f"client-{name}.pem")
        assert (cn(client), eku(client)) == (name, {CLIENT})
    usage = proxy.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    aki = proxy.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = cert(out, "clients-ca.pem").extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest


def test_second_call_reuses_cas_and_leaves(out: Path) -> None:
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    written = write_dev_pki(out, [*CLIENTS, "audit-reader"])
    assert sorted(p.name for p in written) == ["client-audit-reader-key.pem",
                                               "client-audit-reader.pem"]
    for name, data in before.items():
        assert (out / name).read_bytes() == data, name
    newcomer = cert(out, "client-audit-reader.pem")
    newcomer.verify_directly_issued_by(cert(out, "clients-ca.pem"))
    assert cn(newcomer) == "audit-reader"


def test_missing_leaf_is_reissued_from_the_same_ca(out: Path) -> None:
    ca_before = (out / "clients-ca.pem").read_bytes()
    (out / "proxy-key.pem").unlink()
    written = write_dev_pki(out, [])
    assert sorted(p.name for p in written) == ["proxy-key.pem", "proxy.pem"]
    assert (out / "clients-ca.pem").read_bytes() == ca_before
    cert(out, "proxy.pem").verify_directly_issued_by(cert(out, "clients-ca.pem"))


def test_new_ca_reissues_its_leaves(out: Path) -> None:
    for name in ("backend-ca.pem", "backend-ca-key.pem"):
        (out / name).unlink()
    written = {p.name for p in write_dev_pki(out, [])}
    assert written == {"backend-ca.pem", "backend-ca-key.pem", "backend.pem", "backend-key.pem",
                       "proxy-client.pem", "proxy-client-key.pem"}
    cert(out, "backend.pem").verify_directly_issued_by(cert(out, "backend-ca.pem"))


def test_ca_cert_without_its_key_is_not_replaced(out: Path) -> None:
    (out / "clients-ca-key.pem").unlink()
    before = (out / "clients-ca.pem").read_bytes()
    with pytest.raises(ValueError, match="clients-ca.pem exists but .*clients-ca-key.pem"):
        write_dev_pki(out, [])
    assert (out / "clients-ca.pem").read_bytes() == before


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "x" * 65, "with space", "é", "a\n"])
def test_bad_client_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="client name .* is not valid: use 1 to 64 characters"):
        write_dev_pki(tmp_path / "pki", ["ok", name])
    assert not (tmp_path / "pki").exists()  # checked before anything is written


@pytest.mark.parametrize("name", ["a", "x" * 64, "svc.prod-1_A"])
def test_good_client_names(tmp_path: Path, name: str) -> None:
    write_dev_pki(tmp_path / "pki", [name])
    assert cn(cert(tmp_path / "pki", f"client-{name}.pem")) == name


def crl(out: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((out / "clients.crl").read_bytes())


def test_revoke_adds_serials_and_keeps_earlier_ones(out: Path) -> None:
    ca = cert(out, "clients-ca.pem")
    assert len(crl(out)) == 0 and crl(out).is_signature_valid(ca.public_key())
    billing = cert(out, "client-billing.pem").serial_number
    reports = cert(out, "client-reports.pem").serial_number

    assert revoke(out, ["billing"]) == out / "clients.crl"
    assert {r.serial_number for r in crl(out)} == {billing}
    assert crl(out).is_signature_valid(ca.public_key())

    revoke(out, ["reports"])
    assert {r.serial_number for r in crl(out)} == {billing, reports}
    # a later write_dev_pki keeps the revocations
    write_dev_pki(out, CLIENTS)
    assert {r.serial_number for r in crl(out)} == {billing, reports}


def test_revoke_unknown_client(out: Path) -> None:
    with pytest.raises(FileNotFoundError, match="client-nobody.pem"):
        revoke(out, ["nobody"])


def test_write_pem_private_replaces_a_readable_file_with_0600(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(b"old")
    path.chmod(0o644)
    write_pem(path, b"new", private=True)
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k.pem"]  # no temporary left


def test_issue_cert_odd_certificates() -> None:
    ca = new_ca("test CA", days=1)
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    leaf = issue_cert(ca, "old", ou="ops", san_uris=["spiffe://x/y"], san_emails=["a@b.c"],
                      server_names=["::1", "db.local"], not_before=start,
                      not_after=start + dt.timedelta(days=2))
    certificate = leaf.cert
    assert certificate.not_valid_after_utc == start + dt.timedelta(days=2)
    ou = certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert ou[0].value == "ops"
    assert sans(certificate) == [ipaddress.ip_address("::1"), "db.local", "spiffe://x/y",
                                 "a@b.c"]
    with pytest.raises(x509.ExtensionNotFound):  # neither client nor server: no EKU
        eku(certificate)
    assert leaf.cert_pem().startswith(b"-----BEGIN CERTIFICATE")
    assert serialization.load_pem_private_key(leaf.key_pem(), None).public_key() == (
        certificate.public_key())
    assert issue_cert(ca, "a").cert.serial_number != issue_cert(ca, "a").cert.serial_number


# --- a real handshake with the stdlib ssl module ------------------------------------------


def handshake(out: Path, client: str, server_hostname: str = "localhost") -> dict[str, object]:
    """The proxy's side as tls.py will set it up (mTLS + CRL) against one client cert."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(out / "proxy.pem", out / "proxy-key.pem")
    server_ctx.load_verify_locations(out / "clients-ca.pem")
    server_ctx.load_verify_locations(out / "clients.crl")
    server_ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=out / "clients-ca.pem")
    client_ctx.load_cert_chain(out / f"client-{client}.pem", out / f"client-{client}-key.pem")

    result: dict[str, object] = {}
    server_sock, client_sock = socket.socketpair()
    for sock in (server_sock, client_sock):
        sock.settimeout(5)

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(server_sock, server_side=True) as tls:
                result["peer_cn"] = dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as e:
            result["server_error"] = e
            server_sock.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(client_sock, server_hostname=server_hostname) as tls:
            result["reply"] = tls.recv(2)
    except (ssl.SSLError, OSError) as e:
        result["client_error"] = e
    thread.join(5)
    assert not thread.is_alive()
    return result


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_tls_handshake_with_dev_pki(out: Path, server_hostname: str) -> None:
    result = handshake(out, "billing", server_hostname)
    assert result == {"peer_cn": "billing", "reply": b"ok"}


def test_tls_handshake_refuses_a_revoked_client(out: Path) -> None:
    revoke(out, ["billing"])
    assert "reply" in handshake(out, "reports")  # the other client is unaffected
    result = handshake(out, "billing")
    assert "revoked" in str(result["server_error"])
    assert "peer_cn" not in result and result.get("reply") in (None, b"")
