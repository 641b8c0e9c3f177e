"""Prometheus metrics: plain ints on the hot path, a custom collector at scrape time.

A command never touches prometheus-client: the session bumps an int in a list it looked
up once per connection (`command_counter`), and `_Collector.collect()` turns those ints
into metric families when /metrics is scraped (from the HTTP thread; reading ints under
the GIL needs no lock, and a scrape that races an increment is off by one at most).

No label is ever taken from client bytes: command names only from the command table
and from the backend's COMMAND reply (`add_commands`; anything else counts as
"unknown"), roles and identities from the configuration, reasons from the code. Key
names never appear, so the endpoint carries no PHI.
"""

from __future__ import annotations

import datetime as dt
import socket
import socketserver
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography import x509
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from proxy.config import IdentityRule

PREFIX = "phiproxy_"

# Result slots of a command counter: counts[name][OK] += 1 (use the literal on the hot path).
OK, ERROR, DENIED = 0, 1, 2
RESULTS = ("ok", "error", "denied")
UNKNOWN_COMMAND = "unknown"
# Exported at 0 as soon as a counter exists, so the deletion alerts see the first one.
WATCHED_COMMANDS = ("del", "unlink", "flushall", "flushdb")

# 10 µs .. 1 s; the 20 µs .. 100 ms range the proxy's overhead lives in is resolved 1-2-5.
LATENCY_BUCKETS: tuple[float, ...] = (
    10e-6, 20e-6, 50e-6, 100e-6, 200e-6, 500e-6,
    1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 100e-3, 250e-3, 1.0,
)

# Refusal reasons known in advance are exported at 0 from the start, so rate() and
# increase() see the first refusal (a series born at 1 would hide it).
TLS_FAILURE_REASONS = (
    "no_client_cert", "cert_expired", "cert_revoked", "cert_untrusted", "handshake_timeout",
    "tls_version", "not_tls", "no_shared_cipher", "client_closed", "tls_error",
    "crl_unavailable",
)
REFUSAL_REASONS = ("network", "max_connections", "lockout", "identity", *TLS_FAILURE_REASONS)
_TLS_SET = frozenset(TLS_FAILURE_REASONS)

# Client certificates seen are remembered for one to two of these periods.
CLIENT_CERT_PERIOD_S = 12 * 3600.0
_INF = float("inf")

CertSource = x509.Certificate | bytes | str | Path | dt.datetime | float


class AuditStats(Protocol):
    """What the audit writer exposes; read at scrape time, never written here."""

    written: int  # records written (monotonic)
    failures: int  # write failures (monotonic)
    depth: int  # records queued or buffered, not yet written


