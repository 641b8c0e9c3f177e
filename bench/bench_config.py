"""What every benchmark shares: the phiproxy configuration measured, and the keyspace prefill.

The configuration is the one issue 5's goals are stated for: one role with three key
patterns, every benchmark key PHI (so every command is audited, write-ahead), a pre-warmed
backend pool of 8, metrics off. Shell scripts use it through the command line:

    python bench/bench_config.py config --out phiproxy.toml --port 6380 \\
        --cert server.pem --key server-key.pem --client-ca ca.pem \\
        --backend-port 6379 --backend-ca ca.pem --backend-cert c.pem --backend-key c-key.pem \\
        --audit-path audit.jsonl --audit-key audit.key --subject-cn bench-client
    python bench/bench_config.py prefill | redis-cli ... --pipe   # key:%012d, 64-byte values

Python benchmarks import `config_text` and `prefill_commands`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

ROLE_ACL = "+@read +@write +ping +config|get ~key:* ~counter:* ~my*"
PHI_KEYS = ("key:*", "counter:*", "my*")
KEYSPACE = 100_000  # redis-benchmark -r
VALUE_SIZE = 64  # redis-benchmark -d


def config_text(*, port: int, cert: str, key: str, client_ca: str, backend_port: int,
                backend_ca: str, backend_cert: str, backend_key: str, audit_path: str,
                audit_key: str, subject_cn: str, max_connections: int = 1000,
                address: str = "127.0.0.1") -> str:
    """The benchmark configuration; paths are written as given (relative ones start at the
    configuration file's directory)."""
    phi_keys = ", ".join(f'"{pattern}"' for pattern in PHI_KEYS)
    return f"""\
[listener]
address = "{address}"
port = {port}
cert = "{cert}"
key = "{key}"
client_ca = "{client_ca}"
max_connections = {max_connections}
[backend]
address = "{address}"
port = {backend_port}
ca = "{backend_ca}"
server_name = "localhost"
cert = "{backend_cert}"
key = "{backend_key}"
pool_size = 8
[audit]
path = "{audit_path}"
key_file = "{audit_key}"
phi_keys = [{phi_keys}]
[metrics]
port = 0
[roles.bench]
acl = "{ROLE_ACL}"
[[identities]]
subject_cn = "{subject_cn}"
role = "bench"
"""


def prefill_commands(keys: int = KEYSPACE, size: int = VALUE_SIZE) -> Iterator[bytes]:
    """RESP SETs of key:000000000000 .. keys-1 (redis-benchmark's -r key format), so every
    GET of the benchmarks hits a `size`-byte value."""
    value = b"x" * size
    for i in range(keys):
        name = b"key:%012d" % i
        yield b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(name), name, size, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    config = sub.add_parser("config", help="write the benchmark configuration")
    config.add_argument("--out", required=True)
    config.add_argument("--port", type=int, required=True)
    config.add_argument("--backend-port", type=int, required=True)
    config.add_argument("--max-connections", type=int, default=1000)
    for name in ("cert", "key", "client-ca", "backend-ca", "backend-cert", "backend-key",
                 "audit-path", "audit-key", "subject-cn"):
        config.add_argument(f"--{name}", required=True)
    prefill = sub.add_parser("prefill", help="RESP SETs of the keyspace on stdout")
    prefill.add_argument("keys", type=int, nargs="?", default=KEYSPACE)
    prefill.add_argument("size", type=int, nargs="?", default=VALUE_SIZE)
    args = parser.parse_args(argv)
    if args.what == "prefill":
        out = sys.stdout.buffer
        for command in prefill_commands(args.keys, args.size):
            out.write(command)
        return 0
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(config_text(
            port=args.port, cert=args.cert, key=args.key, client_ca=args.client_ca,
            backend_port=args.backend_port, backend_ca=args.backend_ca,
            backend_cert=args.backend_cert, backend_key=args.backend_key,
            audit_path=args.audit_path, audit_key=args.audit_key, subject_cn=args.subject_cn,
            max_connections=args.max_connections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
