"""Lockout: window, block, expiry and the memory cap, on a fake clock; [lockout] config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.certs import write_dev_pki
from proxy.config import LockoutConfig
from proxy.lockout import FAILURE_REASONS, Lockout
from tests.unit.test_config import Site, full_doc


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_failures_within_the_window_block(clock: Clock) -> None:
    lock = Lockout(failures=3, window_s=60, block_s=300, clock=clock)
    assert not lock.failure("10.0.0.1")
    clock.now += 20
    assert not lock.failure("10.0.0.1")
    assert not lock.blocked("10.0.0.1")
    clock.now += 20
    assert lock.failure("10.0.0.1")  # the third within 60 s starts the block
    assert lock.blocked("10.0.0.1")
    assert not lock.blocked("10.0.0.2")  # per source


def test_failures_spread_beyond_the_window_do_not_block(clock: Clock) -> None:
    lock = Lockout(failures=3, window_s=60, block_s=300, clock=clock)
    for _ in range(10):
        assert not lock.failure("10.0.0.1")
        clock.now += 31  # never three within 60 s
    assert not lock.blocked("10.0.0.1")


def test_window_is_sliding(clock: Clock) -> None:
    lock = Lockout(failures=3, window_s=60, block_s=300, clock=clock)
    lock.failure("a")  # t=0
    clock.now += 50
    lock.failure("a")  # t=50
    clock.now += 20
    assert not lock.failure("a")  # t=70: the one at t=0 has left the window
    clock.now += 5
    assert lock.failure("a")  # t=75: 50, 70, 75


def test_block_expires_and_needs_fresh_failures(clock: Clock) -> None:
    lock = Lockout(failures=2, window_s=60, block_s=300, clock=clock)
    lock.failure("a")
    assert lock.failure("a")
    clock.now += 299.9
    assert lock.blocked("a")
    assert not lock.failure("a")  # while blocked: not extended, not a new block
    clock.now += 0.1
    assert not lock.blocked("a")
    assert not lock.failure("a")  # the history was cleared when the block started
    assert lock.failure("a")


def test_success_forgives_earlier_failures(clock: Clock) -> None:
    lock = Lockout(failures=3, window_s=60, block_s=300, clock=clock)
    lock.failure("a")
    lock.failure("a")
    lock.success("a")
    assert not lock.failure("a")
    assert not lock.blocked("a")


def test_single_failure_threshold(clock: Clock) -> None:
    lock = Lockout(failures=1, window_s=1, block_s=10, clock=clock)
    assert lock.failure("a")
    assert lock.blocked("a")


def test_memory_is_capped_for_failing_sources(clock: Clock) -> None:
    lock = Lockout(failures=3, window_s=60, block_s=300, clock=clock, max_sources=100)
    for i in range(100_000):  # an attacker with many addresses
        lock.failure(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    assert lock.tracked() <= 200
    # the least recently failing are forgotten first
    lock.failure("victim")
    lock.failure("victim")
    for i in range(99):
        lock.failure(f"192.168.0.{i}")
    assert lock.failure("victim")


def test_memory_is_capped_for_blocked_sources(clock: Clock) -> None:
    lock = Lockout(failures=1, window_s=60, block_s=300, clock=clock, max_sources=50)
    for i in range(1000):
        assert lock.failure(f"src{i}")
        clock.now += 0.001
    assert lock.tracked() <= 100
    assert lock.blocked("src999")  # the newest blocks are the ones kept
    assert not lock.blocked("src0")
    assert lock.blocked_count() == 50


def test_expired_blocks_are_purged(clock: Clock) -> None:
    lock = Lockout(failures=1, window_s=60, block_s=10, clock=clock)
    for i in range(20):
        lock.failure(f"a{i}")
    assert lock.blocked_count() == 20
    clock.now += 11
    assert lock.blocked_count() == 0
    lock.failure("b")
    assert lock.tracked() == 1


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        Lockout(failures=0)
    with pytest.raises(ValueError):
        Lockout(window_s=0)


def test_failure_reasons_are_tls_and_identity_only() -> None:
    assert "identity" in FAILURE_REASONS and "cert_untrusted" in FAILURE_REASONS
    assert not FAILURE_REASONS & {"network", "max_connections", "lockout", "client_closed"}


# --- [lockout] configuration --------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path) -> Site:
    write_dev_pki(tmp_path / "certs", ["billing"])
    for name, data in (("backend.pass", b"s3cret\n"), ("audit.key", os.urandom(32))):
        path = tmp_path / "secrets" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o600)
    return Site(tmp_path, full_doc())


def test_lockout_defaults(site: Site) -> None:
    assert site.load().lockout == LockoutConfig(failures=5, window_s=60.0, block_s=300.0,
                                                enabled=True)


def test_lockout_section(site: Site) -> None:
    site.doc["lockout"] = {"failures": 3, "window_s": 30, "block_s": 900.5, "enabled": False}
    assert site.load().lockout == LockoutConfig(3, 30.0, 900.5, False)


@pytest.mark.parametrize(("key", "raw", "expect"), [
    ("failures", 0, "[lockout] failures = 0: must be an integer between 1 and"),
    ("failures", "5", 'remove the quotes: failures = 5'),
    ("window_s", 0, "[lockout] window_s = 0: must be a number of seconds above 0"),
    ("block_s", -1, "[lockout] block_s = -1: must be a number of seconds above 0"),
    ("enabled", "yes", "[lockout] enabled = \"yes\": must be a boolean"),
    ("blocks", 3, "unknown key [lockout] blocks; did you mean 'block_s'?"),
])
def test_lockout_mistakes_name_the_key(site: Site, key: str, raw: object, expect: str) -> None:
    site.doc["lockout"] = {key: raw}
    assert expect in site.problem()


def test_exempt_networks(site: Site) -> None:
    import ipaddress

    assert site.load().lockout.exempt_networks == ()
    site.doc["lockout"] = {"exempt_networks": ["10.0.8.0/24", "fd00::/8"]}
    assert site.load().lockout.exempt_networks == (ipaddress.ip_network("10.0.8.0/24"),
                                                   ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize(("raw", "expect"), [
    (["10.0.8.1/24"], '[lockout] exempt_networks = ["10.0.8.1/24"]: "10.0.8.1/24" is not a '
                      'network'),
    (["10.0.8.1/24"], 'did you mean "10.0.8.0/24"?'),
    ("10.0.8.0/24", "[lockout] exempt_networks"),
    ([7], "[lockout] exempt_networks"),
])
def test_exempt_networks_mistakes_name_file_and_key(site: Site, raw: object,
                                                   expect: str) -> None:
    site.doc["lockout"] = {"exempt_networks": raw}
    problem = site.problem()
    assert problem.startswith(f"{site.file}: ")
    assert expect in problem


def test_x509_strict_config(site: Site) -> None:
    assert site.load().listener.x509_strict is True
    site.doc["listener"]["x509_strict"] = False
    assert site.load().listener.x509_strict is False
    site.doc["listener"]["x509_strict"] = "no"
    assert '[listener] x509_strict = "no": must be a boolean' in site.problem()


def test_lockout_audit_record(tmp_path: Path) -> None:
    import json

    from proxy.audit.record import WARNING_EVENTS, AuditRecords
    from proxy.audit.verify import verify
    from proxy.audit.writer import AuditWriter
    from proxy.config import AuditConfig

    key = os.urandom(32)
    records = AuditRecords("test", "p1")
    fp = "ab" * 32
    bodies = [
        records.lockout(src="10.0.0.9:4242", identity=None,
                        blocked={"kind": "source", "address": "10.0.0.9"}, failures=5,
                        window_s=60.0, block_s=300.0, reason="lockout: source blocked"),
        records.lockout(src="10.0.0.9:4243",
                        identity={"cn": None, "san_uri": None, "fingerprint": fp},
                        blocked={"kind": "certificate", "fingerprint": fp, "subject": "CN=x"},
                        failures=5, window_s=60.0, block_s=300.0, reason="lockout: cert"),
    ]
    path = tmp_path / "audit.jsonl"
    writer = AuditWriter(AuditConfig(path=str(path), environment="test", instance="p1"),
                         key=key)
    writer.open()
    assert writer.write(bodies)
    writer.close()
    source, cert = (json.loads(line) for line in path.read_text().splitlines())
    assert list(source) == ["ts", "seq", "event", "environment", "instance", "conn", "src",
                            "identity", "role", "blocked", "failures", "window_s", "block_s",
                            "reason", "prev", "mac"]
    assert source["event"] == "lockout" and source["identity"] is None
    assert source["blocked"] == {"kind": "source", "address": "10.0.0.9"}
    assert cert["blocked"] == {"kind": "certificate", "fingerprint": fp, "subject": "CN=x"}
    assert cert["identity"]["fingerprint"] == fp and cert["block_s"] == 300
    assert "lockout" in WARNING_EVENTS  # syslog severity warning
    assert verify([str(path)], key).records == 2  # raises Broken otherwise


def test_metrics_export_probes_and_blocked_certificates() -> None:
    from proxy.metrics import Metrics

    metrics = Metrics(commands=())
    metrics.watch_lockout(lambda: 2, lambda: 3)
    metrics.l4_probe()
    metrics.connection_refused("crl_unavailable")
    text = metrics.exposition().decode()
    assert "phiproxy_l4_probes_total 1.0" in text
    assert "phiproxy_lockout_blocked_sources 2.0" in text
    assert "phiproxy_lockout_blocked_certificates 3.0" in text
    assert 'phiproxy_connections_total{reason="crl_unavailable",result="refused"} 1.0' in text
    assert 'phiproxy_connections_total{reason="lockout",result="refused"} 0.0' in text
