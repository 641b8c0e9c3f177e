"""Peer certificate -> Identity -> role: every match field, first match wins."""

from __future__ import annotations

from cryptography.hazmat.primitives.serialization import Encoding

from proxy.certs import issue_cert, new_ca
from proxy.config import IdentityRule
from proxy.identity import Identity, identity_from_der, map_role

CA = new_ca("test-ca")


def identity(**kwargs) -> Identity:
    issued = issue_cert(CA, kwargs.pop("cn", "svc"), client=True, **kwargs)
    return identity_from_der(issued.cert.public_bytes(Encoding.DER))


def test_identity_fields_from_certificate() -> None:
    ident = identity(cn="reports", ou="analytics", san_uris=["spiffe://ex.org/ns/prod/sa/r"],
                     san_emails=["ops@ex.org"], server_names=["reports.internal"])
    assert ident.cn == "reports"
    assert ident.ous == ("analytics",)
    assert ident.san_uris == ("spiffe://ex.org/ns/prod/sa/r",)
    assert ident.san_emails == ("ops@ex.org",)
    assert ident.san_dns == ("reports.internal",)
    assert len(ident.fingerprint) == 64 and ident.fingerprint == ident.fingerprint.lower()
    assert ident.as_record() == {"cn": "reports", "san_uri": "spiffe://ex.org/ns/prod/sa/r",
                                 "fingerprint": ident.fingerprint}


def test_each_field_matches_and_all_given_fields_must_match() -> None:
    ident = identity(cn="reports", ou="analytics", san_uris=["spiffe://ex.org/sa/r"],
                     san_emails=["ops@ex.org"], server_names=["Reports.Internal"])
    assert map_role((IdentityRule("a", subject_ou="analytics"),), ident) == ("a", 0)
    assert map_role((IdentityRule("a", san_uri="spiffe://ex.org/sa/r"),), ident) == ("a", 0)
    assert map_role((IdentityRule("a", san_email="ops@ex.org"),), ident) == ("a", 0)
    assert map_role((IdentityRule("a", san_dns="reports.internal"),), ident) == ("a", 0)
    assert map_role((IdentityRule("a", fingerprint_sha256=ident.fingerprint),), ident) == ("a", 0)
    # Every given field must match: a right CN with a wrong OU is no match.
    assert map_role((IdentityRule("a", subject_cn="reports", subject_ou="billing"),),
                    ident) is None
    assert map_role((IdentityRule("a", subject_cn="Reports"),), ident) is None  # CN exact
    assert map_role((IdentityRule("a", san_uri="spiffe://ex.org/sa/r2"),), ident) is None


def test_first_match_wins() -> None:
    ident = identity(cn="billing-service", ou="payments")
    rules = (IdentityRule("reader", subject_ou="payments"),
             IdentityRule("writer", subject_cn="billing-service"))
    assert map_role(rules, ident) == ("reader", 0)
    assert map_role(rules[::-1], ident) == ("writer", 0)


def test_certificate_without_san_or_cn() -> None:
    ident = identity(cn="x")
    assert ident.san_uris == () and ident.san_uri is None
    assert map_role((IdentityRule("a", san_uri="spiffe://x"),), ident) is None
