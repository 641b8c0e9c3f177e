"""TLS contexts: the client-facing listener (mutual TLS) and the backend connection.

Listener: TLS 1.2 floor (1.3 when `min_tls = "1.3"`), 1.3 preferred (OpenSSL picks the
highest common version), for 1.2 only ECDHE key exchange with AES-GCM or ChaCha20-Poly1305,
server cipher order, no compression, no renegotiation, client certificate required and
its chain verified against `client_ca`, RFC 5280 strict unless `x509_strict = false`.
The validity period and the CRL are checked right after the handshake
(proxy.clientcert says why), so that a refusal knows whose certificate it was.
"""

from __future__ import annotations

import ssl

from proxy.clientcert import NO_CHECK_TIME
from proxy.config import BackendConfig, ListenerConfig

# TLS 1.2 suites: ECDHE (forward secrecy) + AEAD only. TLS 1.3 suites are all AEAD.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSConfigError(Exception):
    """A certificate, key, CA or CRL could not be loaded; the message names the file."""


def _load_chain(ctx: ssl.SSLContext, cert: object, key: object, what: str) -> None:
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(
            f"{what}: cannot load certificate {cert} with key {key}: {exc}; "
            "check that both are PEM and that the key belongs to the certificate"
        ) from exc


def _load_verify(ctx: ssl.SSLContext, path: object, what: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(f"{what}: cannot load {path}: {exc}; it must be PEM") from exc


def listener_context(cfg: ListenerConfig) -> ssl.SSLContext:
    """The SSLContext that terminates client mutual TLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[cfg.min_tls]
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= (
        ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_NO_COMPRESSION
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_SINGLE_ECDH_USE
    )
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_chain(ctx, cfg.cert, cfg.key, "[listener] cert/key")
    _load_verify(ctx, cfg.client_ca, "[listener] client_ca")
    # Chain only: time and CRL are ClientCertChecks' (after the handshake, certificate in
    # hand). The CRL is not loaded here: without the CRL flag OpenSSL would ignore it.
    ctx.verify_flags |= NO_CHECK_TIME
    if cfg.x509_strict:
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    # No session resumption: every connection presents and verifies its certificate in
    # full, so a CRL or trust change can never be bypassed with a ticket issued before
    # it. It also saves ~5 KiB per connection and two ticket encryptions per handshake.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    return ctx


def strictness_warning(cfg: ListenerConfig) -> str | None:
    """check-config and run warn while RFC 5280 strictness is off."""
    if cfg.x509_strict:
        return None
    return ("[listener] x509_strict = false: client certificates that RFC 5280 strict checks "
            "refuse (missing key identifiers, non-critical SAN with an empty subject, ...) "
            "are admitted; set it back to true once the client CA issues compliant "
            "certificates")


def backend_context(cfg: BackendConfig) -> ssl.SSLContext | None:
    """The SSLContext for the proxy's own connections to the backend Redis (None for a
    unix socket: it never leaves the host)."""
    if cfg.unix_socket is not None or cfg.ca is None or cfg.cert is None or cfg.key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED on
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    _load_verify(ctx, cfg.ca, "[backend] ca")  # the only trust anchor: no system store
    _load_chain(ctx, cfg.cert, cfg.key, "[backend] cert/key")
    return ctx
