#!/usr/bin/env python3
"""Soak: many mTLS clients with mixed commands for a long time; the proxy's RSS and open
files sampled throughout; at the end, audit `command` records against what Redis ran.

Starts its own TLS-only redis-server and one phiproxy (temp dir, dev PKI from
`phiproxy certs dev`, free ports, 127.0.0.1), then runs `--clients` clients (default 1000)
for `--seconds` (default 600). Each client is paced (a random pause of `--pause` seconds on
average between operations, so the load is steady, not a saturation test) and picks:

  SET / GET of its own keys (a GET must return what it last wrote: a desync shows),
  MSET of three keys, LPUSH + LTRIM and LRANGE, MULTI INCR EXEC (the counter must go up
  by one), BLPOP with a 0.1 s timeout (on an empty list: it times out; after an RPUSH:
  it pops), PUBLISH to a channel that one of `--subscribers` subscribed clients listens on.

About 1 in 500 operations a client closes its connection and opens a new one (churn).
Every key is PHI (phi_keys = ["soak:*"]), so every keyed command is audited write-ahead.

Every `--sample` seconds: proxy RSS (VmRSS), its open files (/proc/PID/fd), operations
done, errors. At the end: redis INFO commandstats against the audit `command` records per
command name (after the proxy stopped, so the trail is complete), `phiproxy audit verify`
on the trail, every last-written value read back from Redis, and PUBLISH receivers against
messages the subscribers got. Prints a summary and writes samples + summary as JSON
(`--json`).

Usage (venv: source scripts/bootstrap.sh):
  python bench/soak.py                          # 1000 clients, 10 minutes
  python bench/soak.py --clients 200 --seconds 60 --json /tmp/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import hiredis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import stop_all  # noqa: E402

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
# Commands whose audit records must equal their commandstats calls (every one names a
# soak:* key). PUBLISH/SUBSCRIBE name channels, not keys: no record, not compared.
KEYED = ("set", "get", "mset", "lpush", "ltrim", "lrange", "incr", "blpop", "rpush", "del")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, seconds: float = 30) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection((HOST, port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port} after {seconds}s")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 1)


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def encode(args: tuple[Any, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class Conn:
    """A minimal RESP2 client over asyncio streams, replies parsed by hiredis."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.r, self.w = reader, writer
        self.parser = hiredis.Reader()

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext) -> Conn:
        r, w = await asyncio.wait_for(
            asyncio.open_connection(HOST, port, ssl=ctx, server_hostname="localhost"), 30)
        return cls(r, w)

    async def reply(self, timeout: float = 30) -> Any:
        while (got := self.parser.gets()) is False:
            data = await asyncio.wait_for(self.r.read(65536), timeout)
            if not data:
                raise ConnectionError("closed by the proxy")
            self.parser.feed(data)
        if isinstance(got, hiredis.ReplyError):
            raise got
        return got

    async def call(self, *args: Any) -> Any:
        self.w.write(encode(args))
        return await self.reply()

    async def pipeline(self, *commands: tuple[Any, ...]) -> list[Any]:
        self.w.write(b"".join(encode(c) for c in commands))
        return [await self.reply() for _ in commands]

    def close(self) -> None:
        self.w.close()


