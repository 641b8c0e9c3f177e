"""`phiproxy access-review` and `phiproxy report` on a trail written by real traffic through
the real proxy (several identities, denials, a lockout, a reload, rotated files) to a real
redis-server. Every number the commands print is compared with counts taken from the trail
here, independently; the tightened rules are checked with `phiproxy explain` (the policy
engine) on the commands actually sent; the HTML is opened in headless chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.helpers import (
    DEFAULT_IDENTITIES,
    PKI,
    Proxy,
    RedisServer,
    free_port,
    start_proxy,
    start_redis,
    wait_port,
    write_proxy_config,
)

ROLES = """
[roles.writer]
acl = "+@read +@write +@keyspace -@dangerous ~app:* &notify:*"

[roles.reader]
acl = "+@read ~app:phi:* %R~app:public:*"
dbs = [0]

[roles.ops]
acl = "+@all allkeys"
"""

IDENTITIES = DEFAULT_IDENTITIES + """
[[identities]]
subject_cn = "ops-admin"
role = "ops"
"""

# What each identity sends. Key names are distinctive so that a leak is found by grep.
WRITER_COMMANDS = [
    ["SET", "app:phi:mrn-7731", "v1"], ["HSET", "app:phi:visit-20261202", "f", "v"],
    ["GET", "app:phi:mrn-7731"], ["MSET", "app:phi:rx-alpha", "1", "app:phi:rx-beta", "2"],
    ["DEL", "app:phi:tmp-9931"], ["SCAN", "0"], ["SET", "app:cache:sess-5521", "x"],
    ["GET", "app:phi:mrn-7731"],
]
WRITER_DENIED = [["FLUSHALL"], ["SET", "billing:inv-4242", "1"]]
READER_COMMANDS = [
    ["GET", "app:phi:mrn-7731"], ["HGETALL", "app:phi:visit-20261202"],
    ["MGET", "app:phi:rx-alpha", "app:phi:rx-beta"], ["GET", "app:public:doc-6617"],
]
READER_DENIED = [["SET", "app:phi:mrn-7731", "x"], ["GET", "billing:inv-4242"]]
LEAK = "app:phi:leak-8812"  # sent where a subcommand belongs: the record's command names it
# Granted to the role, never used in the window: the tightened rule must refuse them.
UNUSED = {"writer": ["APPEND", "app:phi:mrn-7731", "x"],
          "reader": ["GET", "app:public:doc-6617"]}


@dataclass
class Deployment:
    proxy: Proxy
    backend: RedisServer
    workdir: Path

    @property
    def config(self) -> Path:
        return self.proxy.config

    def records(self) -> list[dict]:
        """Every record of every file of the trail, oldest file first."""
        files = sorted(self.workdir.glob("audit.jsonl.*"), key=lambda p: -int(p.suffix[1:])
                       if p.suffix[1:].isdigit() else 0)
        files = [p for p in files if p.suffix[1:].isdigit()] + [self.workdir / "audit.jsonl"]
        return [json.loads(line) for p in files for line in p.read_text().splitlines()]


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True,
                          text=True, input=stdin, timeout=120)


def refused_connection(proxy: Proxy, name: str) -> bool:
    ctx = ssl.create_default_context(cafile=str(proxy.pki.path("clients-ca.pem")))
    cert, key = proxy.pki.clients[name]
    ctx.load_cert_chain(str(cert), str(key))
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"PING\r\n")
            return not tls.recv(64)
    except (ssl.SSLError, ConnectionError, OSError):
        return True


def wait_for_event(dep: Deployment, event: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["event"] == event for r in dep.records()):
        assert time.monotonic() < deadline, f"no {event} record after {timeout} s"
        time.sleep(0.05)


def send(client: redis.Redis, commands: list[list[str]], *, denied: bool) -> None:
    for command in commands:
        if denied:
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
        else:
            client.execute_command(*command)


@pytest.fixture(scope="module")
def deployment(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("review")
    backend = start_redis(pki, root / "redis")
    port = free_port()
    config = write_proxy_config(
        pki, root / "proxy", backend.port, port, roles=ROLES, identities=IDENTITIES,
        audit="max_bytes = 2048\nkeep = 100")  # several rotated files
    config.write_text(config.read_text() + "\n[lockout]\nfailures = 2\nblock_s = 30\n")
    proxy = start_proxy(config, pki, port)
    dep = Deployment(proxy, backend, config.parent)
    try:
        writer = proxy.client("app-writer")
        send(writer, WRITER_COMMANDS, denied=False)
        send(writer, WRITER_DENIED, denied=True)
        with pytest.raises(redis.exceptions.ResponseError, match="unknown subcommand"):
            writer.execute_command("OBJECT", LEAK)  # refused; its name is the client's text
        proxy.proc.send_signal(signal.SIGHUP)  # a reload in the middle of the traffic
        wait_for_event(dep, "reload")
        reader = proxy.client("app-reader")
        send(reader, READER_COMMANDS, denied=False)
        send(reader, READER_DENIED, denied=True)
        writer.close()
        reader.close()
        for _ in range(2):  # no [[identities]] rule: refused, then locked out
            assert refused_connection(proxy, "nobody")
        wait_for_event(dep, "lockout")
        assert refused_connection(proxy, "nobody")
    finally:
        assert proxy.stop() == 0
    yield dep
    backend.stop()


def review_json(dep: Deployment, *extra: str) -> dict:
    result = run_cli("access-review", "-c", str(dep.config), "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_trail_has_what_the_review_needs(deployment: Deployment) -> None:
    """The fixture did what the other tests rely on: rotation, a reload, a lockout."""
    assert len(list(deployment.workdir.glob("audit.jsonl.[0-9]*"))) >= 2
    events = Counter(r["event"] for r in deployment.records())
    assert events["reload"] == 1 and events["lockout"] == 1
    # ours, and redis-py's CLIENT SETINFO probes (unknown subcommands: refused, recorded)
    assert events["denied"] >= 4


def test_access_review_counts_equal_the_trail(deployment: Deployment) -> None:
    review = review_json(deployment)
    records = deployment.records()
    assert review["trail"]["status"] == "verified"
    assert review["trail"]["records_in_window"] == len(records)
    assert sum(c["records"] for c in review["trail"]["checks"]) == len(records)
    by_cn = {i["identity"]["cn"]: i for i in review["identities"]}
    assert set(by_cn) == {"app-writer", "app-reader"}
    for cn in by_cn:
        mine = [r for r in records if (r["identity"] or {}).get("cn") == cn]
        commands = Counter(r["command"] for r in mine if r["event"] == "command")
        # a refused name that is the client's text (LEAK) is shown as "?"
        denied = Counter(r["command"].replace(LEAK, "?") for r in mine
                         if r["event"] == "denied")
        got = by_cn[cn]
        assert got["commands"] == dict(commands), cn
        assert {d["command"]: d["count"] for d in got["denials"]} == dict(denied), cn
        assert got["connections"] == sum(r["event"] == "connect" for r in mine)
        assert got["connection_commands"] == sum(r["commands"] for r in mine
                                                 if r["event"] == "disconnect")
        stamps = sorted(r["ts"] for r in mine)
        assert (got["first_use"], got["last_use"]) == (stamps[0], stamps[-1])
        phi = sum(1 for r in mine if r["event"] == "command"
                  and any(k.startswith("app:phi:") for k in r["keys"]))
        assert got["key_patterns"]["phi_keys app:phi:*"] == phi
    # what was sent: the writer's non-PHI SET and the reader's public GET have no record
    assert by_cn["app-writer"]["commands"] == {"del": 1, "get": 2, "hset": 1, "mset": 1,
                                               "scan": 1, "set": 1}
    assert by_cn["app-reader"]["commands"] == {"get": 1, "hgetall": 1, "mget": 1}
    assert {(d["command"], d["reason"]) for d in by_cn["app-reader"]["denials"]} >= {
        ("set", "command"), ("get", "key"), ("client|setinfo", "command")}
    assert {(d["command"], d["reason"]) for d in by_cn["app-writer"]["denials"]} >= {
        ("flushall", "command"), ("set", "key")}
    assert by_cn["app-reader"]["key_patterns"] == {"~app:phi:*": 3, "phi_keys app:phi:*": 3}
    assert by_cn["app-reader"]["unrecorded_commands"] >= 1  # the public GET, at least
    never = {r["match"].get("subject_cn") for r in review["identities_never_seen"]}
    assert never == {"revoked-client", "ops-admin"}
    reader = review["roles"]["reader"]["unused_grants"]
    assert "%R~app:public:*" in reader["key_patterns"]
    assert review["roles"]["ops"]["usage"] is None
    assert review["roles"]["ops"]["unused_grants"]["commands"] == ["+@all"]
    assert "~app:*" not in review["roles"]["writer"]["unused_grants"]["key_patterns"]


def _explain(config: Path, role: str, commands: list[list[str]]) -> list[str]:
    lines = "\n".join(" ".join(c) for c in commands) + "\n"
    result = run_cli("explain", "-c", str(config), "--role", role, stdin=lines)
    assert result.returncode == 0, result.stderr
    return [json.loads(line)["decision"] for line in result.stdout.splitlines()]


def test_tightened_rules_allow_what_was_used_and_refuse_an_unused_grant(
        deployment: Deployment, tmp_path: Path) -> None:
    review = review_json(deployment)
    writer, reader = review["roles"]["writer"]["tightened"], review["roles"]["reader"]["tightened"]
    assert writer["confirmed"] and reader["confirmed"]
    assert writer["checked"] == writer["still_allowed"] > 0
    # ~app:* narrowed to the phi_keys pattern inside it: every key used was under it
    assert set(writer["rule"].split()) == {"+set", "+hset", "+get", "+mset", "+del", "+scan",
                                           "~app:phi:*"}
    assert set(reader["rule"].split()) == {"+get", "+hgetall", "+mget", "~app:phi:*"}
    assert reader["dbs"] == [0]
    # The same engine, through `phiproxy explain`, on a configuration with the new rules:
    text = deployment.config.read_text()
    for name, body in (("writer", writer), ("reader", reader)):
        old = review["roles"][name]["acl"]
        text = text.replace(f'acl = "{old}"', f'acl = "{body["rule"]}"')
    tightened = tmp_path / "tightened.toml"
    tightened.write_text(text.replace('path = "audit.jsonl"', f'path = "{tmp_path}/a.jsonl"')
                         .replace('key_file = "audit.key"',
                                  f'key_file = "{deployment.workdir / "audit.key"}"')
                         .replace('password_file = "backend.pass"',
                                  f'password_file = "{deployment.workdir / "backend.pass"}"'))
    used = {"writer": [c for c in WRITER_COMMANDS if not c[1].startswith("app:cache")],
            "reader": [c for c in READER_COMMANDS if not c[1].startswith("app:public")]}
    for role in ("writer", "reader"):
        assert set(_explain(tightened, role, used[role])) == {"allow"}, role
        assert _explain(deployment.config, role, [UNUSED[role]]) == ["allow"], role
        assert _explain(tightened, role, [UNUSED[role]]) == ["deny"], role
    # never wider than the role: what the role refused, the tightened rule refuses too
    assert _explain(tightened, "writer", WRITER_DENIED) == ["deny", "deny"]
    assert _explain(tightened, "reader", READER_DENIED) == ["deny", "deny"]


def _copy(deployment: Deployment, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(deployment.workdir, copy)
    return copy / "phiproxy.toml"


def test_a_trail_with_one_edited_record_is_reported_broken(
        deployment: Deployment, tmp_path: Path) -> None:
    config = _copy(deployment, tmp_path)
    # one command record in a rotated file: its command name changed, nothing else
    rotated = next(p for p in sorted(config.parent.glob("audit.jsonl.[0-9]*"))
                   if '"event":"command"' in p.read_text())
    lines = rotated.read_text().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if '"event":"command"' in line)
    lines[index] = lines[index].replace(',"command":"', ',"command":"x', 1)
    rotated.write_text("".join(lines))
    result = run_cli("access-review", "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr
    review = json.loads(result.stdout)
    assert review["trail"]["status"] == "broken"
    assert review["trail"]["numbers_from_broken_trail"] is True
    assert review["findings"][0]["severity"] == "critical"
    assert "bad mac" in review["findings"][0]["finding"]
    text = run_cli("access-review", "-c", str(config))
    assert text.returncode == 0 and "does not verify" in text.stdout
    out = tmp_path / "pack"
    assert run_cli("report", "-c", str(config), "--out", str(out)).returncode == 0
    report = json.loads((out / "report.json").read_text())
    assert report["trail_status"] == "broken" and report["findings"][0]["severity"] == \
        "critical"
    assert "does NOT verify" in (out / "report.html").read_text()
    (chain,) = [f for s in report["controls"]["sections"] for f in s["findings"]
                if f["id"] == "proxy-audit-chain"]
    assert chain["verdict"] == "fail" and "bad mac" in chain["observed"]


@pytest.fixture(scope="module")
def pack(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pack")
    # the backend still runs: its controls are checked
    result = run_cli("report", "-c", str(deployment.config), "--since", "1d", "--out",
                     str(out), "--hours", "00-24")
    assert result.returncode == 0, result.stderr
    return out


def test_report_json_numbers_equal_the_trail(deployment: Deployment, pack: Path) -> None:
    report = json.loads((pack / "report.json").read_text())
    records = deployment.records()
    assert report["trail_status"] == "verified"
    assert report["integrity"]["events"] == dict(Counter(r["event"] for r in records))
    assert report["integrity"]["span"] == {"first": records[0]["ts"], "last": records[-1]["ts"]}
    assert report["controls"]["backend_checked"] is True
    sections = [s["section"] for s in report["controls"]["sections"]]
    assert sections == [f"164.312({c})" for c in "abcde"]
    assert all(s["findings"] for s in report["controls"]["sections"])
    per_day = Counter()
    for r in records:
        if r["event"] == "command":
            per_day[(r["ts"][:10], r["identity"]["cn"])] += 1
    got = {(d["day"], who): n for d in report["phi_access"]["days"]
           for who, n in d["counts"].items()}
    assert got == dict(per_day)
    assert report["denials"]["denials_total"] == sum(r["event"] == "denied" for r in records)
    (lockout,) = report["denials"]["lockouts"]
    assert lockout["kind"] == "certificate" and lockout["subject"]
    if time.gmtime().tm_wday < 5:  # --hours 00-24: nothing is after hours on a weekday
        assert report["after_hours"]["total"] == 0
    roles = {p["role"]: p for p in report["permissions"]}
    assert roles["ops"]["dangerous_granted"] and not roles["writer"]["dangerous_granted"]
    inventory = {c["role"] for c in report["certificates"]["inventory"]}
    assert {"proxy server certificate", "client CA"} <= inventory
    assert report["certificates"]["crl"]["status"] == "current"
    seen = {c["cn"] for c in report["certificates"]["clients_seen"]}
    assert {"app-writer", "app-reader", "nobody"} <= seen
    assert report["access_review"]["roles"]["writer"]["tightened"]["confirmed"]


def test_after_hours_are_counted(deployment: Deployment, tmp_path: Path) -> None:
    """With usual hours that exclude now, every PHI command and refusal is after hours."""
    hour = time.gmtime().tm_hour
    hours = f"{(hour + 1) % 23:02d}-{(hour + 1) % 23 + 1:02d}"
    result = run_cli("report", "-c", str(deployment.config), "--out", str(tmp_path),
                     "--hours", hours)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    records = [r for r in deployment.records() if r["event"] in ("command", "denied")]
    assert report["after_hours"]["total"] == len(records)


def test_no_key_name_in_the_report_or_the_review(deployment: Deployment, pack: Path) -> None:
    keys = {k for r in deployment.records() for k in r.get("keys") or ()} | {LEAK}
    assert any(LEAK in json.dumps(r) for r in deployment.records())  # the trail has it
    assert "app:phi:mrn-7731" in keys and "billing:inv-4242" in keys  # refused, still named
    texts = {"report.html": (pack / "report.html").read_text(),
             "report.json": (pack / "report.json").read_text(),
             "access-review": json.dumps(review_json(deployment))}
    for name, text in texts.items():
        for key in keys:
            assert key not in text, f"{key!r} appears in {name}"


def test_report_html_is_self_contained(pack: Path) -> None:
    html = (pack / "report.html").read_text()
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, re.I)
    assert "@import" not in html and "url(" not in html and "@font-face" not in html
    assert html.count("<svg") >= 2


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("chromium is not installed: run the README's test command (scripts/test.sh "
                "installs it)")


def _render(html: Path, out: Path) -> subprocess.CompletedProcess:
    """Headless chromium: a screenshot, console messages on stderr, no network at all."""
    home = out / "home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={out / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1280,2400",
         f"--screenshot={out / 'report.png'}", html.as_uri()],
        capture_output=True, text=True, timeout=120, env=env)


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line
            or "Uncaught" in line or "net::ERR" in line]


def test_report_renders_in_headless_chromium(pack: Path, tmp_path: Path) -> None:
    result = _render(pack / "report.html", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _console_errors(result.stderr) == []
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    # readable printed: chromium prints it to PDF (the print CSS keeps tables whole)
    pdf = tmp_path / "report.pdf"
    printed = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile-pdf'}", "--host-resolver-rules=MAP * ~NOTFOUND",
         "--no-pdf-header-footer", f"--print-to-pdf={pdf}", (pack / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.read_bytes().count(b"/Type /Page") >= 3
    # the check itself catches a page that logs to the console or fetches something
    (tmp_path / "bad").mkdir()
    bad = tmp_path / "bad" / "bad.html"
    bad.write_text("<html><body><script>console.error('boom')</script>"
                   "<img src='http://example.invalid/x.png'></body></html>")
    bad_result = _render(bad, tmp_path / "bad")
    assert _console_errors(bad_result.stderr), bad_result.stderr[-2000:]


def test_bad_arguments_and_configuration_exit_2(deployment: Deployment, tmp_path: Path) -> None:
    result = run_cli("access-review", "-c", str(deployment.config), "--since", "1w")
    assert result.returncode == 2 and "--since '1w'" in result.stderr
    result = run_cli("report", "-c", str(deployment.config), "--out", str(tmp_path),
                     "--tz", "Mars/Base")
    assert result.returncode == 2 and "--tz" in result.stderr
    broken = _copy(deployment, tmp_path).parent / "bad.toml"
    broken.write_text(deployment.config.read_text().replace('acl = "+@all allkeys"',
                                                            'acl = "+@al allkeys"'))
    for command in (["access-review"], ["report", "--out", str(tmp_path / "x")]):
        result = run_cli(*command, "-c", str(broken))
        assert result.returncode == 2 and "role 'ops'" in result.stderr, result.stderr


def test_unreachable_backend_and_no_trail_are_findings(pki: PKI, tmp_path: Path) -> None:
    """Nothing listens on the backend port and the proxy never wrote a trail: exit 0, and
    the report says what it could not check."""
    config = write_proxy_config(pki, tmp_path / "p", free_port(), free_port(), roles=ROLES,
                                identities=IDENTITIES)
    result = run_cli("report", "-c", str(config), "--out", str(tmp_path / "pack"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "pack" / "report.json").read_text())
    assert report["controls"]["backend_checked"] is False
    backend = [f for s in report["controls"]["sections"] for f in s["findings"]
               if f["source"] == "backend"]
    assert backend and all(f["verdict"] == "not checked" for f in backend)
    assert report["trail_status"] == "unavailable"
    assert any("not checked" in f["finding"] for f in report["findings"])
    assert any("not verified" in f["finding"] for f in report["findings"])
    review = run_cli("access-review", "-c", str(config), "--json")
    assert review.returncode == 0
    assert json.loads(review.stdout)["trail"]["status"] == "unavailable"


def test_workers_trails_are_all_read(pki: PKI, tmp_path: Path) -> None:
    """`run --workers 2` writes one chain per worker: both are verified and counted."""
    backend = start_redis(pki, tmp_path / "redis")
    port = free_port()
    config = write_proxy_config(pki, tmp_path / "p", backend.port, port)
    log = (tmp_path / "p" / "proxy.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(config),
                             "--workers", "2"], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    proxy = Proxy(port, proc, config, pki, tmp_path / "p" / "proxy.log")
    try:
        wait_port(port, proc)
        deadline = time.monotonic() + 15  # both workers listen (else one takes everything)
        while proxy.stderr().count("listening on") < 2:
            assert time.monotonic() < deadline, proxy.stderr()
            time.sleep(0.05)
        for i in range(16):  # new connections spread over the workers
            client = proxy.client("app-writer")
            assert client.set(f"app:phi:w{i}", i)
            client.close()
    finally:
        assert proxy.stop() == 0, proxy.stderr()
        backend.stop()
    trails = sorted((tmp_path / "p").glob("audit.w*.jsonl"))
    assert len(trails) == 2
    records = [json.loads(line) for t in trails for line in t.read_text().splitlines()]
    assert all(any('"event":"command"' in line for line in t.read_text().splitlines())
               for t in trails), "both workers served clients"
    review = json.loads(run_cli("access-review", "-c", str(config), "--json").stdout)
    assert review["trail"]["status"] == "verified"
    assert sorted(c["trail"] for c in review["trail"]["checks"]) == [str(t) for t in trails]
    assert review["trail"]["records_in_window"] == len(records)
    (writer,) = review["identities"]
    assert writer["commands"] == {"set": 16} and writer["connections"] == 16
