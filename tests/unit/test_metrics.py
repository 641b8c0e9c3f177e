"""Metrics: scraped over HTTP and checked by value; the hot path never touches
prometheus-client; labels never carry client bytes."""

from __future__ import annotations

import datetime as dt
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import prometheus_client.metrics
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.certs import issue_cert, new_ca
from proxy.commands.table import default_table, extend_from_command_reply
from proxy.config import IdentityRule, RoleConfig
from proxy.metrics import (
    CLIENT_CERT_PERIOD_S,
    DENIED,
    ERROR,
    LATENCY_BUCKETS,
    OK,
    REFUSAL_REASONS,
    TLS_FAILURE_REASONS,
    FastHistogram,
    Metrics,
    identity_label,
)
from proxy.policy.engine import compile_roles, decide
from tests.helpers import free_port

NOW = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics(clock: Clock) -> Iterator[Metrics]:
    m = Metrics(["reader", "writer"], clock=clock)
    m.start_http("127.0.0.1", free_port(), ready=lambda: (True, "ok"))
    yield m
    m.stop_http()


def get(m: Metrics, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{m.http_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(m: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics: (name, labels) -> value."""
    status, text = get(m, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series(samples: dict, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


# --- commands -----------------------------------------------------------------------------


def test_command_counts_scraped_by_value(metrics: Metrics) -> None:
    counts = metrics.command_counter("reader", "cn=reports")
    for _ in range(1000):
        counts["get"][OK] += 1
    for _ in range(7):
        counts["get"][ERROR] += 1
    for _ in range(3):
        counts["config|get"][DENIED] += 1
    counts.inc("set", DENIED)
    s = scrape(metrics)
    name = "phiproxy_commands_total"
    labels = {"role": "reader", "identity": "cn=reports"}
    assert value(s, name, command="get", result="ok", **labels) == 1000
    assert value(s, name, command="get", result="error", **labels) == 7
    assert value(s, name, command="get", result="denied", **labels) == 0
    assert value(s, name, command="config|get", result="denied", **labels) == 3
    assert value(s, name, command="set", result="denied", **labels) == 1


def test_counter_objects_are_shared_per_role_and_identity(metrics: Metrics) -> None:
    a = metrics.command_counter("writer", "cn=billing")
    assert metrics.command_counter("writer", "cn=billing") is a
    assert metrics.command_counter("writer", "cn=other") is not a
    a["get"][OK] += 1
    metrics.command_counter("writer", "cn=billing")["get"][OK] += 1
    s = scrape(metrics)
    assert value(s, "phiproxy_commands_total", command="get", role="writer",
                 identity="cn=billing", result="ok") == 2


def test_exposition_has_only_used_or_predeclared_command_series(metrics: Metrics) -> None:
    counts = metrics.command_counter("reader")
    counts["hget"][OK] += 1
    commands = {lbl["command"] for lbl in series(scrape(metrics), "phiproxy_commands_total")}
    # hget was used; the deletion commands are pre-declared at 0 for the alerts
    assert commands == {"hget", "del", "unlink", "flushall", "flushdb"}


def test_unknown_command_names_never_become_labels_or_memory(metrics: Metrics) -> None:
    counts = metrics.command_counter("reader")
    before = len(counts)
    for i in range(10_000):  # e.g. a client sending key names where the command goes
        counts[f"app:phi:patient:{i}"][DENIED] += 1
    assert len(counts) == before
    _, text = get(metrics, "/metrics")
    assert "patient" not in text
    s = scrape(metrics)
    assert value(s, "phiproxy_commands_total", command="unknown", role="reader", identity="",
                 result="denied") == 10_000


def test_learned_commands_become_countable(clock: Clock) -> None:
    m = Metrics(["r"], commands=["get"], clock=clock)
    counts = m.command_counter("r")
    counts["newcmd"][OK] += 1
    assert counts["newcmd"] is counts.unknown
    m.add_commands(["newcmd"])
    counts["newcmd"][OK] += 1
    assert counts["newcmd"] is not counts.unknown and counts["newcmd"][OK] == 1


def test_commands_learned_from_a_backend_count_by_name(metrics: Metrics) -> None:
    # What learn_backend_commands does, then add_commands with the names it learned.
    table = default_table().copy()
    added = extend_from_command_reply(table, [
        [b"mymod.get", 2, [b"readonly", b"module"], 1, 1, 1, [b"@read"], [], [], []],
        [b"config", -2, [], 0, 0, 0, [b"@slow"], [], [], [
            [b"config|frobnicate", 2, [b"admin"], 0, 0, 0, [b"@admin"], [], [], []]]],
    ])
    m = metrics
    before = m.command_counter("reader", "cn=early")  # a session's, taken before learning
    assert before["mymod.get"] is before.unknown
    m.add_commands(added)
    after = m.command_counter("reader", "cn=late")
    for counts in (before, after):
        for name in ("mymod.get", "config|frobnicate"):
            counts[name][OK] += 1
            assert counts[name] is not counts.unknown, name
    s = scrape(m)
    assert value(s, "phiproxy_commands_total", command="config|frobnicate", role="reader",
                 identity="cn=early", result="ok") == 1
    assert value(s, "phiproxy_commands_total", command="mymod.get", role="reader",
                 identity="cn=late", result="ok") == 1


def test_decided_subcommand_names_are_known_labels(metrics: Metrics) -> None:
    # Sessions count under Decision.command: `client|setname`, not the container `client`.
    role = compile_roles({"r": RoleConfig("r", "+client|setname", None)})["r"]
    counts = metrics.command_counter("reader")
    allowed = decide(role, [b"CLIENT", b"SETNAME", b"x"])
    refused = decide(role, [b"client", b"KILL", b"ID", b"1"])
    assert (allowed.allowed, allowed.command) == (True, "client|setname")
    assert (refused.allowed, refused.command) == (False, "client|kill")
    counts[allowed.command][OK] += 1
    counts[refused.command][DENIED] += 1
    assert counts["client|setname"] is not counts.unknown
    assert counts["client|kill"] is not counts.unknown
    # An unknown subcommand of a known container is client bytes: never a label.
    unknown = decide(role, [b"CLIENT", b"app:phi:patient:1"])
    assert unknown.command == "client|app:phi:patient:1"
    counts[unknown.command][DENIED] += 1
    assert counts[unknown.command] is counts.unknown
    s = scrape(metrics)
    labels = {"role": "reader", "identity": ""}
    assert value(s, "phiproxy_commands_total", command="client|setname", result="ok",
                 **labels) == 1
    assert value(s, "phiproxy_commands_total", command="client|kill", result="denied",
                 **labels) == 1
    assert value(s, "phiproxy_commands_total", command="client", result="ok", **labels) is None
    assert value(s, "phiproxy_commands_total", command="unknown", result="denied",
                 **labels) == 1


def test_hot_path_never_calls_prometheus_client(metrics: Metrics,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("prometheus-client metric object used on the hot path")

    for method in ("labels", "inc", "observe", "set"):
        for cls in (prometheus_client.metrics.MetricWrapperBase, prometheus_client.Counter,
                    prometheus_client.Histogram, prometheus_client.Gauge):
            if hasattr(cls, method):
                monkeypatch.setattr(cls, method, forbidden)
    counts = metrics.command_counter("reader")
    counts["get"][OK] += 1
    metrics.observe_proxy_latency(30e-6)
    metrics.observe_backend_rtt(150e-6)
    metrics.denied("reader", "", "acl")
    metrics.connection_opened()
    metrics.connection_refused("cert_expired")
    metrics.connection_closed()
    assert scrape(metrics)  # the collector builds families, never metric objects


def test_denials_by_role_identity_and_reason(metrics: Metrics) -> None:
    for _ in range(4):
        metrics.denied("reader", "cn=reports", "acl")
    metrics.denied("reader", "cn=reports", "dangerous")
    s = scrape(metrics)
    assert value(s, "phiproxy_denials_total", role="reader", identity="cn=reports",
                 reason="acl") == 4
    assert value(s, "phiproxy_denials_total", role="reader", identity="cn=reports",
                 reason="dangerous") == 1


def test_identity_label_comes_from_the_rule_not_the_certificate() -> None:
    assert identity_label(IdentityRule(role="w", subject_cn="billing")) == "cn=billing"
    assert identity_label(IdentityRule(role="r", san_uri="spiffe://x/y", subject_ou="ops")) \
        == "ou=ops,uri=spiffe://x/y"
    assert identity_label(IdentityRule(role="r", fingerprint_sha256="ab" * 32)) \
        == "sha256=" + "ab" * 8


# --- latency histograms -------------------------------------------------------------------


def test_buckets_resolve_20us_to_100ms() -> None:
    for bound in (20e-6, 50e-6, 100e-6, 1e-3, 10e-3, 100e-3):
        assert bound in LATENCY_BUCKETS
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)


def test_histogram_buckets_by_value(metrics: Metrics) -> None:
    observations = [15e-6, 20e-6, 30e-6, 30e-6, 80e-6, 0.0015, 0.07, 0.07, 3.0]
    for seconds in observations:
        metrics.observe_proxy_latency(seconds)
    metrics.observe_backend_rtt(250e-6)
    s = scrape(metrics)
    name = "phiproxy_proxy_latency_seconds"
    expected = {"1e-05": 0, "2e-05": 2, "5e-05": 4, "0.0001": 5, "0.0002": 5, "0.0005": 5,
                "0.001": 5, "0.002": 6, "0.05": 6, "0.1": 8, "1.0": 8, "+Inf": 9}
    for le, n in expected.items():
        assert value(s, name + "_bucket", le=le) == n, le
    assert value(s, name + "_count") == 9
    assert value(s, name + "_sum") == pytest.approx(sum(observations))
    assert value(s, "phiproxy_backend_rtt_seconds_bucket", le="0.0002") == 0
    assert value(s, "phiproxy_backend_rtt_seconds_bucket", le="0.0005") == 1


def test_fast_histogram_upper_bound_is_inclusive() -> None:
    h = FastHistogram((1.0, 2.0))
    for x in (1.0, 1.5, 2.0, 2.5):
        h.observe(x)
    buckets, total = h.cumulative()
    assert buckets == [("1.0", 1), ("2.0", 3), ("+Inf", 4)]
    assert total == 7.0


# --- connections, TLS ---------------------------------------------------------------------


def test_connections_by_value(metrics: Metrics) -> None:
    for _ in range(5):
        metrics.connection_opened()
    for _ in range(2):
        metrics.connection_closed()
    for _ in range(3):
        metrics.connection_refused("network")
    metrics.connection_refused("cert_expired")
    metrics.connection_refused("identity")
    metrics.protocol_error()
    metrics.backend_lost()
    s = scrape(metrics)
    assert value(s, "phiproxy_connections_open") == 3
    total = "phiproxy_connections_total"
    assert value(s, total, result="accepted", reason="ok") == 5
    assert value(s, total, result="refused", reason="network") == 3
    assert value(s, total, result="refused", reason="cert_expired") == 1
    assert value(s, total, result="refused", reason="identity") == 1
    tls = "phiproxy_tls_handshake_failures_total"
    assert value(s, tls, reason="cert_expired") == 1
    assert value(s, tls, reason="network") is None  # not a TLS failure
    assert value(s, tls, reason="identity") is None  # the handshake itself succeeded
    assert value(s, "phiproxy_protocol_errors_total") == 1
    assert value(s, "phiproxy_backend_lost_total") == 1


def test_known_refusal_reasons_start_at_zero(metrics: Metrics) -> None:
    s = scrape(metrics)
    for reason in REFUSAL_REASONS:
        assert value(s, "phiproxy_connections_total", result="refused", reason=reason) == 0
    for reason in TLS_FAILURE_REASONS:
        assert value(s, "phiproxy_tls_handshake_failures_total", reason=reason) == 0


# --- backend, audit, lockout --------------------------------------------------------------


def test_backend_state(metrics: Metrics) -> None:
    assert value(scrape(metrics), "phiproxy_backend_up") is None  # unknown until told
    metrics.set_backend_state(True, 4)
    s = scrape(metrics)
    assert value(s, "phiproxy_backend_up") == 1
    assert value(s, "phiproxy_backend_pool_idle_connections") == 4
    state = {"up": False, "idle": 0}
    metrics.watch_backend(lambda: (state["up"], state["idle"]))
    s = scrape(metrics)
    assert value(s, "phiproxy_backend_up") == 0
    assert value(s, "phiproxy_backend_pool_idle_connections") == 0
    state.update(up=True, idle=2)
    assert value(scrape(metrics), "phiproxy_backend_pool_idle_connections") == 2


def test_audit_stats_read_at_scrape_time(metrics: Metrics) -> None:
    stats = SimpleNamespace(written=0, failures=0, depth=0, writes=0)
    metrics.watch_audit(stats)
    stats.written, stats.failures, stats.depth, stats.writes = 1234, 2, 17, 40
    s = scrape(metrics)
    assert value(s, "phiproxy_audit_records_written_total") == 1234
    assert value(s, "phiproxy_audit_writes_total") == 40
    assert value(s, "phiproxy_audit_write_failures_total") == 2
    assert value(s, "phiproxy_audit_queue_depth") == 17


def test_lockout_gauge(metrics: Metrics) -> None:
    metrics.watch_lockout(lambda: 3)
    assert value(scrape(metrics), "phiproxy_lockout_blocked_sources") == 3


# --- certificates -------------------------------------------------------------------------


def _expiry(s: dict, cert: str) -> float | None:
    return value(s, "phiproxy_cert_expiry_seconds", cert=cert)


def test_cert_expiry_from_real_certificates(metrics: Metrics, clock: Clock,
                                            tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    clock.now = now.timestamp()
    ca = new_ca("clients", days=100)
    older_ca = new_ca("old clients", days=30)
    server = issue_cert(ca, "proxy", server=True, not_after=now + dt.timedelta(days=20))
    server_file = tmp_path / "proxy.pem"
    server_file.write_bytes(server.cert_pem())
    bundle = tmp_path / "clients-ca.pem"
    bundle.write_bytes(ca.cert_pem() + older_ca.cert_pem())  # a bundle: its soonest counts
    metrics.set_server_cert(server_file)
    metrics.set_client_ca(bundle)
    s = scrape(metrics)
    assert _expiry(s, "server") == pytest.approx(20 * 86400, abs=1)
    expected_ca = older_ca.cert.not_valid_after_utc.timestamp() - clock.now
    assert _expiry(s, "client_ca") == pytest.approx(expected_ca, abs=1)
    assert _expiry(s, "client_min") is None  # no client seen yet
    clock.now += 86400  # the gauge counts down at scrape time
    assert _expiry(scrape(metrics), "server") == pytest.approx(19 * 86400, abs=1)
    metrics.set_server_cert(server.cert)  # an x509 object works as well
    assert _expiry(scrape(metrics), "server") == pytest.approx(19 * 86400, abs=1)


def test_client_cert_minimum_and_its_memory(metrics: Metrics, clock: Clock) -> None:
    ca = new_ca("clients")
    clock.now = (int(NOW // CLIENT_CERT_PERIOD_S) + 0.5) * CLIENT_CERT_PERIOD_S
    base = dt.datetime.fromtimestamp(clock.now, dt.UTC).replace(microsecond=0)
    soon = issue_cert(ca, "a", client=True, not_after=base + dt.timedelta(days=5))
    later = issue_cert(ca, "b", client=True, not_after=base + dt.timedelta(days=50))
    metrics.client_cert_seen(later.cert.not_valid_after_utc)
    metrics.client_cert_seen(soon.cert.not_valid_after_utc)
    metrics.client_cert_seen(later.cert.not_valid_after_utc)
    assert _expiry(scrape(metrics), "client_min") == pytest.approx(5 * 86400, abs=1)
    # next period: still remembered, and a newer sighting does not hide it
    clock.now += CLIENT_CERT_PERIOD_S
    metrics.client_cert_seen(later.cert.not_valid_after_utc)
    assert _expiry(scrape(metrics), "client_min") == pytest.approx(
        5 * 86400 - CLIENT_CERT_PERIOD_S, abs=1)
    # a period later the renewed (later) certificate is what remains
    clock.now += CLIENT_CERT_PERIOD_S
    metrics.client_cert_seen(later.cert.not_valid_after_utc)
    assert _expiry(scrape(metrics), "client_min") == pytest.approx(
        50 * 86400 - 2 * CLIENT_CERT_PERIOD_S, abs=1)
    # nobody seen for two periods: no value rather than a stale one
    clock.now += 2 * CLIENT_CERT_PERIOD_S
    assert _expiry(scrape(metrics), "client_min") is None


# --- HTTP endpoint ------------------------------------------------------------------------


def test_healthz_and_readyz(clock: Clock) -> None:
    state = {"ready": False, "reason": "backend unreachable: connection refused"}
    m = Metrics(["r"], clock=clock)
    m.start_http("127.0.0.1", free_port(), ready=lambda: (state["ready"], state["reason"]))
    try:
        assert get(m, "/healthz") == (200, "ok\n")
        assert get(m, "/readyz") == (503, "backend unreachable: connection refused\n")
        state.update(ready=True, reason="ok")
        assert get(m, "/readyz") == (200, "ok\n")
        status, _ = get(m, "/nope")
        assert status == 404
    finally:
        m.stop_http()


def test_readyz_with_a_failing_probe_is_not_ready(clock: Clock) -> None:
    def probe() -> tuple[bool, str]:
        raise RuntimeError("boom")

    m = Metrics(["r"], clock=clock)
    m.start_http("127.0.0.1", free_port(), ready=probe)
    try:
        status, body = get(m, "/readyz")
        assert status == 503 and "boom" in body
        assert get(m, "/healthz")[0] == 200
    finally:
        m.stop_http()


def test_port_zero_disables_the_endpoint(clock: Clock) -> None:
    m = Metrics(["r"], clock=clock)
    m.start_http("127.0.0.1", 0, ready=lambda: (True, "ok"))
    assert m.http_port is None
    m.stop_http()


def test_port_in_use_raises(metrics: Metrics, clock: Clock) -> None:
    other = Metrics(["r"], clock=clock)
    with pytest.raises(OSError):
        other.start_http("127.0.0.1", metrics.http_port or 0, ready=lambda: (True, "ok"))


def test_ipv6_endpoint(clock: Clock) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    m = Metrics(["r"], clock=clock)
    m.start_http("::1", free_port(), ready=lambda: (True, "ok"))
    try:
        with urllib.request.urlopen(f"http://[::1]:{m.http_port}/healthz", timeout=5) as r:
            assert r.status == 200
    finally:
        m.stop_http()


def test_registries_are_private(clock: Clock) -> None:
    a, b = Metrics(["r"], clock=clock), Metrics(["r"], clock=clock)
    a.connection_opened()
    assert b"phiproxy_connections_open 1.0" in a.exposition()
    assert b"phiproxy_connections_open 0.0" in b.exposition()
    assert b"phiproxy_connections_open" not in prometheus_client.generate_latest()


def test_reload_counters_by_value() -> None:
    m = Metrics()
    m.reloaded(ok=True, sessions_closed=2)
    m.reloaded(ok=True)
    m.reloaded(ok=False)
    found = {(s.name, s.labels.get("result")): s.value
             for family in text_string_to_metric_families(m.exposition().decode())
             for s in family.samples}
    assert found[("phiproxy_reloads_total", "ok")] == 2
    assert found[("phiproxy_reloads_total", "failed")] == 1
    assert found[("phiproxy_reload_sessions_closed_total", None)] == 2
