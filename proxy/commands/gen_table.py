"""Generate `table.json` from a real Redis 7: `COMMAND` and `COMMAND DOCS`.

    python -m proxy.commands.gen_table              # starts its own redis-server
    python -m proxy.commands.gen_table --port 6379  # or asks a running one
    python -m proxy.commands.gen_table --check      # fail if table.json is out of date

The output is sorted, one command per line, so a Redis upgrade shows up as a readable diff.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from proxy.commands.table import TABLE_PATH, CommandTable, table_from_command_reply


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def _own_redis(binary: str) -> Iterator[int]:
    """A throwaway redis-server on a free loopback port, in a temporary directory."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="phiproxy-gen-") as workdir:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", workdir, "--logfile", str(Path(workdir) / "log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"error: {binary} did not start on port {port}") from None
                    time.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            proc.wait(5)


def fetch_table(host: str, port: int) -> CommandTable:
    import redis  # test/dev dependency only: the proxy itself never needs it

    client = redis.Redis(host=host, port=port, protocol=3)
    conn = client.connection_pool.get_connection()
    try:
        def raw(*args: str):  # bypass redis-py's reply callbacks: we want the raw structure
            conn.send_command(*args)
            return conn.read_response()

        version = client.info("server")["redis_version"]
        commands = raw("COMMAND")
        docs = raw("COMMAND", "DOCS")
    finally:
        client.connection_pool.release(conn)
        client.close()
    source = {"redis_version": version, "generated_by": "python -m proxy.commands.gen_table"}
    return table_from_command_reply(commands, docs, source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.commands.gen_table",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="a running Redis; default: start redis-server")
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    parser.add_argument("--out", type=Path, default=TABLE_PATH)
    parser.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = parser.parse_args(argv)

    if args.port is None:
        with _own_redis(args.redis_server) as port:
            table = fetch_table("127.0.0.1", port)
    else:
        table = fetch_table(args.host, args.port)
    text = table.to_json()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out}: out of date with Redis {table.source['redis_version']}; "
                  "run python -m proxy.commands.gen_table", file=sys.stderr)
            return 1
        print(f"{args.out}: up to date ({len(table)} commands)")
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {len(table)} commands and subcommands from Redis "
          f"{table.source['redis_version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
