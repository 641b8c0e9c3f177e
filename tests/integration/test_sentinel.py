"""`[backend] mode = "sentinel"` against real Redis Sentinel over TLS: a primary, a replica
(TLS replication) and three sentinels, all from Debian's redis-server. The proxy finds the
primary, follows SENTINEL FAILOVER within health_interval_s + 1 s, records it, and loses
no write it acknowledged before the failover began or after it switched."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.helpers import (
    BACKEND_PASSWORD,
    BACKEND_USER,
    PKI,
    Proxy,
    RedisServer,
    free_port,
    require,
    start_proxy,
    start_redis,
    wait_port,
    write_proxy_config,
)

MASTER = "phi"
INTERVAL = 0.5


@dataclass
class Sentinels:
    nodes: list[RedisServer]
    sentinels: list[tuple[int, subprocess.Popen]]
    pki: PKI

    def client(self, port: int) -> redis.Redis:
        p = self.pki
        return redis.Redis(host="127.0.0.1", port=port, ssl=True,
                           ssl_ca_certs=str(p.path("backend-ca.pem")),
                           ssl_certfile=str(p.path("proxy-client.pem")),
                           ssl_keyfile=str(p.path("proxy-client-key.pem")), socket_timeout=5)

    def primary(self) -> tuple[str, int]:
        host, port = self.client(self.sentinels[0][0]).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
        return host.decode(), int(port)

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)


def tls_client_args(pki: PKI) -> tuple[str, ...]:
    """What a Redis process needs to connect to other nodes over TLS with a client
    certificate (replication, sentinels)."""
    return ("--tls-replication", "yes",
            "--tls-client-cert-file", str(pki.path("proxy-client.pem")),
            "--tls-client-key-file", str(pki.path("proxy-client-key.pem")))


def start_sentinel(pki: PKI, workdir: Path, primary_port: int) -> tuple[int, subprocess.Popen]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "sentinel.conf"  # Sentinel rewrites its file: one each
    conf.write_text(f"""port 0
tls-port {port}
bind 127.0.0.1
dir {workdir}
logfile {workdir / "sentinel.log"}
tls-cert-file {pki.path("backend.pem")}
tls-key-file {pki.path("backend-key.pem")}
tls-ca-cert-file {pki.path("backend-ca.pem")}
tls-auth-clients yes
tls-replication yes
tls-client-cert-file {pki.path("proxy-client.pem")}
tls-client-key-file {pki.path("proxy-client-key.pem")}
sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2
sentinel auth-user {MASTER} {BACKEND_USER}
sentinel auth-pass {MASTER} {BACKEND_PASSWORD}
sentinel down-after-milliseconds {MASTER} 1000
sentinel failover-timeout {MASTER} 5000
""")
    proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return port, proc


def _field(state: dict, name: str) -> int:
    """A number from redis-py's parsed SENTINEL MASTER (its key spelling varies)."""
    for key in (name, name.replace("-", "_"), name.encode()):
        if key in state:
            return int(state[key])
    raise KeyError(f"{name} not in {sorted(map(str, state))}")


@pytest.fixture
def sentinels(pki: PKI, tmp_path: Path) -> Iterator[Sentinels]:
    require("redis-server")
    primary = start_redis(pki, tmp_path / "n1", extra=tls_client_args(pki))
    replica = start_redis(pki, tmp_path / "n2", extra=(
        *tls_client_args(pki), "--replicaof", "127.0.0.1", str(primary.port),
        "--masteruser", BACKEND_USER, "--masterauth", BACKEND_PASSWORD))
    site = Sentinels([primary, replica], [], pki)
    try:
        deadline = time.monotonic() + 15
        while replica.client().info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica did not sync"
            time.sleep(0.1)
        site.sentinels = [start_sentinel(pki, tmp_path / f"s{i}", primary.port)
                          for i in range(3)]
        deadline = time.monotonic() + 15
        while True:  # every sentinel knows the replica and the other sentinels
            info = [site.client(p).execute_command("SENTINEL", "MASTER", MASTER)
                    for p, _ in site.sentinels]
            # redis-py parses SENTINEL MASTER into a dict (str keys, numbers as int)
            if all(_field(f, "num-slaves") == 1 and _field(f, "num-other-sentinels") == 2
                   for f in info):
                break
            assert time.monotonic() < deadline, f"sentinels not ready: {info}"
            time.sleep(0.2)
        yield site
    finally:
        for _, proc in site.sentinels:
            proc.terminate()
        for _, proc in site.sentinels:
            proc.wait(10)
        for node in site.nodes:
            node.stop()


