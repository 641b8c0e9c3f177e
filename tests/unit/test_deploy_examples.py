"""The deployment examples in config/: hardened redis.conf, systemd unit, Kubernetes
manifest, Grafana dashboard; and the Dockerfile the manifest's image is built from (built and
run for real by tests/integration/test_docker_image.py where a Docker daemon is). (That
Redis accepts the redis.conf and that it passes every backend control is
tests/integration/test_scan_backend.py: it starts this very file.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from proxy import __version__
from proxy.metrics import Metrics
from tests import dockerfile

CONFIG = Path(__file__).resolve().parents[2] / "config"
REDIS_CONF = CONFIG / "redis" / "redis.conf"
UNIT = CONFIG / "systemd" / "phiproxy.service"
K8S = CONFIG / "kubernetes" / "phiproxy.yaml"
DASHBOARD = CONFIG / "grafana" / "phiproxy-dashboard.json"


# --------------------------------------------------------------------------- redis.conf


def redis_directives(path: Path) -> dict[str, list[str]]:
    """Directive -> every value given (Redis: a line is a comment only when it starts
    with '#'; a '#' after a directive would be an argument, so none may appear)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, value = line.strip().partition(" ")
        found.setdefault(name.lower(), []).append(value.strip().strip('"'))
    return found


def test_the_hardened_integration_test_starts_this_redis_conf() -> None:
    from tests.integration import test_scan_backend

    assert test_scan_backend.REDIS_CONF == REDIS_CONF


@pytest.mark.parametrize(("directive", "value"), [
    ("port", "0"), ("tls-auth-clients", "yes"), ("tls-protocols", "TLSv1.2 TLSv1.3"),
    ("tls-prefer-server-ciphers", "yes"), ("tls-replication", "yes"), ("tls-cluster", "yes"),
    ("protected-mode", "yes"), ("appendonly", "yes"), ("appendfsync", "everysec"),
    ("stop-writes-on-bgsave-error", "yes"), ("loglevel", "notice"),
    ("maxmemory-policy", "noeviction"), ("enable-debug-command", "no"),
    ("enable-module-command", "no"), ("enable-protected-configs", "no"),
])
def test_redis_conf_sets(directive: str, value: str) -> None:
    assert redis_directives(REDIS_CONF).get(directive) == [value]


def test_redis_conf_has_tls_port_rdb_dir_and_overridable_paths() -> None:
    d = redis_directives(REDIS_CONF)
    assert int(d["tls-port"][0]) > 0
    assert d["save"][0].split() and len(d["save"][0].split()) % 2 == 0
    for path_directive in ("dir", "logfile", "aclfile", "tls-cert-file", "tls-key-file",
                           "tls-ca-cert-file"):
        assert d[path_directive][0].startswith("/"), path_directive
    assert all(" #" not in v for values in d.values() for v in values), "trailing comment"
    ciphers = d["tls-ciphers"][0].split(":")
    assert ciphers and all(c.startswith("ECDHE-") and ("GCM" in c or "CHACHA20" in c)
                           for c in ciphers)


def test_redis_conf_holds_no_secret_and_documents_the_acl_file() -> None:
    d = redis_directives(REDIS_CONF)
    for secret in ("requirepass", "masterauth", "user", "tls-key-file-pass"):
        assert secret not in d, f"{secret} would put a secret in redis.conf"
    acl = [line[1:].strip() for line in REDIS_CONF.read_text().splitlines()
           if line.startswith("#   user ")]
    assert acl[0] == "user default off"
    proxy_user = acl[1].split()
    assert proxy_user[:3] == ["user", "phiproxy", "on"]
    assert "#<password-sha256>" in proxy_user and "nopass" not in proxy_user
    for denied in ("-flushall", "-flushdb", "-shutdown", "-config|set", "-acl|setuser"):
        assert denied in proxy_user
    assert "-config" not in proxy_user and "-acl" not in proxy_user  # scan-backend reads them


# --------------------------------------------------------------------------- systemd


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