class Soak:
    def __init__(self, port: int, ctx: ssl.SSLContext, args: argparse.Namespace):
        self.port, self.ctx, self.a = port, ctx, args
        self.stop = asyncio.Event()
        self.stop_subscribers = asyncio.Event()  # after every PUBLISH got its reply
        self.ops = Counter[str]()
        self.errors = Counter[str]()
        self.failed = Counter[str]()  # operation -> errors (what it was doing)
        self.wrong = Counter[str]()  # a reply that is not what this client wrote
        self.last: dict[str, bytes] = {}  # key -> value last acknowledged
        self.published = 0  # receivers PUBLISH reported
        self.received = 0  # messages subscribers got
        self.reconnects = 0
        self.settled_rss_kib = 0  # proxy RSS `--settle` seconds after every client closed

    async def client(self, n: int) -> None:
        rnd = random.Random(n)
        await asyncio.sleep(rnd.random() * 5)  # spread the handshakes over 5 s
        conn: Conn | None = None
        counter = 0
        state = ["connect"]  # the operation under way, for the error tally
        while not self.stop.is_set():
            try:
                if conn is None:
                    state[0] = "connect"
                    conn = await Conn.open(self.port, self.ctx)
                    # after an error the queue may hold a job its BLPOP never took
                    _, got = await conn.pipeline(("DEL", f"soak:{n}:q"),
                                                 ("GET", f"soak:{n}:ctr"))
                    counter = int(got or 0)
                counter = await self.operation(conn, n, rnd, counter, state)
                if rnd.random() < 0.002:
                    conn.close()
                    conn, self.reconnects = None, self.reconnects + 1
            except (TimeoutError, OSError, ConnectionError, hiredis.HiredisError) as e:
                self.errors[f"{type(e).__name__}: {str(e)[:80]}"] += 1
                self.failed[state[0]] += 1
                if conn is not None:
                    conn.close()
                conn = None
                await asyncio.sleep(1)
            await asyncio.sleep(rnd.expovariate(1 / self.a.pause))
        if conn is not None:
            conn.close()

    async def operation(self, conn: Conn, n: int, rnd: random.Random, counter: int,
                        state: list[str]) -> int:
        pick = rnd.random()
        state[0] = ("set" if pick < 0.30 else "get" if pick < 0.55 else "mset" if pick < 0.62
                    else "lpush" if pick < 0.70 else "lrange" if pick < 0.78
                    else "multi" if pick < 0.86 else "blpop" if pick < 0.93 else "publish")
        key = f"soak:{n}:{rnd.randrange(20)}"
        if pick < 0.30:
            value = os.urandom(8).hex().encode()
            if await conn.call("SET", key, value) == b"OK":
                self.last[key] = value
            self.ops["set"] += 1
        elif pick < 0.55:
            got = await conn.call("GET", key)
            if got != self.last.get(key):
                self.wrong["get"] += 1
            self.ops["get"] += 1
        elif pick < 0.62:
            keys = [f"soak:{n}:m{i}" for i in range(3)]
            values = [os.urandom(4).hex().encode() for _ in keys]
            if await conn.call("MSET", *[x for kv in zip(keys, values, strict=True) for x in kv]) \
                    == b"OK":
                self.last.update(zip(keys, values, strict=True))
            self.ops["mset"] += 1
        elif pick < 0.70:
            await conn.pipeline(("LPUSH", f"soak:{n}:list", os.urandom(4).hex()),
                                ("LTRIM", f"soak:{n}:list", 0, 49))
            self.ops["lpush"] += 1
        elif pick < 0.78:
            await conn.call("LRANGE", f"soak:{n}:list", 0, 9)
            self.ops["lrange"] += 1
        elif pick < 0.86:
            replies = await conn.pipeline(("MULTI",), ("INCR", f"soak:{n}:ctr"), ("EXEC",))
            if replies[2] != [counter + 1]:
                self.wrong["incr"] += 1
            counter += 1
            self.last[f"soak:{n}:ctr"] = str(counter).encode()
            self.ops["multi"] += 1
        elif pick < 0.93:
            queue = f"soak:{n}:q"
            if rnd.random() < 0.5:
                await conn.call("RPUSH", queue, "job")
                if await conn.call("BLPOP", queue, "0.1") != [queue.encode(), b"job"]:
                    self.wrong["blpop"] += 1
            elif await conn.call("BLPOP", queue, "0.1") is not None:
                self.wrong["blpop"] += 1
            self.ops["blpop"] += 1
        else:
            channel = f"soakchan:{rnd.randrange(self.a.subscribers)}"
            receivers = await conn.call("PUBLISH", channel, "hello")
            self.published += receivers  # (not `+= await`: that reads the total before)
            self.ops["publish"] += 1
        return counter

    async def subscriber(self, k: int) -> None:
        conn = await Conn.open(self.port, self.ctx)
        await conn.call("SUBSCRIBE", f"soakchan:{k}")
        unsubscribed = False
        while True:
            try:
                message = await conn.reply(timeout=1)
            except TimeoutError:
                message = [b""]
            if message[0] == b"message":
                self.received += 1
            elif message[0] == b"unsubscribe":
                break
            if self.stop_subscribers.is_set() and not unsubscribed:
                conn.w.write(encode(("UNSUBSCRIBE",)))
                unsubscribed = True
        conn.close()


def commandstats(port: int, pki: Path) -> dict[str, int]:
    out = subprocess.run(
        ["redis-cli", "--tls", "--cacert", pki / "backend-ca.pem", "--cert",
         pki / "proxy-client.pem", "--key", pki / "proxy-client-key.pem", "-h", HOST, "-p",
         str(port), "INFO", "commandstats"], capture_output=True, text=True, timeout=30,
        check=True)
    stats = {}
    for line in out.stdout.splitlines():
        if line.startswith("cmdstat_"):
            name, rest = line.split(":", 1)
            stats[name.removeprefix("cmdstat_")] = int(rest.split("calls=")[1].split(",")[0])
    return stats


