"""Client certificate checks done after the TLS handshake, so that a refusal knows whose
certificate it refused (and the lockout can count it against that certificate).

Why after the handshake: Python's `ssl` hands over no peer certificate when OpenSSL's
verification fails, so a revoked or expired certificate used to be counted against its
source address, and one decommissioned client retrying could lock every neighbour on its
host (or behind its NAT) out. So the handshake verifies the chain only: signatures up to a
CA in `client_ca`, key usage, basic constraints, RFC 5280 strictness unless
`x509_strict = false`; it runs with OpenSSL's X509_V_FLAG_NO_CHECK_TIME and without the
CRL flag. This module then checks, on the chain OpenSSL verified, what those two flags did,
before the Session exists and before any client byte is read:

- the validity period of every certificate of the chain (OpenSSL's time check);
- the leaf against the CRL of its issuer (VERIFY_CRL_CHECK_LEAF): that CRL must be signed by
  the issuer and current (thisUpdate <= now, nextUpdate not passed). A CRL that is missing,
  not yet valid, expired or not signed by the issuer refuses every certificate of that
  issuer: fail closed, as OpenSSL did. Such a refusal is the proxy's own problem, not the
  client's, so it is logged as an error and never feeds the lockout.

A certificate that fails here chained to a trusted CA, so its fingerprint identifies who
failed; a handshake that fails (no certificate, untrusted issuer, strictness, not TLS)
has no such certificate and counts against the source address.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (Python's VerifyFlags lacks it; verify_flags passes
# any bit through to X509_VERIFY_PARAM_set_flags).
NO_CHECK_TIME = 0x200000

# OpenSSL 3 verify errors raised only under X509_V_FLAG_X509_STRICT (RFC 5280 rules):
# 78 signature algorithm inconsistency, 80-93 the key identifier, SAN, basic constraints
# and key usage rules, 94 EC key with explicit parameters.
STRICT_VERIFY_CODES = frozenset({78, *range(80, 95)})
STRICT_HINT = "set [listener] x509_strict = false to admit legacy certificates"

_CACHE_MAX = 256  # distinct issuing CAs remembered (parsed certificate, CRL found for it)


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # cert_expired | cert_revoked | cert_untrusted | crl_unavailable
    detail: str
    subject: str


class ClientCertChecks:
    """Validity period and revocation of a client certificate whose chain the handshake
    verified. Built with the listener context, from the same configuration."""

    def __init__(self, crls: Sequence[x509.CertificateRevocationList] | None,
                 crl_path: str | None = None) -> None:
        self.crls = None if crls is None else tuple(crls)  # None: no [listener] crl
        self.crl_path = crl_path
        self._issuers: dict[bytes, x509.Certificate] = {}
        self._crl_of: dict[bytes, x509.CertificateRevocationList | None] = {}

    @classmethod
    def load(cls, crl: Path | None) -> ClientCertChecks:
        """From `[listener] crl` (a PEM file of one or more CRLs); TLSConfigError names it."""
        from proxy.tls import TLSConfigError

        if crl is None:
            return cls(None)
        try:
            data = Path(crl).read_bytes()
            crls = [x509.load_pem_x509_crl(block) for block in _pem_blocks(data, b"X509 CRL")]
        except (OSError, ValueError) as exc:
            raise TLSConfigError(f"[listener] crl: cannot load {crl}: {exc}; it must be a PEM "
                                 "CRL") from exc
        if not crls:
            raise TLSConfigError(f"[listener] crl: {crl} holds no PEM CRL (-----BEGIN X509 "
                                 "CRL-----); give the CRL of the client CA")
        return cls(crls, str(crl))

    def check(self, chain: Sequence[bytes], now: datetime | None = None) -> Refusal | None:
        """Why the verified chain (leaf first, DER) may not connect now, or None."""
        now = now or datetime.now(UTC)
        leaf = x509.load_der_x509_certificate(chain[0])
        subject = leaf.subject.rfc4514_string()
        certs = [leaf, *(self._issuer(der) for der in chain[1:])]
        for depth, cert in enumerate(certs):
            what = "certificate" if depth == 0 else \
                f"issuing CA {cert.subject.rfc4514_string()}"
            if now < cert.not_valid_before_utc:
                return Refusal("cert_untrusted", f"{what} is not yet valid", subject)
            if now > cert.not_valid_after_utc:
                return Refusal("cert_expired", f"{what} has expired", subject)
        if self.crls is None:
            return None
        issuer = certs[1] if len(certs) > 1 else leaf  # a trusted self-signed leaf
        crl = self._crl_for(issuer, chain[1] if len(chain) > 1 else chain[0])
        issuer_name = issuer.subject.rfc4514_string()
        if crl is None:
            return Refusal("crl_unavailable", f"{self.crl_path} holds no CRL signed by "
                           f"{issuer_name}", subject)
        if crl.last_update_utc > now:
            return Refusal("crl_unavailable", f"the CRL of {issuer_name} is not yet valid "
                           f"(thisUpdate {crl.last_update_utc:%Y-%m-%d %H:%M} UTC)", subject)
        next_update = crl.next_update_utc
        if next_update is not None and next_update < now:
            return Refusal("crl_unavailable", f"the CRL of {issuer_name} expired "
                           f"{next_update:%Y-%m-%d %H:%M} UTC; install a current one and "
                           "reload", subject)
        if crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None:
            return Refusal("cert_revoked", "certificate revoked", subject)
        return None

    def _issuer(self, der: bytes) -> x509.Certificate:
        cert = self._issuers.get(der)
        if cert is None:
            cert = x509.load_der_x509_certificate(der)
            if len(self._issuers) >= _CACHE_MAX:
                self._issuers.clear()
            self._issuers[der] = cert
        return cert

    def _crl_for(self, issuer: x509.Certificate,
                 der: bytes) -> x509.CertificateRevocationList | None:
        """The CRL named after `issuer` and signed with its key (the signature is checked
        once per issuer and CRL file: a reload builds new checks)."""
        if der in self._crl_of:
            return self._crl_of[der]
        found = None
        key = issuer.public_key()
        for crl in self.crls or ():
            if crl.issuer == issuer.subject and crl.is_signature_valid(key):  # type: ignore[arg-type]
                found = crl
                break
        if len(self._crl_of) >= _CACHE_MAX:
            self._crl_of.clear()
        self._crl_of[der] = found
        return found


def _pem_blocks(data: bytes, label: bytes) -> list[bytes]:
    begin, end = b"-----BEGIN " + label + b"-----", b"-----END " + label + b"-----"
    blocks, start = [], data.find(begin)
    while start >= 0:
        stop = data.find(end, start)
        if stop < 0:
            raise ValueError(f"unterminated {begin.decode()} block")
        blocks.append(data[start:stop + len(end)] + b"\n")
        start = data.find(begin, stop)
    return blocks


def verified_chain(ssl_object: Any) -> list[bytes]:
    """The chain OpenSSL verified in the handshake, leaf first, as DER. Public API from
    Python 3.13; the same method on the internal object since 3.10."""
    getter = getattr(ssl_object, "get_verified_chain", None)
    if getter is None:
        getter = ssl_object._sslobj.get_verified_chain
    return [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
            for c in getter()]


def strict_refusal(exc: ssl.SSLCertVerificationError) -> str | None:
    """For a handshake refused by an RFC 5280 strict rule: the rule (OpenSSL's text) and
    the option that admits it; None for any other verification error."""
    if exc.verify_code not in STRICT_VERIFY_CODES:
        return None
    return f"{exc.verify_message} (RFC 5280 strict check; {STRICT_HINT})"
