"""Test helpers: a development PKI, a real TLS-only redis-server, phiproxy as a subprocess."""


from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from proxy.certs import issue_cert, make_crl, new_ca, write_dev_pki, write_pem

BACKEND_USER = "phiproxy"
BACKEND_PASSWORD = "test-backend-secret-" + os.urandom(6).hex()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:  # fail, never skip: the README's test command installs it
        pytest.fail(f"{tool} is not installed: run the README's test command (it installs it)")
    return path


@dataclass
class PKI:
    dir: Path
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # name -> (cert, key)

    def path(self, name: str) -> Path:
        return self.dir / name


def make_test_pki(out: Path) -> PKI:
    """Dev PKI plus odd client certificates: expired, from another CA, revoked."""
    write_dev_pki(out, ["app-writer", "app-reader", "nobody", "revoked-client"])
    pki = PKI(out)
    for name in ("app-writer", "app-reader", "nobody", "revoked-client"):
        pki.clients[name] = (out / f"client-{name}.pem", out / f"client-{name}-key.pem")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca_cert = x509.load_pem_x509_certificate((out / "clients-ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((out / "clients-ca-key.pem").read_bytes(), None)
    from proxy.certs import Issued

    ca = Issued(cert=ca_cert, key=ca_key)  # type: ignore[arg-type]
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    expired = issue_cert(ca, "app-writer", client=True, not_before=now - timedelta(days=10),
                         not_after=now - timedelta(days=1))
    _write_issued(out, "expired", expired, pki)
    other_ca = new_ca("some-other-ca")
    stranger = issue_cert(other_ca, "app-writer", client=True)
    _write_issued(out, "other-ca", stranger, pki)
    revoked_cert = x509.load_pem_x509_certificate((out / "client-revoked-client.pem").read_bytes())
    crl = make_crl(ca, [revoked_cert.serial_number])
    write_pem(out / "clients.crl", crl.public_bytes(serialization.Encoding.PEM), private=False)
    return pki


def _write_issued(out: Path, name: str, issued, pki: PKI) -> None:
    write_pem(out / f"client-{name}.pem", issued.cert_pem(), private=False)
    write_pem(out / f"client-{name}-key.pem", issued.key_pem(), private=True)
    pki.clients[name] = (out / f"client-{name}.pem", out / f"client-{name}-key.pem")


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen
    dir: Path
    pki: PKI

    def client(self, **kwargs) -> redis.Redis:
        """A direct TLS client as the proxy's backend user (to seed and inspect)."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, ssl=True,
            ssl_ca_certs=str(self.pki.path("backend-ca.pem")),
            ssl_certfile=str(self.pki.path("proxy-client.pem")),
            ssl_keyfile=str(self.pki.path("proxy-client-key.pem")),
            username=BACKEND_USER, password=BACKEND_PASSWORD, **kwargs)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_redis(pki: PKI, workdir: Path, port: int | None = None,
                extra: tuple[str, ...] = (), config_file: Path | None = None) -> RedisServer:
    """A TLS redis-server on `port`. With `config_file`, that file decides everything but
    the TLS port, certificates, bind, dir and logfile (no users, persistence or plaintext
    port are added: the file brings them); `extra` overrides come last either way."""
    require("redis-server")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    if config_file is not None:
        return _start_redis_with_file(pki, workdir, port, extra, config_file)
    args = [
        "redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(pki.path("backend.pem")),
        "--tls-key-file", str(pki.path("backend-key.pem")),
        "--tls-ca-cert-file", str(pki.path("backend-ca.pem")),
        "--tls-auth-clients", "yes", "--save", "", "--appendonly", "no",
        "--dir", str(workdir), "--logfile", str(workdir / "redis.log"),
        # redis-server joins command-line words into config lines: one word per argument.
        "--user", "default", "off",
        "--user", BACKEND_USER, "on", f">{BACKEND_PASSWORD}", "~*", "&*", "+@all",
        *extra,
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return RedisServer(port, proc, workdir, pki)


def _start_redis_with_file(pki: PKI, workdir: Path, port: int, extra: tuple[str, ...],
                           config_file: Path) -> RedisServer:
    log = workdir / "redis.log"
    args = [
        "redis-server", str(config_file), "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(pki.path("backend.pem")),
        "--tls-key-file", str(pki.path("backend-key.pem")),
        "--tls-ca-cert-file", str(pki.path("backend-ca.pem")),
        "--dir", str(workdir), "--logfile", str(log), *extra,
    ]
    early = workdir / "redis.stderr"  # config errors are printed before the log opens
    with open(early, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc)
    except RuntimeError as exc:  # e.g. the file has a line this Redis refuses
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{exc}\n--- redis-server said:\n{early.read_text()}") from exc
    return RedisServer(port, proc, workdir, pki)


DEFAULT_ROLES = """
[roles.writer]
acl = "+@all ~* &*"

[roles.reader]
acl = "+@read ~app:phi:*"
"""

DEFAULT_IDENTITIES = """
[[identities]]
subject_cn = "app-writer"
role = "writer"

[[identities]]
subject_cn = "app-reader"
role = "reader"

[[identities]]
subject_cn = "revoked-client"
role = "writer"
"""


@dataclass
class Proxy:
    port: int
    proc: subprocess.Popen
    config: Path
    pki: PKI
    log: Path

    def ssl_kwargs(self, client: str = "app-writer") -> dict:
        cert, key = self.pki.clients[client]
        return {"ssl": True, "ssl_ca_certs": str(self.pki.path("clients-ca.pem")),
                "ssl_certfile": str(cert), "ssl_keyfile": str(key)}

    def client(self, client: str = "app-writer", **kwargs) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10,
                           **self.ssl_kwargs(client), **kwargs)

    def ssl_context(self, client: str | None = "app-writer") -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.path("clients-ca.pem")))
        if client is not None:
            cert, key = self.pki.clients[client]
            ctx.load_cert_chain(str(cert), str(key))
        return ctx

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def write_proxy_config(pki: PKI, workdir: Path, backend_port: int, proxy_port: int,
                       extra_listener: str = "", roles: str = DEFAULT_ROLES,
                       identities: str = DEFAULT_IDENTITIES, extra: str = "",
                       metrics_port: int = 0, audit: str = "") -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    audit_key = workdir / "audit.key"
    fd = os.open(audit_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(os.urandom(32))
    secret = workdir / "backend.pass"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(BACKEND_PASSWORD + "\n")
    p = pki.dir
    config = workdir / "phiproxy.toml"
    config.write_text(f"""
[listener]
address = "127.0.0.1"
port = {proxy_port}
cert = "{p / 'proxy.pem'}"
key = "{p / 'proxy-key.pem'}"
client_ca = "{p / 'clients-ca.pem'}"
crl = "{p / 'clients.crl'}"
handshake_timeout_s = 2
{extra_listener}

[backend]
address = "127.0.0.1"
port = {backend_port}
ca = "{p / 'backend-ca.pem'}"
server_name = "localhost"
cert = "{p / 'proxy-client.pem'}"
key = "{p / 'proxy-client-key.pem'}"
username = "{BACKEND_USER}"
password_file = "backend.pass"
{extra}

[metrics]
port = {metrics_port}

[audit]
path = "audit.jsonl"
key_file = "audit.key"
phi_keys = ["app:phi:*"]
environment = "test"
instance = "proxy-test"
{audit}

{roles}
{identities}
""")
    return config


def start_proxy(config: Path, pki: PKI, port: int) -> Proxy:
    log = config.parent / "proxy.log"
    fh = open(log, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(config)],
                            stdout=fh, stderr=subprocess.STDOUT)
    fh.close()
    try:
        wait_port(port, proc)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n--- proxy log:\n{log.read_text()}") from exc
    return Proxy(port, proc, config, pki, log)


def run_concurrently(count: int, work: Callable[[int], None], timeout: float = 120) -> None:
    """Run work(0) .. work(count - 1) in threads at once (real concurrent clients); raise the
    first few errors any of them hit."""
    errors: list[Exception] = []

    def guarded(n: int) -> None:
        try:
            work(n)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "clients still running"
    assert not errors, errors[:3]