def sentinel_proxy(pki: PKI, tmp_path: Path, site: Sentinels) -> Proxy:
    port, metrics = free_port(), free_port()
    config = write_proxy_config(pki, tmp_path / "proxy", site.nodes[0].port, port,
                                metrics_port=metrics)
    text = config.read_text()
    listed = ", ".join(f'"127.0.0.1:{p}"' for p, _ in site.sentinels)
    text = text.replace("[backend]\naddress = \"127.0.0.1\"\nport = ", "[backend]\n# port = ")
    text = text.replace("[backend]\n", f'[backend]\nmode = "sentinel"\nsentinels = [{listed}]\n'
                                      f'master_name = "{MASTER}"\n'
                                      f"health_interval_s = {INTERVAL}\n", 1)
    config.write_text(text)
    proxy = start_proxy(config, pki, port)
    proxy.metrics_port = metrics  # type: ignore[attr-defined]
    return proxy


def trail(proxy: Proxy) -> list[dict]:
    path = proxy.config.parent / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_proxy_serves_the_primary_sentinel_names(sentinels: Sentinels, pki: PKI,
                                                     tmp_path: Path) -> None:
    proxy = sentinel_proxy(pki, tmp_path, sentinels)
    try:
        client = proxy.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.set("app:phi:first", "1")
                break
            except redis.ResponseError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        _, port = sentinels.primary()
        assert sentinels.node(port).client().get("app:phi:first") == b"1"
        # One-shot tools find the primary the same way.
        scan = subprocess.run([sys.executable, "-m", "proxy", "scan-backend", "-c",
                               str(proxy.config)], capture_output=True, text=True, timeout=60)
        assert f"127.0.0.1:{port}" in scan.stdout, scan.stdout + scan.stderr
    finally:
        assert proxy.stop() == 0


def test_a_failover_is_followed_recorded_and_loses_no_acknowledged_write(
        sentinels: Sentinels, pki: PKI, tmp_path: Path) -> None:
    proxy = sentinel_proxy(pki, tmp_path, sentinels)
    old = sentinels.primary()
    acked: list[tuple[int, float]] = []  # (n, when its +OK arrived)
    stop = threading.Event()

    def writer() -> None:
        client = proxy.client()
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if client.set(f"app:phi:w:{n}", str(n)):
                    acked.append((n, time.monotonic()))
            except (redis.ResponseError, redis.ConnectionError):
                time.sleep(0.01)
                client = proxy.client()

    try:
        deadline = time.monotonic() + 10
        while not proxy.client().ping():
            assert time.monotonic() < deadline
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        time.sleep(1.0)
        began = time.monotonic()
        sentinels.client(sentinels.sentinels[0][0]).execute_command(
            "SENTINEL", "FAILOVER", MASTER)
        deadline = time.monotonic() + 20
        while sentinels.primary() == old:
            assert time.monotonic() < deadline, "sentinel did not fail over"
            time.sleep(0.05)
        promoted = time.monotonic()
        new = sentinels.primary()
        # New commands reach the new primary within health_interval_s + 1 s.
        deadline = promoted + INTERVAL + 1.0
        client = proxy.client()
        switched = None
        while time.monotonic() < deadline + 5:
            try:
                client.set("app:phi:probe", str(time.monotonic()))
                if sentinels.node(new[1]).client().get("app:phi:probe") is not None:
                    switched = time.monotonic()
                    break
            except (redis.ResponseError, redis.ConnectionError):
                client = proxy.client()
            time.sleep(0.02)
        assert switched is not None and switched - promoted <= INTERVAL + 1.0, \
            f"switched {switched and switched - promoted:.2f} s after the promotion"
        time.sleep(1.0)
        stop.set()
        thread.join(10)
    finally:
        stop.set()
        assert proxy.stop() == 0

    primary = sentinels.node(new[1]).client()
    lost_before = [n for n, at in acked if at < began and primary.get(f"app:phi:w:{n}") is None]
    lost_after = [n for n, at in acked if at > switched and
                  primary.get(f"app:phi:w:{n}") is None]
    window = [n for n, at in acked if began <= at <= switched]
    lost_window = [n for n in window if primary.get(f"app:phi:w:{n}") is None]
    print(f"\nfailover: {len(acked)} writes acknowledged; {len(window)} in the window "
          f"({switched - began:.2f} s from SENTINEL FAILOVER to the switch, "
          f"{switched - promoted:.2f} s after the sentinels named the new primary), "
          f"{len(lost_window)} of those lost")
    assert acked and not lost_before and not lost_after
    records = [r for r in trail(proxy) if r["event"] == "failover"]
    assert len(records) == 1
    assert records[0]["old"] == f"{old[0]}:{old[1]}" and records[0]["new"] == f"{new[0]}:{new[1]}"
    here = proxy.config.parent
    verify = subprocess.run([sys.executable, "-m", "proxy", "audit", "verify", "--key-file",
                             str(here / "audit.key"), str(here / "audit.jsonl")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
