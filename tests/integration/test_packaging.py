"""Packaging as a user meets it: `python -m build` turns a clean copy of the sources into an
sdist and a wheel (the wheel built from the sdist, so both must be complete), the wheel is
installed into a fresh virtualenv with its dependencies from PyPI, and the installed
`phiproxy` (not the checkout) prints its version, checks a configuration, explains with the
command table it ships, serves a real redis-server, and answers the Docker image's
HEALTHCHECK (the same command, with this virtualenv standing in for the image's
/opt/phiproxy)."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy import __version__
from tests import dockerfile
from tests.helpers import PKI, Proxy, RedisServer, free_port, wait_port, write_proxy_config

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "proxy")  # what the sdist and the Docker image take


def _env() -> dict[str, str]:
    # nothing from the checkout may leak into the installed program's imports
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _modules(names: list[str], prefix: str = "") -> set[str]:
    return {n[len(prefix):] for n in names
            if n.startswith(prefix + "proxy/") and n.endswith(".py")}


@dataclass
class Built:
    src: Path  # the copy it was built from (the checkout may change while tests run)
    wheel: Path
    sdist: Path

    def modules(self) -> set[str]:
        return {p.relative_to(self.src).as_posix() for p in (self.src / "proxy").rglob("*.py")}

    def data(self) -> set[str]:
        """Every other file in the package: what it loads at run time (package-data)."""
        return {p.relative_to(self.src).as_posix() for p in (self.src / "proxy").rglob("*")
                if p.is_file() and p.suffix not in (".py", ".pyc")}


@dataclass
class Installed:
    venv: Path
    home: Path  # an empty working directory, far from the checkout

    def phiproxy(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run([str(self.venv / "bin" / "phiproxy"), *args], self.home, timeout=60)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    # a copy, so the build's build/ and *.egg-info never land in the shared checkout
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    done = _run([sys.executable, "-m", "build", "--outdir", str(dist), str(src)], src)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(dist.iterdir())
    return Built(src, wheels[0], sdists[0])


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("install")
    venv, home = base / "venv", base / "home"
    home.mkdir()
    done = _run([sys.executable, "-m", "venv", str(venv)], base)
    assert done.returncode == 0, done.stderr
    done = _run([str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "-q",
                 str(built.wheel)], base)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return Installed(venv, home)


def test_wheel_holds_every_module_the_command_table_and_the_version(built: Built) -> None:
    assert built.wheel.name == f"phiproxy-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(built.wheel) as whl:
        names = whl.namelist()
        assert {"proxy/cli.py", "proxy/commands/table.py"} <= built.modules()
        assert _modules(names) == built.modules()
        # package data the proxy loads at run time, every file ([tool.setuptools.package-data]
        # in pyproject.toml lists them), the command table byte for byte
        assert {n for n in names if n.startswith("proxy/")} - _modules(names) == built.data()
        assert "proxy/commands/table.json" in built.data()
        assert whl.read("proxy/commands/table.json") == (
            built.src / "proxy" / "commands" / "table.json").read_bytes()
        info = f"phiproxy-{__version__}.dist-info"
        meta = email.message_from_bytes(whl.read(f"{info}/METADATA"))
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    assert meta["Name"] == "phiproxy" and meta["Version"] == __version__
    assert meta["Requires-Python"] == ">=3.11"
    assert "phiproxy = proxy.cli:main" in entry_points
    # nothing from the checkout beyond the package: no tests, keys, trails
    assert all(n.startswith(("proxy/", info + "/")) for n in names), names


def test_sdist_rebuilds_the_same_package(built: Built) -> None:
    top = f"phiproxy-{__version__}/"
    with tarfile.open(built.sdist) as sdist:
        names = [m.name for m in sdist.getmembers() if m.isfile()]
        pkg_info = email.message_from_bytes(sdist.extractfile(top + "PKG-INFO").read())
    assert {top + "pyproject.toml", top + "README.md",
            top + "proxy/commands/table.json"} <= set(names)
    assert _modules(names, top) == built.modules()
    assert {n[len(top):] for n in names if n.startswith(top + "proxy/")
            and not n.endswith(".py")} == built.data()
    assert pkg_info["Version"] == __version__
    assert not any(n.endswith((".pem", ".key", ".jsonl")) for n in names), names


def test_checkout_prints_the_version() -> None:
    done = subprocess.run([sys.executable, "-m", "proxy", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == f"phiproxy {__version__}\n", done.stderr
    assert __version__.count(".") == 2 and all(x.isdigit() for x in __version__.split("."))


def test_installed_phiproxy_prints_its_version(installed: Installed) -> None:
    done = installed.phiproxy("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"phiproxy {__version__}\n"
    # ... and it is the installed copy that answered, with the same version in its metadata
    where = _run([str(installed.venv / "bin" / "python"), "-c",
                  "import importlib.metadata, proxy; "
                  "print(proxy.__file__); print(importlib.metadata.version('phiproxy'))"],
                 installed.home)
    assert where.returncode == 0, where.stderr
    file, version = where.stdout.split()
    assert Path(file).is_relative_to(installed.venv) and version == __version__


def test_installed_phiproxy_checks_and_explains_a_configuration(
        installed: Installed, pki: PKI, tmp_path: Path) -> None:
    config = write_proxy_config(pki, tmp_path, 6390, 6380)
    done = installed.phiproxy("check-config", "-c", str(config))
    assert done.returncode == 0, done.stderr
    assert f"{config}: OK" in done.stdout and "2 roles" in done.stdout
    # explain decides from the command table the wheel ships (proxy/commands/table.json)
    done = installed.phiproxy("explain", "-c", str(config), "--role", "reader", "--",
                              "HGETALL", "app:phi:1")
    assert done.returncode == 0, done.stderr
    assert '"decision": "allow"' in done.stdout
    done = installed.phiproxy("explain", "-c", str(config), "--role", "reader", "--",
                              "SET", "app:phi:1", "v")
    assert done.returncode == 0, done.stderr
    assert '"decision": "deny"' in done.stdout and "not granted" in done.stdout


@pytest.fixture()
def installed_proxy(installed: Installed, pki: PKI, backend: RedisServer,
                    tmp_path: Path) -> Iterator[tuple[Proxy, int]]:
    port, metrics_port = free_port(), free_port()
    config = write_proxy_config(pki, tmp_path / "proxy", backend.port, port,
                                metrics_port=metrics_port)
    log = config.parent / "proxy.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(installed.venv / "bin" / "phiproxy"), "run", "-c",
                                 str(config)], cwd=installed.home, env=_env(), stdout=fh,
                                stderr=subprocess.STDOUT)
    proxy = Proxy(port, proc, config, pki, log)
    try:
        wait_port(port, proc)
        wait_port(metrics_port, proc)
    except RuntimeError as exc:
        proxy.stop()
        raise RuntimeError(f"{exc}\n--- proxy log:\n{proxy.stderr()}") from exc
    yield proxy, metrics_port
    proxy.stop()


def _healthcheck(installed: Installed, metrics_port: int) -> int:
    argv = dockerfile.healthcheck_argv()
    assert argv[0] == "/opt/phiproxy/bin/python"  # the image's virtualenv
    env = _env() | {"PHIPROXY_HEALTHCHECK_PORT": str(metrics_port)}
    return subprocess.run([str(installed.venv / "bin" / "python"), *argv[1:]],
                          cwd=installed.home, env=env, capture_output=True,
                          timeout=10).returncode


def test_installed_phiproxy_serves_and_answers_the_image_healthcheck(
        installed: Installed, installed_proxy: tuple[Proxy, int]) -> None:
    proxy, metrics_port = installed_proxy
    with proxy.client("app-writer") as client:
        assert client.set("app:phi:pkg", b"installed") is True
        assert client.get("app:phi:pkg") == b"installed"
    assert _healthcheck(installed, metrics_port) == 0
    assert proxy.stop() == 0  # SIGTERM, the image's STOPSIGNAL: drained, exit 0
    assert _healthcheck(installed, metrics_port) != 0  # a dead proxy is unhealthy
