"""Post-handshake client certificate checks (validity period, CRL) and the listener
context's verification flags, on real certificates and CRLs built here."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from proxy.certs import Issued, issue_cert, make_crl, new_ca, write_dev_pki
from proxy.clientcert import (
    NO_CHECK_TIME,
    STRICT_HINT,
    ClientCertChecks,
    strict_refusal,
)
from proxy.config import ListenerConfig
from proxy.tls import TLSConfigError, listener_context, strictness_warning

NOW = datetime.now(UTC)


def der(issued: Issued) -> bytes:
    return issued.cert.public_bytes(serialization.Encoding.DER)


def pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def crl_of(ca: Issued, serials: list[int], *, last: datetime, next_: datetime,
           signer: Issued | None = None) -> x509.CertificateRevocationList:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
               .last_update(last).next_update(next_))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last).build())
    return builder.sign((signer or ca).key, hashes.SHA256())


@pytest.fixture(scope="module")
def ca() -> Issued:
    return new_ca("clients-ca")


@pytest.fixture(scope="module")
def leaf(ca: Issued) -> Issued:
    return issue_cert(ca, "app", client=True)


def checks(tmp_path: Path, *crls: x509.CertificateRevocationList) -> ClientCertChecks:
    path = tmp_path / "clients.crl"
    path.write_bytes(b"".join(pem(c) for c in crls))
    return ClientCertChecks.load(path)


def test_a_valid_chain_passes(tmp_path: Path, ca: Issued, leaf: Issued) -> None:
    assert checks(tmp_path, make_crl(ca, [])).check([der(leaf), der(ca)]) is None
    assert ClientCertChecks.load(None).check([der(leaf), der(ca)]) is None


@pytest.mark.parametrize(("start", "end", "reason", "detail"), [
    (-10, -1, "cert_expired", "certificate has expired"),
    (1, 10, "cert_untrusted", "certificate is not yet valid"),
])
def test_leaf_validity_period(ca: Issued, start: int, end: int, reason: str,
                              detail: str) -> None:
    cert = issue_cert(ca, "app", client=True, not_before=NOW + timedelta(days=start),
                      not_after=NOW + timedelta(days=end))
    refusal = ClientCertChecks.load(None).check([der(cert), der(ca)])
    assert refusal is not None
    assert (refusal.reason, refusal.detail, refusal.subject) == (reason, detail, "CN=app")


def test_an_expired_issuing_ca_refuses() -> None:
    """The handshake no longer checks any time: the CA's period is checked here too."""
    short = new_ca("short-lived-ca", days=2)
    outlives = issue_cert(short, "app", client=True, days=30)
    refusal = ClientCertChecks.load(None).check(
        [der(outlives), der(short)], now=NOW + timedelta(days=3))
    assert refusal is not None and refusal.reason == "cert_expired"
    assert refusal.detail == "issuing CA CN=short-lived-ca has expired"


def test_revoked(tmp_path: Path, ca: Issued, leaf: Issued) -> None:
    refusal = checks(tmp_path, make_crl(ca, [leaf.cert.serial_number])).check(
        [der(leaf), der(ca)])
    assert refusal is not None and refusal.reason == "cert_revoked"


def test_each_issuer_is_checked_against_its_own_crl(tmp_path: Path, ca: Issued,
                                                    leaf: Issued) -> None:
    other = new_ca("other-ca")
    other_leaf = issue_cert(other, "app", client=True)
    both = checks(tmp_path, make_crl(other, [leaf.cert.serial_number]),
                  make_crl(ca, [other_leaf.cert.serial_number]))
    assert both.check([der(leaf), der(ca)]) is None  # its serial is on the other CA's CRL
    assert both.check([der(other_leaf), der(other)]) is None
    only_one = checks(tmp_path, make_crl(ca, []))
    refusal = only_one.check([der(other_leaf), der(other)])
    assert refusal is not None and refusal.reason == "crl_unavailable"
    assert "holds no CRL signed by CN=other-ca" in refusal.detail


@pytest.mark.parametrize(("last", "next_", "detail"), [
    (-10, -1, "expired"), (1, 10, "is not yet valid"),
])
def test_a_stale_crl_fails_closed(tmp_path: Path, ca: Issued, leaf: Issued, last: int,
                                  next_: int, detail: str) -> None:
    crl = crl_of(ca, [], last=NOW + timedelta(days=last), next_=NOW + timedelta(days=next_))
    refusal = checks(tmp_path, crl).check([der(leaf), der(ca)])
    assert refusal is not None and refusal.reason == "crl_unavailable"
    assert detail in refusal.detail


def test_a_crl_not_signed_by_the_issuer_is_not_used(tmp_path: Path, ca: Issued,
                                                    leaf: Issued) -> None:
    forged = crl_of(ca, [], last=NOW - timedelta(hours=1), next_=NOW + timedelta(days=1),
                    signer=new_ca("impostor"))
    refusal = checks(tmp_path, forged).check([der(leaf), der(ca)])
    assert refusal is not None and refusal.reason == "crl_unavailable"


def test_unloadable_crl_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "clients.crl"
    path.write_text("not a CRL\n")
    with pytest.raises(TLSConfigError, match=r"\[listener\] crl: .* holds no PEM CRL"):
        ClientCertChecks.load(path)
    path.write_text("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    with pytest.raises(TLSConfigError, match=r"\[listener\] crl: cannot load"):
        ClientCertChecks.load(path)
    with pytest.raises(TLSConfigError, match=r"\[listener\] crl: cannot load"):
        ClientCertChecks.load(tmp_path / "missing.crl")


def _listener(tmp_path: Path, **kwargs: object) -> ListenerConfig:
    write_dev_pki(tmp_path, [])
    return ListenerConfig(address="127.0.0.1", port=1, cert=tmp_path / "proxy.pem",
                          key=tmp_path / "proxy-key.pem", client_ca=tmp_path / "clients-ca.pem",
                          **kwargs)  # type: ignore[arg-type]


def test_listener_context_verifies_the_chain_only(tmp_path: Path) -> None:
    strict = listener_context(_listener(tmp_path, crl=tmp_path / "clients.crl"))
    assert strict.verify_flags & NO_CHECK_TIME
    assert not strict.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    assert strict.verify_flags & ssl.VERIFY_X509_STRICT
    lax = listener_context(_listener(tmp_path, x509_strict=False))
    assert not lax.verify_flags & ssl.VERIFY_X509_STRICT
    assert lax.verify_mode == ssl.CERT_REQUIRED
    assert strictness_warning(_listener(tmp_path)) is None
    warning = strictness_warning(_listener(tmp_path, x509_strict=False))
    assert warning is not None and "x509_strict = false" in warning


def test_strict_refusal_names_rule_and_option() -> None:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_code, exc.verify_message = 85, "Missing Authority Key Identifier"
    assert strict_refusal(exc) == (
        f"Missing Authority Key Identifier (RFC 5280 strict check; {STRICT_HINT})")
    exc.verify_code, exc.verify_message = 20, "unable to get local issuer certificate"
    assert strict_refusal(exc) is None
