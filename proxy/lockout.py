"""Lockout: whoever keeps failing the TLS handshake or identity mapping is refused for a
while, so guessing and scanning cost the attacker time instead of costing the proxy
handshakes.

Keyed on who failed (proxy.server keeps two of these): a failure with a certificate that
chains to a trusted client CA (revoked, expired, unmapped, over max_cert_validity_h)
counts against that certificate's SHA-256 fingerprint, and a blocked certificate is
refused right after the handshake, before any identity work; other clients of the same
host are not affected. A failure without a usable certificate (none, untrusted issuer,
RFC 5280 strictness, not TLS, handshake garbage or timeout) counts against the source
address, which is then refused before the handshake; `[lockout] exempt_networks` are
never blocked as a source. A TCP connect-and-close without a byte (an L4 health check)
is no failure at all.

Per key, the last `failures` failure times are kept; when the oldest of them is within
`window_s` of the newest, the source is blocked for `block_s`. Memory is bounded: at most
`max_sources` addresses are tracked (least recently failing forgotten first) and at most
`max_sources` blocked (soonest to expire dropped first).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

# Refusal reasons (proxy.server's) that count as a failure: a client that proved nothing.
# Not "network"/"max_connections" (refused before TLS), "client_closed" (a client that
# went away mid-handshake) nor "crl_unavailable" (the proxy's own CRL is stale or missing).
FAILURE_REASONS = frozenset({
    "identity", "no_client_cert", "cert_expired", "cert_revoked", "cert_untrusted",
    "handshake_timeout", "tls_version", "not_tls", "no_shared_cipher", "tls_error",
})


class Lockout:
    def __init__(self, failures: int = 5, window_s: float = 60.0, block_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, *,
                 max_sources: int = 10000) -> None:
        if failures < 1 or window_s <= 0 or block_s <= 0 or max_sources < 1:
            raise ValueError("failures, window_s, block_s and max_sources must be positive")
        self.failures = failures
        self.window_s = window_s
        self.block_s = block_s
        self.max_sources = max_sources
        self._clock = clock
        self._recent: OrderedDict[str, deque[float]] = OrderedDict()  # oldest failure first
        self._blocked: OrderedDict[str, float] = OrderedDict()  # ip -> until; inserted in
        # time order with one block_s, so the first entry is always the soonest to expire

    def blocked(self, ip: str) -> bool:
        """Whether `ip` is blocked now (check it before the handshake)."""
        until = self._blocked.get(ip)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._blocked[ip]
        return False

    def failure(self, ip: str) -> bool:
        """Record one failure from `ip`; True when it starts a block."""
        if self.blocked(ip):
            return False  # already refused before the handshake; do not extend
        now = self._clock()
        times = self._recent.get(ip)
        if times is None:
            if len(self._recent) >= self.max_sources:
                self._recent.popitem(last=False)
            times = self._recent[ip] = deque(maxlen=self.failures)
        else:
            self._recent.move_to_end(ip)
        times.append(now)
        if len(times) < self.failures or now - times[0] > self.window_s:
            return False
        del self._recent[ip]  # after the block, it takes `failures` new failures again
        self._purge(now)
        if len(self._blocked) >= self.max_sources:
            self._blocked.popitem(last=False)
        self._blocked[ip] = now + self.block_s
        return True

    def success(self, ip: str) -> None:
        """A completed handshake and identity: earlier failures are forgiven."""
        if self._recent:
            self._recent.pop(ip, None)

    def blocked_count(self) -> int:
        """Sources blocked now (for the metrics gauge; safe to call from another thread)."""
        now = self._clock()
        return sum(1 for until in list(self._blocked.values()) if until > now)

    def tracked(self) -> int:
        """Entries held in memory (failing and blocked sources)."""
        return len(self._recent) + len(self._blocked)

    def _purge(self, now: float) -> None:
        blocked = self._blocked
        while blocked and next(iter(blocked.values())) <= now:
            blocked.popitem(last=False)
