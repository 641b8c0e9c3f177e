"""The Docker image, built from the repository's Dockerfile and run the way the Dockerfile's
header and config/kubernetes/phiproxy.yaml run it: read-only root filesystem, /tmp a tmpfs,
no capabilities, no-new-privileges, as uid 10001. It serves a real redis-server, its audit
trail lands in the mounted volume and verifies, its HEALTHCHECK turns healthy, and SIGTERM
stops it with exit 0.

Needs a Docker daemon that can build the image (a Debian 12 base image and PyPI); without
one these tests skip and the Dockerfile's promises are still checked statically
(tests/unit/test_deploy_examples.py) and its HEALTHCHECK live against the installed wheel
(tests/integration/test_packaging.py). PHIPROXY_DOCKER_BASE names another base image for
the build (the Dockerfile's BASE argument), e.g. one from a mirror."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from proxy import __version__
from tests import dockerfile
from tests.helpers import PKI, RedisServer, free_port, wait_port, write_proxy_config

ROOT = Path(__file__).resolve().parents[2]
IMAGE = f"phiproxy-test:{__version__}"
UID = 10001
# the systemd unit's sandbox in Docker's words, as the Dockerfile's header gives them
LOCKED_DOWN = ["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges"]


def _docker(*args: str, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("docker") is None or _docker("info", timeout=20).returncode != 0:
        pytest.skip("no Docker daemon here: the Dockerfile is checked statically instead")
    env = dict(os.environ)
    if _docker("buildx", "version", timeout=20).returncode != 0:
        env["DOCKER_BUILDKIT"] = "0"  # a client without the buildx plugin: the classic builder
    base = os.environ.get("PHIPROXY_DOCKER_BASE") or dockerfile.instructions()[0][1].split(
        "=", 1)[1]
    if (_docker("image", "inspect", base).returncode != 0
            and _docker("pull", base, timeout=300).returncode != 0):
        pytest.skip(f"the base image {base} is neither here nor pullable (no registry "
                    "reachable?): set PHIPROXY_DOCKER_BASE to a local Debian 12 image")
    done = _docker("build", "--build-arg", f"BASE={base}", "-t", IMAGE, str(ROOT),
                   timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return IMAGE


def test_image_prints_the_version_from_a_locked_down_container(image: str) -> None:
    done = _docker("run", "--rm", *LOCKED_DOWN, image, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"phiproxy {__version__}\n"


def test_image_runs_as_a_numeric_non_root_user_with_no_setuid_binaries(image: str) -> None:
    config = json.loads(_docker("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == f"{UID}:{UID}"  # numeric: runAsNonRoot can check it
    assert config["Entrypoint"] == ["/opt/phiproxy/bin/phiproxy"]
    assert config["Cmd"] == ["run", "-c", "/etc/phiproxy/phiproxy.toml"]
    assert "/var/lib/phiproxy/audit" in config["Volumes"]
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert config["StopSignal"] == "SIGTERM"
    # looked at as root, so that no directory hides a file from find
    done = _docker("run", "--rm", "--user", "0", "--entrypoint", "/bin/sh", image, "-c",
                   "find / -xdev -type f -perm /6000; ls /opt/phiproxy/bin; id -u phiproxy; "
                   "stat -c '%U %a' /var/lib/phiproxy/audit /etc/phiproxy")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert not [x for x in lines if x.startswith("/")], "setuid/setgid files: " + done.stdout
    assert "phiproxy" in lines and "pip" not in lines and str(UID) in lines
    assert "phiproxy 700" in lines and "root 750" in lines


@pytest.fixture()
def container(image: str, pki: PKI, backend: RedisServer,
              tmp_path: Path) -> Iterator[tuple[str, int, Path, Path]]:
    if os.geteuid() != 0:
        pytest.skip("the mounted files must be owned by uid 10001: run as root to chown them")
    port, metrics_port = free_port(), free_port()
    etc, audit = tmp_path / "etc", tmp_path / "audit"
    config = write_proxy_config(pki, etc, backend.port, port, metrics_port=metrics_port)
    shutil.copytree(pki.dir, etc / "certs")
    text = config.read_text().replace(str(pki.dir), "/etc/phiproxy/certs")
    config.write_text(text.replace('path = "audit.jsonl"',
                                   'path = "/var/lib/phiproxy/audit/audit.jsonl"'))
    audit.mkdir(mode=0o700)
    for path in [etc, audit, *etc.rglob("*")]:
        os.chown(path, UID, UID)
    for key in (etc / "certs").glob("*-key.pem"):
        key.chmod(0o600)
    etc.chmod(0o750)
    name = f"phiproxy-test-{os.getpid()}-{port}"
    done = _docker("run", "-d", "--name", name, "--network", "host", *LOCKED_DOWN,
                   "--health-interval", "1s", "--health-start-period", "1s",
                   "-e", f"PHIPROXY_HEALTHCHECK_PORT={metrics_port}",
                   "-v", f"{etc}:/etc/phiproxy:ro", "-v", f"{audit}:/var/lib/phiproxy/audit",
                   image)
    assert done.returncode == 0, done.stderr
    try:
        try:
            wait_port(port, timeout=30)
        except RuntimeError as exc:
            logs = _docker("logs", name)
            raise RuntimeError(f"{exc}\n{logs.stdout}{logs.stderr}") from exc
        yield name, port, etc, audit
    finally:
        _docker("rm", "-f", name)


def _state(name: str) -> dict:
    return json.loads(_docker("inspect", name).stdout)[0]["State"]


def test_image_serves_audits_turns_healthy_and_stops_cleanly(
        container: tuple[str, int, Path, Path], pki: PKI) -> None:
    name, port, etc, audit = container
    cert, key = pki.clients["app-writer"]
    with redis.Redis(host="127.0.0.1", port=port, ssl=True, socket_timeout=10,
                     ssl_ca_certs=str(pki.path("clients-ca.pem")), ssl_certfile=str(cert),
                     ssl_keyfile=str(key)) as client:
        assert client.set("app:phi:docker", b"in a container") is True
        assert client.get("app:phi:docker") == b"in a container"
    deadline = time.monotonic() + 30
    while _state(name)["Health"]["Status"] != "healthy":
        assert time.monotonic() < deadline, _state(name)["Health"]
        time.sleep(0.5)
    done = _docker("stop", "--time", "20", name, timeout=40)  # SIGTERM: drain, exit 0
    assert done.returncode == 0, done.stderr
    state = _state(name)
    assert state["ExitCode"] == 0, _docker("logs", name).stderr[-3000:]
    # the trail was written to the volume (and only there: the root filesystem is read-only)
    trail = audit / "audit.jsonl"
    events = [json.loads(line)["event"] for line in trail.read_text().splitlines()]
    assert {"start", "connect", "command", "stop"} <= set(events), events
    verify = subprocess.run([sys.executable, "-m", "proxy", "audit", "verify", str(trail),
                             "--key-file", str(etc / "audit.key")], capture_output=True, text=True,
                            timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