@pytest.mark.parametrize(("key", "value"), [
    ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes"),
    ("CapabilityBoundingSet", ""), ("AmbientCapabilities", ""), ("ProtectHome", "yes"),
    ("ProtectKernelTunables", "yes"), ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"), ("ProtectControlGroups", "yes"),
    ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ("ReadOnlyPaths", "/etc/phiproxy"), ("ReadWritePaths", "/var/lib/phiproxy/audit"),
    ("ExecReload", "/bin/kill -HUP $MAINPID"), ("User", "phiproxy"),
])
def test_systemd_unit_sets(key: str, value: str) -> None:
    assert unit_settings(UNIT).get(f"Service.{key}") == [value]


def test_systemd_unit_runs_the_configured_proxy() -> None:
    s = unit_settings(UNIT)
    start = s["Service.ExecStart"][0].split()
    assert start[1:] == ["run", "-c", "/etc/phiproxy/phiproxy.toml"]
    assert s["Service.ExecStartPre"][0].split()[1:2] == ["check-config"]
    assert s["Service.RestartPreventExitStatus"] == ["2"]  # bad configuration: no restarts
    # the audit directory is the only writable path, and it is where the proxy writes
    assert s["Service.ReadWritePaths"][0].startswith("/var/lib/phiproxy")


def _unit_for_verify(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an existing phiproxy executable: verify checks
    that the binary exists, and /opt/phiproxy is not installed here."""
    exe = Path(sys.executable).with_name("phiproxy")
    real = str(exe) if exe.exists() else "/bin/true"
    unit = tmp_path / "phiproxy.service"
    unit.write_text(UNIT.read_text().replace("/opt/phiproxy/bin/phiproxy", real))
    return unit


def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    unit = _unit_for_verify(tmp_path)
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "phiproxy.service" not in output, output
    # the sandbox's exposure score (0 best .. 10 worst) stays at 2.0 or below
    done = subprocess.run([analyze, "security", "--offline=yes", "--threshold=20", str(unit)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr


# --------------------------------------------------------------------------- kubernetes
# PyYAML is no dependency of the project: this reads the block-style YAML subset the
# manifest is written in (mappings, sequences, quoted and plain scalars, `|` blocks,
# comments, `---`), and refuses anything else rather than misread it.


def _scalar(text: str) -> Any:
    if text[:1] in "\"'":
        quote = text[0]
        assert text.endswith(quote) and len(text) > 1, f"unterminated string: {text}"
        return text[1:-1].replace("''", "'") if quote == "'" else json.loads(text)
    assert text[:1] not in "{[&*!|>", f"unsupported YAML: {text}"
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"0[0-7]+", text):
        return int(text, 8)  # YAML 1.1 octal, as Kubernetes reads defaultMode: 0440
    if re.fullmatch(r"-?[1-9][0-9]*|0", text):
        return int(text)
    return text


def _strip_comment(text: str) -> str:
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] == " "):
            return text[:i].rstrip()
    return text.rstrip()


class _Reader:
    def __init__(self, text: str):
        self.raw = text.splitlines()
        self.i = 0

    def peek(self) -> tuple[int, str] | None:
        """(indent, content) of the next meaningful line, skipping blanks and comments."""
        while self.i < len(self.raw):
            content = _strip_comment(self.raw[self.i])
            if content.strip():
                return len(content) - len(content.lstrip()), content.strip()
            self.i += 1
        return None

    def node(self, indent: int) -> Any:
        line = self.peek()
        assert line is not None and line[0] == indent, f"line {self.i + 1}: bad indentation"
        return self.sequence(indent) if line[1].startswith("- ") else self.mapping(indent)

    def sequence(self, indent: int) -> list[Any]:
        items = []
        while (line := self.peek()) and line[0] == indent and line[1].startswith("- "):
            rest = line[1][2:].strip()
            if re.match(r"[\w.\-/]+:( |$)", rest):  # "- key: value" opens a mapping
                self.raw[self.i] = " " * (indent + 2) + rest
                items.append(self.mapping(indent + 2))
            else:
                self.i += 1
                items.append(_scalar(rest))
        return items

    def mapping(self, indent: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while (line := self.peek()) and line[0] == indent and not line[1].startswith("- "):
            key, sep, rest = line[1].partition(":")
            assert sep and key not in result, f"line {self.i + 1}: {line[1]}"
            self.i += 1
            rest = rest.strip()
            if rest == "|":
                result[key] = self.block(indent)
            elif rest:
                result[key] = _scalar(rest)
            else:
                nxt = self.peek()
                assert nxt is not None and nxt[0] >= indent, f"line {self.i}: {key} is empty"
                result[key] = self.node(nxt[0])
        return result

    def block(self, indent: int) -> str:
        lines = []
        while self.i < len(self.raw):
            raw = self.raw[self.i]
            if raw.strip() and len(raw) - len(raw.lstrip()) <= indent:
                break
            lines.append(raw)
            self.i += 1
        width = min(len(x) - len(x.lstrip()) for x in lines if x.strip())
        return "\n".join(x[width:] for x in lines).rstrip("\n") + "\n"


def parse_yaml_documents(text: str) -> list[Any]:
    docs = []
    for chunk in re.split(r"(?m)^---\s*$", text):
        reader = _Reader(chunk)
        if reader.peek() is None:
            continue
        docs.append(reader.node(0))
        assert reader.peek() is None, f"unparsed YAML from line {reader.i + 1}"
    return docs


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    docs = parse_yaml_documents(K8S.read_text())
    try:  # the same answer as a real YAML parser, where one happens to be installed
        import yaml
    except ImportError:
        pass
    else:
        assert docs == list(yaml.safe_load_all(K8S.read_text()))
    return {doc["kind"]: doc for doc in docs}


def test_manifest_has_every_object(manifests: dict[str, dict]) -> None:
    assert {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
            "NetworkPolicy"} <= set(manifests)


def test_deployment_is_locked_down(manifests: dict[str, dict]) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod["initContainers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    proxy = pod["containers"][0]
    mounts = {m["name"]: m for m in proxy["volumeMounts"]}
    assert mounts["secrets"].get("readOnly") is True and mounts["config"].get("readOnly")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["audit"]["persistentVolumeClaim"]["claimName"] == "phiproxy-audit"
    assert volumes["secrets"]["emptyDir"]["medium"] == "Memory"
    # writable: the audit volume, /tmp and the secrets copy (init only), nothing else
    writable = {m["name"] for m in proxy["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"audit", "tmp"}


def test_configmap_matches_the_mounts(manifests: dict[str, dict]) -> None:
    import tomllib

    toml = tomllib.loads(manifests["ConfigMap"]["data"]["phiproxy.toml"])
    assert toml["audit"]["path"].startswith("/var/lib/phiproxy/audit/")
    for section, key in (("listener", "key"), ("backend", "key"),
                         ("backend", "password_file"), ("audit", "key_file")):
        assert toml[section][key].startswith("/etc/phiproxy/secrets/")
    ports = {p["name"]: p["containerPort"] for p in
             manifests["Deployment"]["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {"redis-tls": toml["listener"]["port"], "metrics": toml["metrics"]["port"]}


def test_network_policy_admits_only_labelled_clients_and_monitoring(
        manifests: dict[str, dict]) -> None:
    policy = manifests["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "phiproxy"}
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    clients, monitoring = policy["ingress"]
    assert clients["from"] == [{"podSelector": {"matchLabels": {"phiproxy-client": "true"}}}]
    assert clients["ports"] == [{"protocol": "TCP", "port": 6380}]
    assert monitoring["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]
    assert monitoring["ports"] == [{"protocol": "TCP", "port": 9121}]


def test_network_policy_egress_only_redis_and_dns(manifests: dict[str, dict]) -> None:
    redis_rule, dns_rule = manifests["NetworkPolicy"]["spec"]["egress"]
    assert redis_rule["to"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "redis-phi"}}}]
    toml = manifests["ConfigMap"]["data"]["phiproxy.toml"]
    assert redis_rule["ports"] == [{"protocol": "TCP", "port": 6390}]
    assert "port = 6390" in toml
    assert dns_rule["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert {(p["protocol"], p["port"]) for p in dns_rule["ports"]} == {("UDP", 53),
                                                                       ("TCP", 53)}
    assert all("ipBlock" not in peer for rule in (redis_rule, dns_rule) for peer in rule["to"])


def test_tiny_yaml_reader_refuses_what_it_does_not_know() -> None:
    assert parse_yaml_documents('a:\n  - b: "x"\n    c: 0440\n  - d\n') == [
        {"a": [{"b": "x", "c": 0o440}, "d"]}]
    with pytest.raises(AssertionError):
        parse_yaml_documents("a: {b: 1}\n")


# --------------------------------------------------------------------------- grafana


def exposed_metric_names() -> set[str]:
    """Every sample name a fully wired Metrics() exposes (each optional family turned on)."""
    m = Metrics(roles=["reader"])
    m.set_backend_state(True, 2)
    m.watch_audit(SimpleNamespace(written=1, failures=0, depth=0, writes=1))
    m.watch_lockout(lambda: 0, lambda: 0)
    m.set_cert_expiry("server", time.time() + 86400)
    m.denied("reader", "rule", "acl")
    m.observe_proxy_latency(0.001)
    m.observe_backend_rtt(0.001)
    names = set()
    for line in m.exposition().decode().splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            queries.append(var["definition"])
    return queries


def test_dashboard_references_only_exposed_metrics() -> None:
    exposed = exposed_metric_names()
    used = {name for q in dashboard_queries() for name in re.findall(r"\bphiproxy_\w+", q)}
    assert used and used <= exposed, f"not exposed by proxy/metrics.py: {used - exposed}"


def test_dashboard_shows_what_operators_need() -> None:
    queries = "\n".join(dashboard_queries())
    for needed in (
        r"sum by \(result\) \(rate\(phiproxy_commands_total",
        r"sum by \(reason\) \(rate\(phiproxy_denials_total",
        r"sum by \(identity, role\) \(increase\(phiproxy_denials_total",
        r"phiproxy_connections_open",
        r"phiproxy_connections_total",
        r"histogram_quantile\(0\.5, sum by \(le\) \(rate\(phiproxy_proxy_latency_seconds_bucket",
        r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(phiproxy_proxy_latency_seconds_bucket",
        r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(phiproxy_backend_rtt_seconds_bucket",
        r"phiproxy_audit_records_written_total", r"phiproxy_audit_write_failures_total",
        r"phiproxy_backend_up", r"phiproxy_cert_expiry_seconds",
    ):
        assert re.search(needed, queries), needed


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] and dash["title"]
    for p in dash["panels"]:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"]


def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:  # as in test_alert_rules: a failure, never a silent skip
        pytest.fail("promtool is not installed; scripts/test.sh installs it (apt-get install "
                    "-y prometheus)")
    # Grafana's variables become what Grafana would put in their place
    grafana = {"$__rate_interval": "1m", "$__range": "6h", "$instance": ".*"}
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for n, query in enumerate(q for q in dashboard_queries() if not q.startswith("label_")):
        for var, value in grafana.items():
            query = query.replace(var, value)
        rules += [f"      - record: dashboard:query_{n}", f"        expr: {json.dumps(query)}"]
    (tmp_path / "rules.yml").write_text("\n".join(rules) + "\n")
    done = subprocess.run([promtool, "check", "rules", "rules.yml"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------- Dockerfile
# What the Dockerfile promises, read from the file itself: these hold with or without a
# Docker daemon (tests/integration/test_docker_image.py builds and runs it where one is).

ROOT = CONFIG.parent
IMAGE = f"registry.example.org/phiproxy:{__version__}"


def _final(name: str) -> list[str]:
    return [args for n, args in dockerfile.stages()[-1] if n == name]


def test_dockerfile_runs_as_the_numeric_user_kubernetes_expects(
        manifests: dict[str, dict]) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    # numeric, so that runAsNonRoot can check it without reading /etc/passwd
    assert _final("USER") == [f"{pod['runAsUser']}:{pod['runAsGroup']}"]
    assert pod["runAsUser"] != 0 and pod["runAsNonRoot"] is True
    run = " ".join(_final("RUN"))
    assert f"--uid {pod['runAsUser']}" in run and f"--gid {pod['runAsGroup']}" in run
    assert "--shell /usr/sbin/nologin" in run


def test_dockerfile_takes_only_the_package_into_the_image() -> None:
    names = [n for n, _ in dockerfile.instructions()]
    assert "ADD" not in names  # no remote fetches, no archives unpacked behind our back
    build, final = dockerfile.stages()
    sources = {word for n, args in build if n == "COPY" for word in args.split()[:-1]}
    assert sources == {"pyproject.toml", "README.md", "proxy"}
    assert [args for n, args in final if n == "COPY"] == [
        "--from=build /opt/phiproxy /opt/phiproxy"]
    # the context itself is an allowlist: keys, certificates, trails, .venv never reach it
    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines()
             if x.strip() and not x.startswith("#")]
    assert lines[0] == "*"
    assert {x[1:].rstrip("/") for x in lines if x.startswith("!")} == sources
    assert {"**/*.pem", "**/*.key"} <= set(lines)


def test_dockerfile_mirrors_the_systemd_unit() -> None:
    unit = unit_settings(UNIT)
    start = unit["Service.ExecStart"][0].split()
    assert dockerfile.exec_form(_final("ENTRYPOINT")[0]) == start[:1]  # /opt/phiproxy/bin/...
    assert dockerfile.exec_form(_final("CMD")[0]) == start[1:]
    assert _final("STOPSIGNAL") == unit["Service.KillSignal"]
    # writable: the audit directory (the unit's only ReadWritePaths), made for the user only
    assert dockerfile.exec_form(_final("VOLUME")[0]) == unit["Service.ReadWritePaths"]
    run = " ".join(_final("RUN"))
    assert "install -d -o phiproxy -g phiproxy -m 0700 /var/lib/phiproxy " \
           f"{unit['Service.ReadWritePaths'][0]}" in run
    assert f"-m 0750 {unit['Service.ReadOnlyPaths'][0]}" in run  # configuration: read only
    # RestrictSUIDSGID / NoNewPrivileges: no setuid or setgid file is left in the image
    assert "find / -xdev -type f -perm /6000 -exec chmod a-s {} +" in run
    # a read-only root filesystem: bytecode compiled at install, never written at run time
    assert dockerfile.env()["PYTHONDONTWRITEBYTECODE"] == "1"
    # the header's `docker run` applies the rest of the unit's sandbox, LimitNOFILE included
    header = dockerfile.DOCKERFILE.read_text()
    for flag in ("--read-only", "--tmpfs /tmp", "--cap-drop ALL",
                 "--security-opt no-new-privileges",
                 f"--ulimit nofile={unit['Service.LimitNOFILE'][0]}"):
        assert flag in header, flag


def test_dockerfile_healthcheck_probes_healthz_on_the_metrics_port(
        manifests: dict[str, dict]) -> None:
    import tomllib

    argv = dockerfile.healthcheck_argv()
    assert argv[0] == "/opt/phiproxy/bin/python" and "'/healthz'" in argv[-1]
    toml = tomllib.loads(manifests["ConfigMap"]["data"]["phiproxy.toml"])
    example = tomllib.loads((CONFIG / "phiproxy.example.toml").read_text())
    port = dockerfile.env()["PHIPROXY_HEALTHCHECK_PORT"]
    assert int(port) == toml["metrics"]["port"] == example["metrics"]["port"]
    assert set(_final("EXPOSE")[0].split()) == {str(toml["listener"]["port"]), port}


def test_kubernetes_runs_the_image_the_dockerfile_builds(manifests: dict[str, dict]) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    for container in pod["containers"] + pod["initContainers"]:
        assert container["image"] == IMAGE, container["name"]
    # the build command in the Dockerfile's header and the manifest's tag the same image
    assert f"docker build -t {IMAGE} ." in dockerfile.DOCKERFILE.read_text()
    assert f"docker build -t {IMAGE} ." in K8S.read_text()
    # the init container copies secrets with /bin/sh and cp: the Debian base has both
    assert pod["initContainers"][0]["command"][0] == "/bin/sh"
    assert dockerfile.instructions()[0] == ("ARG", "BASE=debian:bookworm-slim")

