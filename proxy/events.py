"""Connection-level events: counted, and logged to stderr with the reason.

This is the seam the audit trail and the Prometheus metrics hook into; nothing here runs
per command, only per connection.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

log = logging.getLogger("phiproxy")


class Events:
    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def refused(self, reason: str, src: str, detail: str = "") -> None:
        """A connection closed before or during the TLS handshake (allowlist, limit, TLS)."""
        self.counts[("refused", reason)] += 1
        suffix = f" ({detail})" if detail else ""
        log.warning("connection refused from %s: %s%s", src, reason, suffix)

    def identity_refused(self, src: str, subject: str, fingerprint: str, reason: str) -> None:
        self.counts[("refused", "identity")] += 1
        log.warning("connection refused from %s: %s (subject %s, sha256 %s)",
                    src, reason, subject, fingerprint)

    def connected(self, src: str, subject: str, role: str, tls: dict[str, Any]) -> None:
        self.counts[("accepted", role)] += 1
        log.info("connection from %s: %s as role %s (%s %s)",
                 src, subject, role, tls.get("version"), tls.get("cipher"))

    def disconnected(self, src: str, subject: str, commands: int, reason: str) -> None:
        self.counts[("closed", reason)] += 1
        log.info("connection from %s (%s) closed after %d commands: %s",
                 src, subject, commands, reason)

    def protocol_error(self, src: str, message: str) -> None:
        self.counts[("protocol_error", "")] += 1
        log.warning("protocol error from %s: %s; connection closed", src, message)
