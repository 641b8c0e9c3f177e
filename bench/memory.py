#!/usr/bin/env python3
"""Memory per idle connection, after a connection storm, and under a non-reading pipelining
client.

Starts its own TLS-only redis-server and one phiproxy (temp dir, dev PKI from
`phiproxy certs dev`, free ports, everything on 127.0.0.1), then:

1. idle connections: opens N mutual-TLS client connections to the proxy (default 1000), each
   sends one PING and reads +PONG, then stays idle. The proxy's RSS (VmRSS from
   /proc/PID/status) before and after gives KiB per connection. Goal <= 48 KiB (issue 10).
   The backend connections are counted with CLIENT LIST on the backend while the clients are
   open: stateless clients share `shared_connections` (2), so goal <= shared + pool.
   Then all are closed: the proxy's RSS 10 s later, against before (goal <= 1.5x, issue 11).
2. slow reader: one client sends GET of a 1 MiB value in a loop for ~10 s and never reads the
   replies; the proxy's RSS is sampled every 0.5 s and must stay bounded (not grow ~1 MiB per
   GET sent). The client itself stops writing while its own send buffer holds > 4 MiB, so it
   keeps writing only as fast as the proxy reads.

Usage (from the repo, with the venv: source scripts/bootstrap.sh):
  python bench/memory.py                      # 1000 connections
  python bench/memory.py --connections 5000   # raises RLIMIT_NOFILE in-process as needed
  python bench/memory.py --slow-seconds 20 --keep   # keep the temp dir (configs, logs)
Every process it starts is stopped at the end; each phase has a time bound.
"""
import argparse
import asyncio
import os
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_config import config_text  # noqa: E402
from procs import stop_all  # noqa: E402

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def wait_port(port, proc, seconds=30):
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


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft


def client_ctx(pki):
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False   # loopback benchmark: only the proxy checks certificates (mTLS)
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(pki / "client-bench.pem", pki / "client-bench-key.pem")
    return ctx


async def open_idle(port, ctx, n, concurrency, timeout):
    conns, errors = [], []
    sem = asyncio.Semaphore(concurrency)

    async def one():
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(HOST, port, ssl=ctx), timeout)
                w.write(b"*1\r\n$4\r\nPING\r\n")
                line = await asyncio.wait_for(r.readline(), timeout)
                if line != b"+PONG\r\n":
                    errors.append(line[:80])
                conns.append((r, w))
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(repr(e)[:120])

    await asyncio.gather(*(one() for _ in range(n)))
    return conns, errors


async def close_all(conns):
    for _, w in conns:
        w.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)


async def set_big(port, ctx, key, size):
    r, w = await asyncio.open_connection(HOST, port, ssl=ctx)
    kb, val = key.encode(), b"v" * size
    w.write(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(kb), kb, len(val), val))
    line = await asyncio.wait_for(r.readline(), 10)
    w.close()
    await w.wait_closed()
    if line != b"+OK\r\n":
        raise RuntimeError(f"SET {key} through the proxy answered {line!r}")


async def slow_reader(port, ctx, key, seconds, pid, interval=0.5, client_cap=4 << 20):
    """Send GET key forever-ish, never read; sample the proxy's RSS. Returns samples and counts."""
    kb = key.encode()
    cmd = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(kb), kb)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # small client receive buffer
    sock.connect((HOST, port))
    r, w = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="")
    samples, sent, t0 = [], 0, time.monotonic()
    next_sample = t0
    batch = cmd * 64
    while (now := time.monotonic()) - t0 < seconds:
        if now >= next_sample:
            samples.append((round(now - t0, 1), rss_kib(pid), sent))
            next_sample += interval
        if w.transport.is_closing():
            break
        if w.transport.get_write_buffer_size() < client_cap:
            w.write(batch)
            sent += 64
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(0.05)
    samples.append((round(time.monotonic() - t0, 1), rss_kib(pid), sent))
    unsent = w.transport.get_write_buffer_size() // len(cmd)
    w.transport.abort()
    return samples, sent, unsent