def backend_clients(port: int, pki: Path) -> int:
    """Redis's connected_clients (the proxy's connections, and this redis-cli's)."""
    out = subprocess.run(
        ["redis-cli", "--tls", "--cacert", pki / "backend-ca.pem", "--cert",
         pki / "proxy-client.pem", "--key", pki / "proxy-client-key.pem", "-h", HOST, "-p",
         str(port), "INFO", "clients"], capture_output=True, text=True, timeout=30)
    for line in out.stdout.splitlines():
        if line.startswith("connected_clients:"):
            return int(line.split(":")[1]) - 1
    return -1


def read_back(port: int, pki: Path, last: dict[str, bytes]) -> int:
    """Keys whose value in Redis is not the last one acknowledged."""
    lost = 0
    keys = list(last)
    for at in range(0, len(keys), 500):
        chunk = keys[at:at + 500]
        out = subprocess.run(
            ["redis-cli", "--tls", "--cacert", pki / "backend-ca.pem", "--cert",
             pki / "proxy-client.pem", "--key", pki / "proxy-client-key.pem", "-h", HOST,
             "-p", str(port), "MGET", *chunk], capture_output=True, timeout=30, check=True)
        values = out.stdout.split(b"\n")[:len(chunk)]
        lost += sum(1 for k, v in zip(chunk, values, strict=True) if v != last[k])
    return lost


async def run(port: int, ctx: ssl.SSLContext, proxy_pid: int, a: argparse.Namespace,
              samples: list[dict[str, Any]], backend: tuple[int, Path]) -> Soak:
    soak = Soak(port, ctx, a)
    subs = [asyncio.create_task(soak.subscriber(k)) for k in range(a.subscribers)]
    await asyncio.sleep(1)
    tasks = [asyncio.create_task(soak.client(n)) for n in range(a.clients)]
    t0 = time.monotonic()
    while (elapsed := time.monotonic() - t0) < a.seconds:
        samples.append({"t": round(elapsed, 1), "rss_kib": rss_kib(proxy_pid),
                        "fds": open_files(proxy_pid), "ops": sum(soak.ops.values()),
                        "errors": sum(soak.errors.values()),
                        "backend_conns": await asyncio.to_thread(backend_clients, *backend)})
        s = samples[-1]
        print(f"t={s['t']:6.0f}s rss={s['rss_kib']} KiB fds={s['fds']} ops={s['ops']} "
              f"errors={s['errors']} backend_conns={s['backend_conns']}", flush=True)
        await asyncio.sleep(min(a.sample, max(a.seconds - elapsed, 0.01)))
    soak.stop.set()
    await asyncio.gather(*tasks)
    soak.stop_subscribers.set()
    await asyncio.gather(*subs)
    samples.append({"t": round(time.monotonic() - t0, 1), "rss_kib": rss_kib(proxy_pid),
                    "fds": open_files(proxy_pid), "ops": sum(soak.ops.values()),
                    "errors": sum(soak.errors.values())})
    # 10 s later: memory the proxy gives back once idle (proxy/heap.py's trim) is gone;
    # what is left is held (live objects, or fragmentation the trim cannot return)
    await asyncio.sleep(a.settle)
    soak.settled_rss_kib = rss_kib(proxy_pid)
    return soak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--subscribers", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--pause", type=float, default=0.5, help="mean pause between ops (s)")
    ap.add_argument("--sample", type=float, default=5)
    ap.add_argument("--settle", type=float, default=10,
                    help="seconds after the clients closed for the last RSS reading")
    ap.add_argument("--json", help="write samples and the summary here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    a = ap.parse_args()
    need = 2 * (a.clients + a.subscribers) + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))

    work = Path(tempfile.mkdtemp(prefix="phiproxy-soak."))
    procs: list[subprocess.Popen] = []
    try:
        subprocess.run([BIN / "phiproxy", "certs", "dev", "--out", work / "pki",
                        "--client", "soak"], check=True, stdout=subprocess.DEVNULL)
        pki = work / "pki"
        backend, proxy_port = free_port(), free_port()
        redis = subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(backend), "--bind", HOST,
             "--save", "", "--appendonly", "no", "--maxclients", "10000",
             "--tls-cert-file", pki / "backend.pem", "--tls-key-file", pki / "backend-key.pem",
             "--tls-ca-cert-file", pki / "backend-ca.pem", "--tls-auth-clients", "yes",
             "--dir", work, "--logfile", work / "redis.log"])
        procs.append(redis)
        wait_port(backend, redis)
        key = work / "audit.key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        (work / "phiproxy.toml").write_text(f"""\
