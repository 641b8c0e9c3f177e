"""Peer certificate -> Identity -> role, by the first matching `[[identities]]` rule."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import NameOID

from proxy.config import IdentityRule


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str  # RFC 4514 string, for logs and audit
    cn: str | None
    ous: tuple[str, ...]
    san_dns: tuple[str, ...]
    san_uris: tuple[str, ...]
    san_emails: tuple[str, ...]
    fingerprint: str  # SHA-256 of the DER certificate, lower-case hex
    serial: int
    not_after: datetime
    not_before: datetime | None = None

    @property
    def validity_hours(self) -> float | None:
        """The certificate's whole validity period, in hours."""
        if self.not_before is None:
            return None
        return (self.not_after - self.not_before).total_seconds() / 3600
    @property
    def san_uri(self) -> str | None:
        return self.san_uris[0] if self.san_uris else None

    def as_record(self) -> dict[str, str | None]:
        """The `identity` object of audit records (SPEC §6)."""
        return {"cn": self.cn, "san_uri": self.san_uri, "fingerprint": self.fingerprint}


def _attrs(name: x509.Name, oid: x509.ObjectIdentifier) -> tuple[str, ...]:
    return tuple(str(a.value) for a in name.get_attributes_for_oid(oid))


def identity_from_der(der: bytes) -> Identity:
    """Build the Identity of a DER certificate (already verified by the TLS layer)."""
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        emails = tuple(san.get_values_for_type(x509.RFC822Name))
    except x509.ExtensionNotFound:
        dns = uris = emails = ()
    cns = _attrs(cert.subject, NameOID.COMMON_NAME)
    return Identity(
        subject=cert.subject.rfc4514_string(),
        cn=cns[0] if cns else None,
        ous=_attrs(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
        san_dns=dns,
        san_uris=uris,
        san_emails=emails,
        fingerprint=hashlib.sha256(der).hexdigest(),
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc,
        not_before=cert.not_valid_before_utc,
    )


def rule_matches(rule: IdentityRule, ident: Identity) -> bool:
    """Every field the rule gives must match (DNS names case-insensitively)."""
    if rule.subject_cn is not None and rule.subject_cn != ident.cn:
        return False
    if rule.subject_ou is not None and rule.subject_ou not in ident.ous:
        return False
    if rule.san_dns is not None and rule.san_dns.lower() not in (d.lower() for d in ident.san_dns):
        return False
    if rule.san_uri is not None and rule.san_uri not in ident.san_uris:
        return False
    if rule.san_email is not None and rule.san_email not in ident.san_emails:
        return False
    return rule.fingerprint_sha256 is None or rule.fingerprint_sha256 == ident.fingerprint


def map_role(rules: tuple[IdentityRule, ...], ident: Identity) -> tuple[str, int] | None:
    """The role of the first matching rule and that rule's index; None when nothing matches."""
    for index, rule in enumerate(rules):
        if rule_matches(rule, ident):
            return rule.role, index
    return None
