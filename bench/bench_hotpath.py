"""The request hot path on one core: framing, decision, audit record, beside hiredis.Reader.

    python bench/bench_hotpath.py [--batches 2000] [--repeat 5] [--json FILE]

Input: realistic pipelines as redis-benchmark sends them (`-P 16 -d 64 -r 100000`): batches
of 16 GETs, 16 SETs with 64-byte values, and a mix, every key random in a 100,000-key space.
The configuration is the one `peers_phiproxy.sh` benchmarks with: a role with three key
patterns (`~key:* ~counter:* ~my*`), every benchmark key PHI, so every command gets an
audit record. Each stage adds one step to the one before and is timed over every batch,
best of `--repeat` runs; commands/s and ns per command are printed per stage:

  hiredis.Reader       hiredis's C parser on the same bytes (builds every argument)
  framer               phiproxy's RequestFramer (argv lists, limits checked)
  + decide             command table lookup, key extraction, role check (`decide`)
  + audit record       PHI key match and the record body (`ConnectionRecords.command`)
  + chain              the HMAC-SHA256 chain over each record (`Chain.seal`): a complete,
                       verifiable audit line per command
  session, request     the production path with a null backend connection: the real
                       `Session.data_received`, then the audit gate's end-of-iteration
                       step (`AuditGate.flush`: decide, the audit file write and head
                       update in a real file in a temp dir, release) and the shared
                       backend connection's write (`Router.flush`). One read per
                       iteration here; under load the proxy shares one write-ahead and
                       one backend write among every client read of an iteration
  session, round trip  request plus the backend's replies handed back to the client by
                       the shared connection (`BackendConnection.data_received`: the reply
                       framer, per-client demultiplexing, per-reply metrics)

The stages are the same functions the proxy runs (nothing re-implemented here), so a
change to the hot path shows up in these numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hiredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_config import KEYSPACE, config_text  # noqa: E402

from proxy.audit.chain import Chain  # noqa: E402
from proxy.backend.connection import BackendConnection  # noqa: E402
from proxy.certs import write_dev_pki  # noqa: E402
from proxy.identity import Identity  # noqa: E402
from proxy.resp.request import RequestFramer, encode_command  # noqa: E402
from proxy.server import ServerState  # noqa: E402
from proxy.session import Session  # noqa: E402
from proxy.startup import load_everything  # noqa: E402

PIPELINE = 16
VALUE = b"x" * 64


def key(rng: random.Random) -> bytes:
    return b"key:%012d" % rng.randrange(KEYSPACE)


def batches(kind: str, count: int, pipeline: int = PIPELINE,
            seed: int = 7) -> list[tuple[bytes, bytes]]:
    """(request bytes, the backend's reply bytes) per pipeline of `pipeline` commands."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        request, reply = [], []
        for i in range(pipeline):
            i += n  # the mix alternates across reads too when pipeline is 1
            if kind == "get" or (kind == "mixed" and i % 2):
                request.append(encode_command([b"GET", key(rng)]))
                reply.append(b"$64\r\n" + VALUE + b"\r\n")
            else:
                request.append(encode_command([b"SET", key(rng), VALUE]))
                reply.append(b"+OK\r\n")
        out.append((b"".join(request), b"".join(reply)))
    return out


class NullTransport:
    """Where the session's (or the backend connection's) writes go: counted, dropped."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


def make_config(work: Path) -> Path:
    pki = work / "pki"
    write_dev_pki(pki, ["bench-client"])
    key_file = work / "audit.key"
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(0o600)
    config = work / "phiproxy.toml"
    config.write_text(config_text(
        port=6380, cert=f"{pki}/proxy.pem", key=f"{pki}/proxy-key.pem",
        client_ca=f"{pki}/clients-ca.pem", backend_port=6379, backend_ca=f"{pki}/backend-ca.pem",
        backend_cert=f"{pki}/proxy-client.pem", backend_key=f"{pki}/proxy-client-key.pem",
        audit_path=f"{work}/audit.jsonl", audit_key=str(key_file), subject_cn="bench-client"))
    return config


class Bench:
    def __init__(self, work: Path) -> None:
        config, decide, roles = load_everything(make_config(work))
        self.state = ServerState(config, decide, roles)
        self.state.audit.open()
        self.decide = decide
        self.role = roles["bench"]
        self.is_phi = self.state.is_phi_key
        now = datetime.now(UTC)
        self.identity = Identity(
            subject="CN=bench-client", cn="bench-client", ous=(), san_dns=(), san_uris=(),
            san_emails=(), fingerprint="ab" * 32, serial=1, not_after=now + timedelta(days=1),
            not_before=now - timedelta(days=1))
        self.records = self.state.audit.records.connection(1, "127.0.0.1:50000", self.identity,
                                                           "bench")

    def session(self) -> tuple[Session, NullTransport, BackendConnection]:
        """A client session on the router's first shared connection, whose transport is
        a null one (the production classes otherwise)."""
        counts = self.state.metrics.command_counter("bench", "subject_cn=bench-client")
        conn = BackendConnection("bench")
        conn.connection_made(NullTransport())  # type: ignore[arg-type]
        for pipeline in self.state.router.link.pipelines:
            pipeline._attach(conn)  # whichever the router hands the session
        self.state.session_context.deferred = True  # as in `serve`: batched per iteration
        session = Session(self.state.session_context, 1, self.records, "127.0.0.1:50000",
                          self.identity, "bench", self.role, self.decide, counts)
        client = NullTransport()
        session.connection_made(client)  # type: ignore[arg-type]
        return session, client, conn

    # --- stages: each returns the number of commands it handled
    def hiredis(self, data: list[tuple[bytes, bytes]]) -> int:
        reader, n = hiredis.Reader(), 0
        for request, _ in data:
            reader.feed(request)
            while reader.gets() is not False:
                n += 1
        return n

    def framer(self, data: list[tuple[bytes, bytes]]) -> int:
        framer, n = RequestFramer(), 0
        for request, _ in data:
            n += len(framer.feed(request))
        return n

    def decide_stage(self, data: list[tuple[bytes, bytes]]) -> int:
        framer, decide, role, n = RequestFramer(), self.decide, self.role, 0
        for request, _ in data:
            for argv in framer.feed(request):
                if decide(role, argv).allowed:
                    n += 1
        return n

    def _records(self, data: list[tuple[bytes, bytes]],
                 seal: Callable[[list[bytes]], Any] | None) -> int:
        framer, decide, role, is_phi = RequestFramer(), self.decide, self.role, self.is_phi
        command = self.records.command
        n = 0
        for request, _ in data:
            bodies = []
            for argv in framer.feed(request):
                decision = decide(role, argv)
                keys = decision.keys  # the session's test, in the same form
                if decision.allowed and keys and (is_phi(keys[0]) if len(keys) == 1
                                                  else any(map(is_phi, keys))):
                    bodies.append(command(decision.command, keys, 0))
            if seal is not None:
                seal(bodies)
            n += len(bodies)
        return n

    def record_stage(self, data: list[tuple[bytes, bytes]]) -> int:
        return self._records(data, None)

    def chain_stage(self, data: list[tuple[bytes, bytes]]) -> int:
        chain = Chain(os.urandom(32))
        stamp = b"2026-11-29T12:00:00.000000Z"

        def seal(bodies: list[bytes]) -> None:
            _, seq, mac = chain.seal(stamp, bodies)
            chain.advance(seq, mac)

        return self._records(data, seal)

    def session_request(self, data: list[tuple[bytes, bytes]]) -> int:
        session, _, conn = self.session()
        before = session.commands
        end_of_iteration = self.state.gate.flush
        for request, _ in data:
            session.data_received(request)
            end_of_iteration()
            conn.fifo.clear()  # no replies in this stage
            session.queue.entries.clear()
            session.queue.in_flight = 0
        return session.commands - before

    def session_round_trip(self, data: list[tuple[bytes, bytes]]) -> int:
        session, client, conn = self.session()
        before = session.commands
        end_of_iteration = self.state.gate.flush
        for request, reply in data:
            session.data_received(request)
            end_of_iteration()
            conn.data_received(reply)
        assert not session.queue.entries and client.written > 0
        return session.commands - before


def best_of(fn: Callable[[], int], repeat: int) -> tuple[float, int]:
    best, count = float("inf"), 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        count = fn()
        best = min(best, time.perf_counter() - t0)
    return best, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2000, help="pipelines per workload")
    parser.add_argument("--pipeline", type=int, default=PIPELINE,
                        help="commands per read (16: redis-benchmark -P 16; 1: no pipelining)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    asyncio.run(run(args))


async def run(args: argparse.Namespace) -> None:
    """Inside a running loop (sessions schedule timers), but nothing awaits: each stage
    runs its end-of-iteration step itself."""
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="phiproxy-hotpath-") as tmp:
        bench = Bench(Path(tmp))
        stages: list[tuple[str, Callable[[list[tuple[bytes, bytes]]], int]]] = [
            ("hiredis.Reader", bench.hiredis),
            ("framer", bench.framer),
            ("+ decide", bench.decide_stage),
            ("+ audit record", bench.record_stage),
            ("+ chain (HMAC)", bench.chain_stage),
            ("session, request", bench.session_request),
            ("session, round trip", bench.session_round_trip),
        ]
        print(f"pipelines of {args.pipeline}, {args.batches} per workload, keys random in "
              f"{KEYSPACE:,}, every key PHI; best of {args.repeat}")
        print(f"{'stage':<22}" + "".join(f"{w + ' cmds/s':>16}{'ns/cmd':>8}"
                                        for w in ("GET", "SET", "mixed")))
        data = {kind: batches(kind, args.batches, args.pipeline)
                for kind in ("get", "set", "mixed")}
        for label, stage in stages:
            row = f"{label:<22}"
            results[label] = {}
            for kind in ("get", "set", "mixed"):
                seconds, count = best_of(lambda s=stage, d=data[kind]: s(d), args.repeat)
                expected = args.pipeline * args.batches
                if count != expected:
                    raise SystemExit(f"{label} {kind}: handled {count} of {expected} commands")
                rate = count / seconds
                results[label][kind] = rate
                row += f"{rate:>16,.0f}{1e9 / rate:>8,.0f}"
            print(row)
        bench.state.audit.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
