"""Connection-level events: counted in metrics, logged to stderr with the reason.

This is the seam the audit trail and the Prometheus metrics hang off; nothing here runs
per command, only per connection.
"""

from __future__ import annotations

import logging
from typing import Any

from proxy.metrics import Metrics

log = logging.getLogger("phiproxy")


class Events:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()

    def refused(self, reason: str, src: str, detail: str = "", quiet: bool = False) -> None:
        """A connection closed before or during the TLS handshake (allowlist, limit, TLS).

        `quiet`: counted but not logged (a locked-out source retrying must not flood logs).
        """
        self.metrics.connection_refused(reason)
        if reason == "crl_unavailable":  # the proxy's own material: every client is refused
            log.error("connection refused from %s: %s (%s)", src, reason, detail)
        elif not quiet:
            suffix = f" ({detail})" if detail else ""
            log.warning("connection refused from %s: %s%s", src, reason, suffix)

    def identity_refused(self, src: str, subject: str, fingerprint: str, reason: str) -> None:
        self.metrics.connection_refused("identity")
        log.warning("connection refused from %s: %s (subject %s, sha256 %s)",
                    src, reason, subject, fingerprint)

    def locked_out(self, src: str, failures: int, block_s: float) -> None:
        log.warning("source %s blocked for %.0f s after %d TLS/identity failures",
                    src.rsplit(":", 1)[0], block_s, failures)

    def certificate_locked_out(self, src: str, subject: str, fingerprint: str, failures: int,
                               block_s: float) -> None:
        log.warning("certificate %s (sha256 %s) blocked for %.0f s after %d failures, the "
                    "last from %s; other clients of that host are not affected",
                    subject, fingerprint, block_s, failures, src)

    def l4_probe(self, src: str) -> None:
        """Connected and closed without a byte: a health check, not a failure."""
        self.metrics.l4_probe()
        log.debug("connection from %s closed before any TLS byte (L4 health check)", src)

    def connected(self, src: str, subject: str, role: str, tls: dict[str, Any],
                  not_after: Any = None) -> None:
        self.metrics.connection_opened()
        if not_after is not None:
            self.metrics.client_cert_seen(not_after)
        log.info("connection from %s: %s as role %s (%s %s)",
                 src, subject, role, tls.get("version"), tls.get("cipher"))

    def disconnected(self, src: str, subject: str, commands: int, reason: str) -> None:
        self.metrics.connection_closed()
        log.info("connection from %s (%s) closed after %d commands: %s",
                 src, subject, commands, reason)

    def protocol_error(self, src: str, message: str) -> None:
        self.metrics.protocol_error()
        log.warning("protocol error from %s: %s; connection closed", src, message)

    def backend_lost(self) -> None:
        self.metrics.backend_lost()