def backend_clients(port, pki):
    """Connections the backend has, less redis-cli's own (-1 if it cannot be asked)."""
    out = subprocess.run(
        ["redis-cli", "--tls", "--cacert", pki / "backend-ca.pem", "--cert",
         pki / "proxy-client.pem", "--key", pki / "proxy-client-key.pem", "-h", HOST, "-p",
         str(port), "CLIENT", "LIST"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return -1
    return sum(1 for line in out.stdout.splitlines() if line.startswith("id=")) - 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=50, help="handshakes in flight")
    ap.add_argument("--slow-seconds", type=float, default=10.0)
    ap.add_argument("--value-mib", type=float, default=1.0)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    a = ap.parse_args()
    n = a.connections
    # our side holds n sockets, the proxy n (+ a few backend): children inherit
    nofile = raise_nofile(2 * n + 256)
    if nofile < 2 * n + 64:
        sys.exit(f"RLIMIT_NOFILE is {nofile}, too low for {n} connections")

    work = Path(tempfile.mkdtemp(prefix="phiproxy-mem."))
    procs = []
    try:
        subprocess.run([BIN / "phiproxy", "certs", "dev", "--out", work / "pki",
                        "--client", "bench"], check=True, stdout=subprocess.DEVNULL)
        pki = work / "pki"
        backend, proxy_port = free_port(), free_port()
        redis = subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(backend), "--bind", HOST,
             "--save", "", "--appendonly", "no", "--maxclients", str(n + 100),
             "--tls-cert-file", pki / "backend.pem", "--tls-key-file", pki / "backend-key.pem",
             "--tls-ca-cert-file", pki / "backend-ca.pem", "--tls-auth-clients", "yes",
             "--dir", work, "--logfile", work / "redis.log"])
        procs.append(redis)
        wait_port(backend, redis)
        key = work / "audit.key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        (work / "phiproxy.toml").write_text(config_text(
            port=proxy_port, cert="pki/proxy.pem", key="pki/proxy-key.pem",
            client_ca="pki/clients-ca.pem", backend_port=backend,
            backend_ca="pki/backend-ca.pem", backend_cert="pki/proxy-client.pem",
            backend_key="pki/proxy-client-key.pem", audit_path="audit.jsonl",
            audit_key="audit.key", subject_cn="bench", max_connections=n + 100, address=HOST))
        with open(work / "phiproxy.log", "wb") as log:  # the child keeps its own descriptor
            proxy = subprocess.Popen([BIN / "phiproxy", "run", "-c", work / "phiproxy.toml"],
                                     stdout=subprocess.DEVNULL, stderr=log)
        procs.append(proxy)
        wait_port(proxy_port, proxy)
        ctx = client_ctx(pki)

        async def scenario():
            # warm-up: a few connections, so one-off allocations are in "before"
            warm, _ = await open_idle(proxy_port, ctx, 20, 20, 10)
            await close_all(warm)
            await asyncio.sleep(1.0)
            before, redis_before = rss_kib(proxy.pid), rss_kib(redis.pid)
            t0 = time.monotonic()
            conns, errors = await open_idle(proxy_port, ctx, n, a.concurrency, 30)
            took = time.monotonic() - t0
            await asyncio.sleep(2.0)
            after, redis_after = rss_kib(proxy.pid), rss_kib(redis.pid)
            ok = len(conns)  # connections that completed the handshake and the PING
            print(f"idle connections: {len(conns)}/{n} open ({len(errors)} errors) in {took:.1f} s")
            for e in errors[:5]:
                print(f"  error: {e}")
            print(f"  proxy RSS before {before} KiB, after {after} KiB: "
                  f"+{after - before} KiB = {(after - before) / max(ok, 1):.1f} KiB per connection "
                  f"(goal <= 48) -> "
                  f"{'MET' if (after - before) / max(ok, 1) <= 48 else 'MISSED'}")
            clients = backend_clients(backend, pki)
            print(f"  backend connections while they are open (CLIENT LIST, without its own): "
                  f"{clients}; goal <= shared_connections + pool_size = {2 + 8} -> "
                  f"{'MET' if 0 <= clients <= 10 else 'MISSED'}")
            per_redis = (redis_after - redis_before) / max(ok, 1)
            print(f"  redis RSS before {redis_before} KiB, after {redis_after} KiB "
                  f"(+{per_redis:.1f} KiB per connection; not the proxy's)")
            await close_all(conns)
            await asyncio.sleep(10.0)
            settled = rss_kib(proxy.pid)
            print(f"  proxy RSS 10 s after closing them all: {settled} KiB = "
                  f"{settled / before:.2f}x before (goal <= 1.5) -> "
                  f"{'MET' if settled <= 1.5 * before else 'MISSED'}")

            size = int(a.value_mib * (1 << 20))
            await set_big(proxy_port, ctx, "key:memory-big", size)
            base = rss_kib(proxy.pid)
            samples, sent, unsent = await slow_reader(proxy_port, ctx, "key:memory-big",
                                                      a.slow_seconds, proxy.pid)
            await asyncio.sleep(1.0)
            end = rss_kib(proxy.pid)
            peak = max(s[1] for s in samples)
            accepted = sent - unsent
            print(f"slow reader: GET of a {size >> 10} KiB value, never read, "
                  f"{a.slow_seconds:.0f} s: "
                  f"{sent} GETs written by the client, ~{unsent} still in its own user-space send "
                  f"buffer, ~{accepted} passed on to the kernel socket buffers and the proxy "
                  f"(each one a {size >> 10} KiB reply if the proxy kept executing them)")
            print(f"  proxy RSS before {base} KiB, peak {peak} KiB (+{peak - base} KiB), "
                  f"1 s after the client went away {end} KiB")
            print("  samples (s, RSS KiB, GETs sent): " +
                  " ".join(f"{t}:{r}:{s}" for t, r, s in samples))
            alive = proxy.poll() is None
            print(f"  proxy still running: {alive}")

        asyncio.run(scenario())
    finally:
        stop_all(procs)
        if a.keep:
            print(f"temp dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