[listener]
address = "{HOST}"
port = {proxy_port}
cert = "pki/proxy.pem"
key = "pki/proxy-key.pem"
client_ca = "pki/clients-ca.pem"
max_connections = {a.clients + a.subscribers + 100}
[backend]
address = "{HOST}"
port = {backend}
ca = "pki/backend-ca.pem"
server_name = "localhost"
cert = "pki/proxy-client.pem"
key = "pki/proxy-client-key.pem"
[audit]
path = "audit.jsonl"
key_file = "audit.key"
phi_keys = ["soak:*"]
[metrics]
port = 0
[roles.soak]
acl = "+@all -@dangerous ~soak:* &soakchan:*"
[[identities]]
subject_cn = "soak"
role = "soak"
""")
        with open(work / "phiproxy.log", "wb") as log:
            proxy = subprocess.Popen([BIN / "phiproxy", "run", "-c", work / "phiproxy.toml"],
                                     stdout=subprocess.DEVNULL, stderr=log)
        procs.append(proxy)
        wait_port(proxy_port, proxy)
        ctx = ssl.create_default_context(cafile=str(pki / "clients-ca.pem"))
        ctx.check_hostname = False  # loopback: the proxy checks the client (mTLS)
        ctx.verify_mode = ssl.CERT_NONE
        ctx.load_cert_chain(pki / "client-soak.pem", pki / "client-soak-key.pem")

        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        samples: list[dict[str, Any]] = []
        soak = asyncio.run(run(proxy_port, ctx, proxy.pid, a, samples, (backend, pki)))
        ran = commandstats(backend, pki)
        lost = read_back(backend, pki, soak.last)
        cpu_s = cpu_seconds(proxy.pid)
        proxy.send_signal(signal.SIGTERM)
        exit_code = proxy.wait(60)
        records: Counter[str] = Counter()
        with open(work / "audit.jsonl", "rb") as trail:
            for line in trail:
                r = json.loads(line)
                if r["event"] == "command":
                    records[r["command"]] += 1
        verified = subprocess.run([BIN / "phiproxy", "audit", "verify", work / "audit.jsonl",
                                   "--key-file", key], capture_output=True, text=True)
        compare = {c: (records[c], ran.get(c, 0)) for c in KEYED}
        # the proxy's own warnings and errors, by message (addresses and numbers blanked)
        warnings: Counter[str] = Counter()
        for line in (work / "phiproxy.log").read_text(errors="replace").splitlines():
            parts = line.split(" ", 4)
            if len(parts) == 5 and parts[3] in ("WARNING", "ERROR", "CRITICAL"):
                warnings[re.sub(r"\d+", "N", parts[4])[:160]] += 1
        # under load: from the end of the ramp (every client connected, caches warm: a
        # tenth of the run, 10..60 s) to the end; "before" the clients, "after" they closed
        ramp = max(10.0, min(60.0, a.seconds / 10))
        loaded = [s for s in samples[:-1] if s["t"] >= ramp] or samples
        rss = [s["rss_kib"] for s in loaded]
        fds = [s["fds"] for s in loaded]
        summary = {
            "started": started, "clients": a.clients, "subscribers": a.subscribers,
            "seconds": a.seconds, "ops": dict(soak.ops), "ops_total": sum(soak.ops.values()),
            "errors": dict(soak.errors), "failed_operations": dict(soak.failed),
            "wrong_replies": dict(soak.wrong),
            "reconnects": soak.reconnects,
            "rss_kib": {"before": samples[0]["rss_kib"], "first": rss[0], "last": rss[-1],
                        "max": max(rss), "min": min(rss), "after": samples[-1]["rss_kib"],
                        "settled": soak.settled_rss_kib},
            "fds": {"before": samples[0]["fds"], "first": fds[0], "last": fds[-1],
                    "max": max(fds), "min": min(fds), "after": samples[-1]["fds"]},
            "records_vs_calls": compare,
            "records_equal_calls": all(x == y for x, y in compare.values()),
            "proxy_warnings": dict(warnings.most_common(10)),
            "acked_values_lost": lost, "published_receivers": soak.published,
            "messages_received": soak.received, "proxy_exit": exit_code,
            "proxy_cpu_s": cpu_s,
            "audit_verify": (verified.stdout + verified.stderr).strip(),
            "audit_verify_ok": verified.returncode == 0,
        }
        print(json.dumps(summary, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps({"summary": summary, "samples": samples},
                                               indent=1))
        ok = (summary["records_equal_calls"] and not lost and summary["audit_verify_ok"]
              and not soak.wrong and soak.published == soak.received)
        return 0 if ok else 1
    finally:
        stop_all(procs)
        if a.keep:
            print(f"temp dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