class FastHistogram:
    """A histogram without locks: observe() is a bisect and two additions (~120 ns)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le)
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """(le, cumulative count) pairs ending with +Inf, and the sum."""
        counts = list(self.counts)  # one snapshot, so the buckets stay monotonic
        total_sum = self.sum
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            out.append((floatToGoString(bound), running))
        return out, total_sum


class CommandCounts(dict[str, list[int]]):
    """One (role, identity)'s counts: command name -> [ok, error, denied].

    Hot path: `counts[decision.command][0] += 1` (one dict lookup, one list add). A name
    the command table does not know gets the shared "unknown" slot and is not stored, so
    a client sending random command names cannot grow memory or leak bytes into labels.
    """

    __slots__ = ("role", "identity", "_known", "unknown")

    def __init__(self, role: str, identity: str, known: frozenset[str]) -> None:
        super().__init__()
        self.role = role
        self.identity = identity
        self._known = known
        self.unknown = [0, 0, 0]
        for name in WATCHED_COMMANDS:
            if name in known:
                self[name] = [0, 0, 0]

    def __missing__(self, name: str) -> list[int]:
        if name in self._known:
            slot = self[name] = [0, 0, 0]  # first use of this command: now exported
            return slot
        return self.unknown

    def inc(self, name: str, result: int) -> None:
        """Convenience (slower than indexing directly): result is OK, ERROR or DENIED."""
        self[name][result] += 1


def identity_label(rule: IdentityRule) -> str:
    """A bounded, config-derived label for the identity rule a client matched.

    Built from what the operator wrote in [[identities]] (never from certificate bytes),
    e.g. "cn=billing-service" or "uri=spiffe://example.org/ns/prod/sa/reports".
    """
    parts = []
    for field, short in (("subject_cn", "cn"), ("subject_ou", "ou"), ("san_dns", "dns"),
                         ("san_uri", "uri"), ("san_email", "email"),
                         ("fingerprint_sha256", "sha256")):
        value = getattr(rule, field)
        if value is not None:
            parts.append(f"{short}={value[:16] if short == 'sha256' else value}")
    return ",".join(parts) or rule.role


def _not_after(source: CertSource) -> float:
    """The soonest expiry (epoch seconds) of a certificate, a PEM file or PEM bundle."""
    if isinstance(source, int | float):
        return float(source)
    if isinstance(source, dt.datetime):
        if source.tzinfo is None:
            source = source.replace(tzinfo=dt.UTC)
        return source.timestamp()
    if isinstance(source, x509.Certificate):
        return source.not_valid_after_utc.timestamp()
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    certs = x509.load_pem_x509_certificates(data)
    # a chain or CA bundle is only as good as its first certificate to expire
    return min(c.not_valid_after_utc.timestamp() for c in certs)


class Metrics:
    """Every phiproxy metric; one instance per process, with its own registry."""

    def __init__(self, roles: Iterable[str] = (), commands: Iterable[str] | None = None,
                 *, clock: Callable[[], float] = time.time) -> None:
        if commands is None:
            from proxy.commands.table import default_table
            commands = (c.name for c in default_table())
        self._known_commands = frozenset(commands)
        self._clock = clock
        self._counts: dict[tuple[str, str], CommandCounts] = {}
        for role in roles:
            self.command_counter(role)
        self.proxy_latency = FastHistogram()
        self.backend_rtt = FastHistogram()
        self.connections_open = 0
        self._connections: dict[tuple[str, str], int] = {("accepted", "ok"): 0}
        for reason in REFUSAL_REASONS:
            self._connections[("refused", reason)] = 0
        self._tls: dict[str, int] = dict.fromkeys(TLS_FAILURE_REASONS, 0)
        self._denied: dict[tuple[str, str, str], int] = {}
        self.protocol_errors = 0
        self.backend_lost_count = 0
        self.backend_failovers = 0  # the primary moved (mode = "sentinel")
        self.l4_probes = 0
        self.reloads = {"ok": 0, "failed": 0}
        self.reload_sessions_closed = 0
        self.backend_up: bool | None = None
        self.backend_idle = 0
        self._backend_probe: Callable[[], tuple[bool, int]] | None = None
        self._audit: AuditStats | None = None
        self._lockout_probe: Callable[[], int] | None = None
        self._lockout_certs_probe: Callable[[], int] | None = None
        self._cert_expiry: dict[str, float] = {}
        self._client_min = (_INF, _INF)  # (this period, the previous one)
        self._client_period = 0
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))
        # memory, CPU, open files: phiproxy_process_* (read from /proc at scrape time)
        ProcessCollector(namespace="phiproxy", registry=self.registry)
        self._http: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ per command
    def command_counter(self, role: str, identity: str = "") -> CommandCounts:
        """The counts object for a (role, identity): take it once per connection."""
        key = (role, identity)
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = CommandCounts(role, identity, self._known_commands)
        return counts

    def add_commands(self, names: Iterable[str]) -> None:
        """Commands learned from the backend (learn_commands) become countable by name.

        Pass the full names `extend_from_command_reply` returned (`mymod.get`,
        `config|newsub`). Counters already handed to sessions see them too: each holds
        the known set by reference, so it is swapped in every one of them.
        """
        self._known_commands = self._known_commands | frozenset(names)
        for counts in self._counts.values():
            counts._known = self._known_commands

    def observe_proxy_latency(self, seconds: float) -> None:
        self.proxy_latency.observe(seconds)

    def observe_backend_rtt(self, seconds: float) -> None:
        self.backend_rtt.observe(seconds)

    def denied(self, role: str, identity: str, reason: str) -> None:
        """A refused command; reason is the stricter extra's name or "acl"."""
        key = (role, identity, reason)
        self._denied[key] = self._denied.get(key, 0) + 1

    # ------------------------------------------------------------------ per connection
    def connection_opened(self) -> None:
        self.connections_open += 1
        self._connections[("accepted", "ok")] += 1

    def connection_closed(self) -> None:
        self.connections_open -= 1

    def connection_refused(self, reason: str) -> None:
        """A refused connection; a TLS reason also counts as a TLS handshake failure
        (so do not call tls_failed() for the same event)."""
        key = ("refused", reason)
        self._connections[key] = self._connections.get(key, 0) + 1
        if reason in _TLS_SET:
            self.tls_failed(reason)

    def tls_failed(self, reason: str) -> None:
        self._tls[reason] = self._tls.get(reason, 0) + 1

    def protocol_error(self) -> None:
        self.protocol_errors += 1

    def l4_probe(self) -> None:
        """A TCP connection closed before sending a byte: a load balancer's health check."""
        self.l4_probes += 1

    def backend_lost(self) -> None:
        self.backend_lost_count += 1

    def reloaded(self, ok: bool, sessions_closed: int = 0) -> None:
        """A SIGHUP reload: applied or refused, and how many sessions it closed."""
        self.reloads["ok" if ok else "failed"] += 1
        self.reload_sessions_closed += sessions_closed

    # ------------------------------------------------------------------ state read at scrape
    def set_backend_state(self, up: bool, idle: int) -> None:
        self.backend_up = up
        self.backend_idle = idle

    def watch_backend(self, probe: Callable[[], tuple[bool, int]]) -> None:
        """probe() -> (up, idle connections), called from the scrape thread."""
        self._backend_probe = probe

    def watch_audit(self, stats: AuditStats) -> None:
        self._audit = stats

    def watch_lockout(self, probe: Callable[[], int],
                      certificates: Callable[[], int] | None = None) -> None:
        """probe() -> the number of source addresses blocked now; certificates() -> the
        number of client certificates (fingerprints) blocked now."""
        self._lockout_probe = probe
        self._lockout_certs_probe = certificates

    def set_cert_expiry(self, cert: str, source: CertSource) -> None:
        """cert: "server", "client_ca" or another name; source: a certificate, PEM bytes,
        a PEM file path (a bundle counts by its soonest expiry), a datetime or epoch."""
        self._cert_expiry[cert] = _not_after(source)

    def set_server_cert(self, source: CertSource) -> None:
        self.set_cert_expiry("server", source)

    def set_client_ca(self, source: CertSource) -> None:
        self.set_cert_expiry("client_ca", source)

    def client_cert_seen(self, not_after: dt.datetime | float) -> None:
        """Once per accepted client: keeps the soonest expiry seen in the last 12-24 h, so
        a renewed certificate clears the alert a day later instead of never."""
        expiry = _not_after(not_after)
        period = int(self._clock() // CLIENT_CERT_PERIOD_S)
        current, previous = self._client_min
        if period != self._client_period:
            previous = current if period == self._client_period + 1 else _INF
            current = _INF
            self._client_period = period
        self._client_min = (min(current, expiry), previous)

    def _client_expiry(self) -> float | None:
        """The scrape thread's view; it reads the two periods and never writes them."""
        period = int(self._clock() // CLIENT_CERT_PERIOD_S)
        current, previous = self._client_min
        if period == self._client_period + 1:
            current, previous = _INF, current
        elif period != self._client_period:
            return None
        soonest = min(current, previous)
        return None if soonest == _INF else soonest

    # ------------------------------------------------------------------ exposition
    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def start_http(self, address: str, port: int,
                   ready: Callable[[], tuple[bool, str]] = lambda: (True, "ok")) -> None:
        """Serve /metrics, /healthz and /readyz from a daemon thread; port 0: do nothing.

        Raises OSError when the address cannot be bound (the caller reports it).
        """
        if port == 0:
            return
        family, _, _, _, sockaddr = socket.getaddrinfo(
            address or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        server_class = _Server6 if family == socket.AF_INET6 else _Server
        server = server_class(sockaddr[:2], _Handler)
        server.metrics, server.ready = self, ready
        self._http = server
        # poll_interval bounds how long stop_http() waits; 10 wake-ups a second cost nothing
        threading.Thread(target=server.serve_forever, args=(0.1,), name="phiproxy-metrics",
                         daemon=True).start()

    @property
    def http_port(self) -> int | None:
        return self._http.server_address[1] if self._http is not None else None

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    metrics: Metrics
    ready: Callable[[], tuple[bool, str]]

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look the address up in DNS (getfqdn): not needed
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "phiproxy"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, self.server.metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._reply(200, b"ok\n")
        elif path == "/readyz":
            try:
                ok, reason = self.server.ready()
            except Exception as exc:  # a broken probe means not ready, not a dead thread
                ok, reason = False, f"readiness check failed: {exc}"
            self._reply(200 if ok else 503, (reason or ("ok" if ok else "not ready")).encode()
                        + b"\n")
        else:
            self._reply(404, b"not found; try /metrics, /healthz or /readyz\n")

    def _reply(self, status: int, body: bytes,
               content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # scrapes every few seconds would drown the log


class _Collector:
    """Turns Metrics' plain ints into metric families, at scrape time only."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.m
        yield from self._commands()
        yield from self._connections()

        denied = CounterMetricFamily(
            PREFIX + "denials", "Commands refused, by role, identity rule and reason "
            "(the stricter extra's name, or acl)", labels=["role", "identity", "reason"])
        for (role, identity, reason), n in dict.copy(m._denied).items():
            denied.add_metric([role, identity, reason], n)
        yield denied

        for name, hist, doc in (
                ("proxy_latency_seconds", m.proxy_latency,
                 "Time the proxy adds to a request (framing, policy, audit, forwarding)"),
                ("backend_rtt_seconds", m.backend_rtt,
                 "Round trip from forwarding a request to the backend's reply")):
            buckets, total = hist.cumulative()
            family = HistogramMetricFamily(PREFIX + name, doc)
            family.add_metric([], buckets, total)
            yield family

        yield CounterMetricFamily(PREFIX + "protocol_errors", "Client connections closed for "
                                  "a RESP protocol error", value=m.protocol_errors)
        yield CounterMetricFamily(PREFIX + "backend_lost", "Backend connections lost under a "
                                  "client session", value=m.backend_lost_count)
        yield CounterMetricFamily(PREFIX + "backend_failovers", "Times the backend primary "
                                  "moved (Sentinel failover followed)",
                                  value=m.backend_failovers)
        yield CounterMetricFamily(PREFIX + "l4_probes", "TCP connections closed before "
                                  "sending a byte (load balancer health checks); not "
                                  "refusals, not failures", value=m.l4_probes)
        reloads = CounterMetricFamily(PREFIX + "reloads", "SIGHUP reloads, applied (ok) or "
                                      "refused for a bad configuration (failed)",
                                      labels=["result"])
        for result, n in m.reloads.items():
            reloads.add_metric([result], n)
        yield reloads
        yield CounterMetricFamily(PREFIX + "reload_sessions_closed", "Sessions a reload "
                                  "closed (revoked, unmapped, or over max_cert_validity_h)",
                                  value=m.reload_sessions_closed)
        yield from self._backend()
        yield from self._audit()
        yield from self._certs()
        if m._lockout_probe is not None:
            yield GaugeMetricFamily(PREFIX + "lockout_blocked_sources", "Source addresses "
                                    "blocked by the lockout now", value=m._lockout_probe())
        if m._lockout_certs_probe is not None:
            yield GaugeMetricFamily(PREFIX + "lockout_blocked_certificates", "Client "
                                    "certificates (by SHA-256 fingerprint) blocked by the "
                                    "lockout now", value=m._lockout_certs_probe())

    def _commands(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            PREFIX + "commands", "Commands by name, role, identity rule and result "
            "(ok, error: the backend replied with an error, denied: refused by the proxy)",
            labels=["command", "role", "identity", "result"])
        for counts in list(self.m._counts.values()):
            slots = list(dict.copy(counts).items())
            if any(counts.unknown):
                slots.append((UNKNOWN_COMMAND, counts.unknown))
            for name, slot in slots:
                for result, n in zip(RESULTS, list(slot), strict=True):
                    family.add_metric([name, counts.role, counts.identity, result], n)
        yield family

    def _connections(self) -> Iterator[Metric]:
        m = self.m
        yield GaugeMetricFamily(PREFIX + "connections_open", "Client sessions open now",
                                value=m.connections_open)
        conns = CounterMetricFamily(
            PREFIX + "connections", "Client connections accepted (reason ok) or refused "
            "before a session started, by reason", labels=["result", "reason"])
        for (result, reason), n in dict.copy(m._connections).items():
            conns.add_metric([result, reason], n)
        yield conns
        tls = CounterMetricFamily(PREFIX + "tls_handshake_failures",
                                  "Failed client TLS handshakes by reason", labels=["reason"])
        for reason, n in dict.copy(m._tls).items():
            tls.add_metric([reason], n)
        yield tls

    def _backend(self) -> Iterator[Metric]:
        m = self.m
        up, idle = m.backend_up, m.backend_idle
        if m._backend_probe is not None:
            up, idle = m._backend_probe()
        if up is None:
            return
        yield GaugeMetricFamily(PREFIX + "backend_up", "1 when the backend answered its last "
                                "health check or connection attempt", value=1 if up else 0)
        yield GaugeMetricFamily(PREFIX + "backend_pool_idle_connections",
                                "Pre-warmed backend connections ready", value=idle)

    def _audit(self) -> Iterator[Metric]:
        stats = self.m._audit
        if stats is None:
            return
        yield CounterMetricFamily(PREFIX + "audit_records_written", "Audit records written",
                                  value=stats.written)
        yield CounterMetricFamily(PREFIX + "audit_write_failures", "Audit records that could "
                                  "not be written", value=stats.failures)
        yield CounterMetricFamily(
            PREFIX + "audit_writes", "Write-ahead writes to the audit sink: records of "
            "every client read in one event loop iteration share one", value=stats.writes)
        yield GaugeMetricFamily(PREFIX + "audit_queue_depth", "Audit records queued or "
                                "buffered, not yet written", value=stats.depth)
        yield CounterMetricFamily(PREFIX + "audit_fsyncs", "fsyncs of the audit trail "
                                  "([audit] fsync)", value=getattr(stats, "fsyncs", 0))
        yield CounterMetricFamily(PREFIX + "audit_fsync_failures", "fsyncs of the audit trail "
                                  "that failed", value=getattr(stats, "fsync_failures", 0))

    def _certs(self) -> Iterator[Metric]:
        m = self.m
        expiries = dict(m._cert_expiry)
        client = m._client_expiry()
        if client is not None:
            expiries["client_min"] = client
        if not expiries:
            return
        now = m._clock()
        family = GaugeMetricFamily(
            PREFIX + "cert_expiry_seconds", "Seconds until a certificate expires (negative: "
            "expired): server, client_ca, client_min (soonest client certificate seen in "
            "the last 12-24 h)", labels=["cert"])
        for cert, not_after in expiries.items():
            family.add_metric([cert], not_after - now)
        yield family
