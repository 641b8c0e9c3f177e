"""Development PKI: CAs, server and client certificates, CRLs (ECDSA P-256, SHA-256).

`phiproxy certs dev` writes one with `write_dev_pki`; tests use `new_ca`/`issue_cert` to
make odd certificates (expired, wrong usage, other CA). Not for production keys.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_CLIENT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_SKEW = dt.timedelta(minutes=5)  # not_before in the past: peers' clocks drift a little
_DEV_CRL_DAYS = 365  # an expired CRL makes the proxy refuse every client


@dataclass
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str, ou: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if ou is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    return x509.Name(attributes)


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value


def new_ca(common_name: str, *, days: int = 3650) -> Issued:
    """A self-signed CA that may sign leaf certificates only (pathlen 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _san(server_names: Sequence[str], san_uris: Sequence[str],
         san_emails: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for name in server_names:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    names += [x509.UniformResourceIdentifier(uri) for uri in san_uris]
    names += [x509.RFC822Name(email) for email in san_emails]
    return names


def issue_cert(
    ca: Issued,
    common_name: str,
    *,
    server_names: Sequence[str] = (),
    client: bool = False,
    server: bool = False,
    ou: str | None = None,
    san_uris: Sequence[str] = (),
    san_emails: Sequence[str] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    days: int = 365,
) -> Issued:
    """A leaf certificate signed by `ca`; server_names that are IP literals become SAN IPs.

    With neither `client` nor `server` the certificate has no extended key usage at all.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before if not_before is not None else _now() - _SKEW
    end = not_after if not_after is not None else start + dt.timedelta(days=days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, ou))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=False, crl_sign=False,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(ca.cert)),
            critical=False,
        )
    )
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    alt_names = _san(server_names, san_uris, san_emails)
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def make_crl(ca: Issued, revoked_serials: Iterable[int], *,
             days: int = 30) -> x509.CertificateRevocationList:
    """A CRL signed by `ca` listing `revoked_serials` (an empty one when there are none)."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - _SKEW)
        .next_update(now + dt.timedelta(days=days))
        # increases with every signing, so relying parties can tell newer from older
        .add_extension(x509.CRLNumber(time.time_ns() // 1000), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(ca.cert)),
            critical=False,
        )
    )
    for serial in sorted(set(revoked_serials)):
        revoked = (x509.RevokedCertificateBuilder()
                   .serial_number(serial).revocation_date(now - _SKEW).build())
        builder = builder.add_revoked_certificate(revoked)
    return builder.sign(ca.key, hashes.SHA256())


def write_pem(path: str | Path, data: bytes, private: bool) -> None:
    """Replace `path` atomically; a private file is 0600 from its creation on."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    mode = 0o600 if private else 0o644
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask: peers running as other users read certs
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------
# The development PKI in one directory (file names are what the example config uses).

def check_client_name(name: str) -> None:
    """Refuse a client NAME that is not 1..64 of [A-Za-z0-9._-] or starts with '.'."""
    if not _CLIENT_NAME.fullmatch(name):
        raise ValueError(
            f"client name {name!r} is not valid: use 1 to 64 characters from A-Z a-z 0-9 . _ -,"
            " not starting with '.'"
        )


def _paths(out: Path, stem: str) -> tuple[Path, Path]:
    return out / f"{stem}.pem", out / f"{stem}-key.pem"


def _load(out: Path, stem: str) -> Issued | None:
    """The pair `<stem>.pem`/`<stem>-key.pem` in `out`; None if either file is missing.

    ValueError if the files are not a PEM certificate and its own EC private key.
    """
    cert_path, key_path = _paths(out, stem)
    if not (cert_path.exists() and key_path.exists()):
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError as e:
        raise ValueError(f"{cert_path} or {key_path} cannot be read as PEM: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or (
        key.public_key().public_numbers() != cert.public_key().public_numbers()
    ):
        raise ValueError(f"{key_path} is not the EC private key of {cert_path}")
    return Issued(cert, key)


def _save(out: Path, stem: str, issued: Issued) -> list[Path]:
    cert_path, key_path = _paths(out, stem)
    write_pem(key_path, issued.key_pem(), private=True)
    write_pem(cert_path, issued.cert_pem(), private=False)
    return [cert_path, key_path]


def _still_good(leaf: Issued, ca: Issued) -> bool:
    try:
        leaf.cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return leaf.cert.not_valid_after_utc > _now() + dt.timedelta(days=1)


class _DevPki:
    """Reuse what is already in `out` and still valid; write the rest."""

    def __init__(self, out: Path):
        self.out = out
        self.written: list[Path] = []

    def ca(self, stem: str, common_name: str) -> tuple[Issued, bool]:
        """The CA `stem` from `out`, or a new one; True when it is new."""
        cert_path, key_path = _paths(self.out, stem)
        if cert_path.exists() != key_path.exists():
            # a new CA would silently invalidate every certificate the old one signed
            present, absent = (cert_path, key_path) if cert_path.exists() else (key_path,
                                                                                 cert_path)
            raise ValueError(f"{present} exists but {absent} does not; restore it, or remove "
                             f"{present} to start a new CA (its certificates stop working)")
        existing = _load(self.out, stem)
        if existing is not None:
            return existing, False
        issued = new_ca(common_name)
        self.written += _save(self.out, stem, issued)
        return issued, True

    def leaf(self, stem: str, ca: Issued, common_name: str, **usage: Any) -> Issued:
        try:
            existing = _load(self.out, stem)
        except ValueError:
            existing = None  # a broken leaf is simply replaced
        if existing is not None and _still_good(existing, ca):
            return existing
        issued = issue_cert(ca, common_name, **usage)
        self.written += _save(self.out, stem, issued)
        return issued

    def crl(self, ca: Issued) -> None:
        """Keep clients.crl (and its revocations) if `ca` signed it and it is fresh."""
        path = self.out / "clients.crl"
        current = _load_crl(path, ca)
        if current is not None and current.next_update_utc > _now() + dt.timedelta(days=1):
            return
        revoked = [r.serial_number for r in current] if current is not None else []
        write_pem(path, make_crl(ca, revoked, days=_DEV_CRL_DAYS).public_bytes(
            serialization.Encoding.PEM), private=False)
        self.written.append(path)


def _load_crl(path: Path, ca: Issued) -> x509.CertificateRevocationList | None:
    """The CRL at `path` if it exists and `ca` signed it."""
    if not path.exists():
        return None
    crl = x509.load_pem_x509_crl(path.read_bytes())
    if crl.issuer != ca.cert.subject or not crl.is_signature_valid(ca.cert.public_key()):
        return None
    return crl


def write_dev_pki(out: Path, clients: Sequence[str]) -> list[Path]:
    """Write (or complete) the development PKI in `out`; return the files written.

    Existing CAs are reused, so adding a client later keeps every other certificate valid;
    existing leaves are reused while their CA still signs them and they have not expired.
    """
    for name in clients:
        check_client_name(name)
    out = Path(out)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    pki = _DevPki(out)
    clients_ca, _ = pki.ca("clients-ca", "phiproxy dev clients CA")
    backend_ca, _ = pki.ca("backend-ca", "phiproxy dev backend CA")
    local = ("localhost", "127.0.0.1")
    pki.leaf("proxy", clients_ca, "phiproxy", server_names=local, server=True)
    pki.crl(clients_ca)
    # redis-server presents this one to replicas as a client too
    pki.leaf("backend", backend_ca, "phiproxy-dev-backend", server_names=local, server=True,
             client=True)
    pki.leaf("proxy-client", backend_ca, "phiproxy-backend-client", client=True)
    for name in clients:
        pki.leaf(f"client-{name}", clients_ca, name, client=True)
    return pki.written


def revoke(out: Path, names: Sequence[str]) -> Path:
    """Add the certificates of clients `names` to `out`/clients.crl, re-signed; return it."""
    for name in names:
        check_client_name(name)
    out = Path(out)
    ca = _load(out, "clients-ca")
    if ca is None:
        raise FileNotFoundError(f"{out / 'clients-ca.pem'} or its key is missing; "
                                f"run: phiproxy certs dev --out {out}")
    serials = set()
    for name in names:
        path = out / f"client-{name}.pem"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: no client {name!r} in {out}")
        serials.add(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)
    crl_path = out / "clients.crl"
    current = _load_crl(crl_path, ca)
    if current is not None:
        serials.update(r.serial_number for r in current)
    crl = make_crl(ca, serials, days=_DEV_CRL_DAYS)
    write_pem(crl_path, crl.public_bytes(serialization.Encoding.PEM), private=False)
    return crl_path
