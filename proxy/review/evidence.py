"""The content of `phiproxy report` (SPEC §11), as one JSON-ready dict: html.py renders the
same dict, so report.html and report.json never disagree.

Sections: findings (failed controls, a broken trail: first); controls by HIPAA §164.312
section (scan-backend's, or "not checked" when the backend cannot be reached, and the
proxy's own); identities -> roles -> effective permissions; certificates; audit-trail
integrity; PHI access per identity and day; denials and lockouts; after-hours access; the
access review. Keys are counted by pattern, never named.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.config import Config
from proxy.policy import extras as ex
from proxy.policy.engine import CompiledRole
from proxy.review.access import access_review, trail_summary
from proxy.review.trail import Trail
from proxy.review.usage import (
    REASON_KINDS,
    UsageCollector,
    command_label,
    identity_label,
    reason_kind,
    ts_text,
)

EXPIRY_WARNING_DAYS = 30
SCAN_TIMEOUT_S = 15.0
KIND_WRITE, KIND_READ, KIND_OTHER = "write", "read", "other"


@dataclass(frozen=True)
class Hours:
    """Usual hours [start, end) in a time zone, Monday to Friday; anything else is after
    hours."""

    start: int
    end: int
    tz_name: str
    tz: tzinfo

    @classmethod
    def parse(cls, text: str, tz_name: str) -> Hours:
        start_s, sep, end_s = text.partition("-")
        try:
            start, end = int(start_s), int(end_s)
        except ValueError:
            start = end = -1
        if not sep or not 0 <= start < end <= 24:
            raise ValueError(f"--hours {text!r}: give START-END in whole hours, e.g. 07-19")
        try:
            zone: tzinfo = UTC if tz_name.upper() == "UTC" else ZoneInfo(tz_name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"--tz {tz_name!r}: not a time zone name, e.g. UTC or "
                             "America/New_York") from None
        return cls(start, end, tz_name, zone)

    def after_hours(self, ts: datetime) -> bool:
        local = ts.astimezone(self.tz)
        return local.weekday() >= 5 or not self.start <= local.hour < self.end

    def describe(self) -> str:
        return (f"usual hours are {self.start:02d}:00-{self.end:02d}:00 {self.tz_name}, "
                "Monday to Friday; anything else is after hours")


def build_report(config: Config, decide: Any, roles: dict[str, CompiledRole], trail: Trail,
                 hours: Hours, gap: timedelta, now: datetime) -> dict[str, Any]:
    usage = UsageCollector(config, roles)
    clients, phi = ClientsSeen(), PhiAccess(roles, hours)
    denials, after = Denials(), AfterHours(hours)
    trail.scan([usage.add, clients.add, phi.add, denials.add, after.add])
    review = access_review(config, roles, trail, usage)
    controls = controls_section(config, decide, roles, trail)
    report: dict[str, Any] = {
        "title": "phiproxy evidence pack",
        "generated": ts_text(now),
        "config": str(config.path),
        "environment": config.audit.environment,
        "instance": config.audit.instance,
        "window": review["window"],
        "hours": {"start": hours.start, "end": hours.end, "tz": hours.tz_name,
                  "definition": hours.describe()},
        "trail_status": trail.status(),
        "numbers_from_broken_trail": trail.status() == "broken",
        "controls": controls,
        "permissions": permissions_section(config, roles),
        "certificates": certificates_section(config, clients, now),
        "integrity": integrity_section(trail, gap),
        "phi_access": phi.result(),
        "denials": denials.result(),
        "after_hours": after.result(),
        "access_review": review,
    }
    report["findings"] = top_findings(report)
    return report


# ---------------------------------------------------------------- controls


def controls_section(config: Config, decide: Any, roles: dict[str, Any],
                     trail: Trail) -> dict[str, Any]:
    """scan-backend's controls (its audit-chain control answered from `trail`, verified
    once for the whole report) and the proxy's own."""
    from proxy.backend import BackendUnavailable
    from proxy.config import backend_node
    from proxy.scan import CONTROLS, SECTIONS, Evidence, Scan, _quiet_backend_log, scan_backend
    from proxy.tls import TLSConfigError

    cfg = config.backend
    unreachable: str | None = None
    try:
        with _quiet_backend_log():
            ev = asyncio.run(asyncio.wait_for(scan_backend(config), SCAN_TIMEOUT_S))
    except (BackendUnavailable, TLSConfigError, OSError, TimeoutError) as exc:
        unreachable = (f"backend {backend_node(cfg)} could not be reached: "
                       f"{exc or type(exc).__name__}")
        ev = Evidence(cfg.address, cfg.port, cfg.username or "default",
                      config_error=unreachable, info_error=unreachable, acl_error=unreachable,
                      dryrun_error=unreachable)
    scan = Scan(config, ev, roles, decide)
    findings = [c.run(scan).as_dict() if c.id != AUDIT_CHAIN else _audit_chain(c, trail)
                for c in CONTROLS]
    for finding in findings:
        backend_side = finding["id"].startswith("backend-") or finding["id"] == \
            "proxy-backend-link"
        finding["source"] = "backend" if backend_side else "proxy"
        if unreachable is not None and backend_side:
            finding["verdict"] = "not checked"
            finding["observed"] = unreachable
    findings += _proxy_controls(config)
    counts = Counter(f["verdict"] for f in findings)
    return {
        "backend_checked": unreachable is None,
        "backend_unreachable": unreachable,
        "sections": [{"section": f"164.312({key})", "title": title,
                      "findings": [f for f in findings if f["section"] == key]}
                     for key, title in SECTIONS.items()],
        "summary": {v: counts.get(v, 0) for v in ("pass", "fail", "unknown", "not checked")},
    }


AUDIT_CHAIN = "proxy-audit-chain"


def _audit_chain(control: Any, trail: Trail) -> dict[str, Any]:
    from proxy.scan import SECTIONS

    status = trail.status()
    if status == "verified":
        verdict = "pass"
        observed = "; ".join(f"{c.name}: {c.records} records in {len(c.files)} file(s), chain "
                             "and head intact" for c in trail.checks)
    elif status == "broken":
        verdict = "fail"
        observed = "; ".join(f"{c.where}: {c.problem}" for c in trail.checks
                             if c.verified is False)
    else:
        verdict = "unknown"
        observed = trail.unavailable or "; ".join(c.problem or "" for c in trail.checks)
    return {"id": control.id, "title": control.title, "hipaa": f"164.312({control.section})",
            "section": control.section, "section_title": SECTIONS[control.section],
            "verdict": verdict, "observed": observed, "fix": control.fix,
            "note": "; ".join(n for c in trail.checks for n in c.notes)}


def _control(id_: str, section: str, title: str, ok: bool, observed: str,
             fix: str) -> dict[str, Any]:
    from proxy.scan import SECTIONS

    return {"id": id_, "title": title, "hipaa": f"164.312({section})", "section": section,
            "section_title": SECTIONS[section], "verdict": "pass" if ok else "fail",
            "observed": observed, "fix": fix, "note": "", "source": "proxy"}


def _proxy_controls(config: Config) -> list[dict[str, Any]]:
    """What the proxy guarantees by its configuration, besides scan-backend's proxy checks."""
    audit, lockout = config.audit, config.lockout
    return [
        _control("proxy-phi-keys", "b", "PHI key patterns are configured (what the trail "
                 "records)", bool(audit.phi_keys),
                 "phi_keys = " + (", ".join(audit.phi_keys) or "none: no command on a key is "
                                  "recorded unless refused or keyless"),
                 '[audit] phi_keys = ["app:phi:*"]'),
        _control("proxy-audit-fsync", "c", "Audit records reach the disk before or soon after "
                 "the command", audit.fsync in ("always", "everysec"),
                 f"fsync = {audit.fsync}", '[audit] fsync = "always" (or "everysec")'),
        _control("proxy-lockout", "d", "Repeated authentication failures are locked out",
                 lockout.enabled, f"enabled = {str(lockout.enabled).lower()}, failures = "
                 f"{lockout.failures} in {lockout.window_s:g} s, block {lockout.block_s:g} s",
                 "[lockout] enabled = true"),
        _control("proxy-default-deny", "a", "Unknown commands and roles without rules are "
                 "refused; dangerous and scripting commands need explicit grants", True,
                 "always on (SPEC §4), no setting can turn it off", "-"),
        _control("proxy-min-tls", "e", "Client connections use TLS 1.2 or newer",
                 config.listener.min_tls in ("1.2", "1.3"),
                 f'min_tls = "{config.listener.min_tls}"', '[listener] min_tls = "1.3"'),
    ]


# ---------------------------------------------------------------- permissions


def _key_words(token: str) -> str:
    if token.lower() in ("allkeys", "~*"):
        return "every key"
    if token.startswith("%"):
        flags, _, pattern = token[1:].partition("~")
        what = {"R": "read only", "W": "write only"}.get(flags.upper(), "read and write")
        return f"keys matching {pattern} ({what})"
    return f"keys matching {token[1:]} (read and write)"


def permissions_section(config: Config, roles: dict[str, CompiledRole]) -> list[dict[str, Any]]:
    """Per role, in words a reader who does not know Redis follows, with the rule."""
    out = []
    for name, role in roles.items():
        cfg = config.roles[name]
        granted: list[str] = []
        dangerous: list[str] = []
        for info in role.table:
            sel = next((s for s in role.selectors if s.rules.allowed.get(info.name)), None)
            if sel is None or info.is_container:
                continue
            if info.categories & {"admin", "dangerous"}:
                if sel.rules.explicit.get(info.name):
                    dangerous.append(info.name)
                continue  # granted only implicitly: the dangerous extra refuses it
            granted.append(info.name)
        categories = sorted({c for n in granted for c in role.table.get(n.split("|")[0])
                             .categories} if granted else set())
        keys: list[str] = []
        channels: list[str] = []
        for sel in role.selectors:
            if sel.allkeys:
                keys.append("every key")
            keys += [_key_words(p.token if p.token[0] in "~%" else "~" + p.token)
                     for p in sel.rules.keys]
            if sel.allchannels:
                channels.append("every channel")
            channels += [f"channels matching {p.decode(errors='replace')}"
                         for p, _ in sel.rules.channels]
        writes = sum(1 for n in granted if "write" in _categories(role, n))
        reads = sum(1 for n in granted if "read" in _categories(role, n))
        words = [f"may run {len(granted)} commands ({reads} that read data, {writes} that "
                 "change data)" if granted else "may run no command"]
        words.append("on " + ("; ".join(keys) if keys else "no key"))
        words.append("channels: " + ("; ".join(channels) if channels else "none"))
        words.append("databases: " + (", ".join(map(str, cfg.dbs)) if cfg.dbs is not None
                                      else "all"))
        if dangerous:
            words.append(f"dangerous or administrative commands granted by name: "
                         f"{', '.join(sorted(dangerous))}")
        else:
            words.append("no dangerous or administrative command")
        scripting = [n for n in granted if ex.is_scripting(n)]
        words.append("may run scripts (they can touch any key)" if scripting
                     else "may not run scripts")
        out.append({
            "role": name, "acl": cfg.acl, "dbs": list(cfg.dbs) if cfg.dbs is not None else None,
            "identities": [_rule_text(r) for r in config.identities if r.role == name],
            "granted_commands": len(granted), "read_commands": reads,
            "write_commands": writes, "categories": categories,
            "dangerous_granted": sorted(dangerous), "keys": keys, "channels": channels,
            "in_words": words,
            "extras": "always on: unknown commands refused; dangerous commands need a grant by "
                      "name; scripts need +@scripting or a grant by name unless allkeys; key "
                      "names beyond the role's patterns are never revealed (KEYS/SCAN "
                      "filtered, RANDOMKEY refused)",
        })
    return out


def _categories(role: CompiledRole, name: str) -> frozenset[str]:
    info = role.table.lookup([p.encode() for p in name.split("|")])
    return info.categories if info is not None else frozenset()


def _rule_text(rule: Any) -> str:
    return ", ".join(f"{k} = {getattr(rule, k)!r}" for k in (
        "subject_cn", "subject_ou", "san_dns", "san_uri", "san_email", "fingerprint_sha256")
        if getattr(rule, k) is not None)


# ---------------------------------------------------------------- certificates


def _cert_entry(role: str, path: Path | None, now: datetime) -> list[dict[str, Any]]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    if path is None:
        return [{"role": role, "file": None, "status": "not configured"}]
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        return [{"role": role, "file": str(path), "status": f"unreadable: {exc}"}]
    out = []
    for cert in certs[:1] if role.endswith("certificate") else certs:
        days = (cert.not_valid_after_utc - now).total_seconds() / 86400
        status = ("expired" if days < 0 else f"expires within {EXPIRY_WARNING_DAYS} days"
                  if days < EXPIRY_WARNING_DAYS else "valid")
        out.append({
            "role": role, "file": str(path), "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(), "serial": format(cert.serial_number, "x"),
            "not_before": ts_text(cert.not_valid_before_utc),
            "not_after": ts_text(cert.not_valid_after_utc), "days_left": int(days // 1),
            "sha256": hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(),
            "status": status})
    return out


def _crl_entry(path: Path | None, now: datetime) -> dict[str, Any]:
    from cryptography import x509

    if path is None:
        return {"file": None, "status": "no CRL configured: a stolen certificate stays valid "
                                        "until it expires"}
    try:
        data = path.read_bytes()
        crl = (x509.load_pem_x509_crl(data) if b"-----BEGIN" in data
               else x509.load_der_x509_crl(data))
    except (OSError, ValueError) as exc:
        return {"file": str(path), "status": f"unreadable: {exc}"}
    next_update = crl.next_update_utc
    if next_update is None:
        status = "no next update"
    elif next_update < now:
        status = "stale: past its next update (the proxy refuses clients of this issuer)"
    elif next_update - now < timedelta(days=2):
        status = "next update within 2 days"
    else:
        status = "current"
    return {"file": str(path), "issuer": crl.issuer.rfc4514_string(),
            "last_update": ts_text(crl.last_update_utc), "next_update": ts_text(next_update),
            "revoked": len(crl), "status": status}


class ClientsSeen:
    """Client certificates of the window, as the trail records them."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, Any]] = {}

    def add(self, record: dict[str, Any]) -> None:
        identity = record.get("identity")
        event = record.get("event")
        if not isinstance(identity, dict) or event not in ("connect", "identity_refused",
                                                           "lockout"):
            return
        fingerprint = identity.get("fingerprint") or "?"
        when = ts_text(record["_ts"])
        entry = self.seen.setdefault(fingerprint, {
            "cn": identity.get("cn"), "san_uri": identity.get("san_uri"),
            "fingerprint": fingerprint, "roles": [], "connections": 0, "refused": 0,
            "locked_out": 0, "first_seen": when, "last_seen": when})
        entry["first_seen"] = min(entry["first_seen"], when)
        entry["last_seen"] = max(entry["last_seen"], when)
        if event == "connect":
            entry["connections"] += 1
            if record.get("role") and record["role"] not in entry["roles"]:
                entry["roles"].append(record["role"])
        elif event == "identity_refused":
            entry["refused"] += 1
        else:
            entry["locked_out"] += 1


def certificates_section(config: Config, clients: ClientsSeen, now: datetime) -> dict[str, Any]:
    listener, backend = config.listener, config.backend
    inventory = (_cert_entry("proxy server certificate", listener.cert, now)
                 + _cert_entry("client CA", listener.client_ca, now)
                 + _cert_entry("proxy-to-backend client certificate", backend.cert, now)
                 + _cert_entry("backend CA", backend.ca, now))
    return {"inventory": inventory, "crl": _crl_entry(listener.crl, now),
            "clients_seen": sorted(clients.seen.values(),
                                   key=lambda e: (e["cn"] or "", e["fingerprint"])),
            "expiry_warning_days": EXPIRY_WARNING_DAYS,
            "clients_note": "client certificates as the trail records them (CN, URI SAN, "
                            "SHA-256 fingerprint); the proxy refuses an expired or revoked one "
                            "at every connection"}


# ---------------------------------------------------------------- integrity


def integrity_section(trail: Trail, gap: timedelta) -> dict[str, Any]:
    """Verification, span, records per event, silences (over every trail together: a
    silence is a time in which no trail has a record), starts, stops and reloads."""
    stamps = sorted(trail.stamps)
    limit = gap.total_seconds()
    gaps = []
    for before, after in zip(stamps, stamps[1:], strict=False):
        if after - before > limit:
            gaps.append({"from": _ts(before), "to": _ts(after),
                         "hours": round((after - before) / 3600, 2)})
    return {
        **trail_summary(trail),
        "span": {"first": _ts(stamps[0]) if stamps else None,
                 "last": _ts(stamps[-1]) if stamps else None},
        "events": dict(sorted(trail.events.items())),
        "gap_threshold_hours": round(limit / 3600, 2),
        "gaps": gaps,
        "lifecycle": [{"ts": ts_text(r["_ts"]), "event": r.get("event"), "ok": r.get("ok"),
                       "instance": r.get("instance")}
                      for r in sorted(trail.lifecycle, key=lambda r: r["_ts"])],
    }


def _ts(seconds: float) -> str | None:
    return ts_text(datetime.fromtimestamp(seconds, UTC))


# ---------------------------------------------------------------- PHI access


def _kind(roles: dict[str, CompiledRole], command: str) -> str:
    role = next(iter(roles.values()), None)
    if role is None:
        return KIND_OTHER
    categories = _categories(role, command)
    return KIND_WRITE if "write" in categories else KIND_READ if "read" in categories \
        else KIND_OTHER


class PhiAccess:
    """Recorded commands per identity per day (in the report's time zone) and by kind."""

    def __init__(self, roles: dict[str, CompiledRole], hours: Hours):
        self.roles, self.hours = roles, hours
        self.per_day: dict[str, Counter[str]] = defaultdict(Counter)
        self.kinds: dict[str, Counter[str]] = defaultdict(Counter)
        self.denied: Counter[str] = Counter()
        self._kind_cache: dict[str, str] = {}

    def add(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event not in ("command", "denied"):
            return
        who = identity_label(record.get("identity"))
        if event == "denied":
            self.denied[who] += 1
            return
        day = record["_ts"].astimezone(self.hours.tz).date().isoformat()
        self.per_day[day][who] += 1
        command = str(record.get("command"))
        kind = self._kind_cache.get(command)
        if kind is None:
            kind = self._kind_cache[command] = _kind(self.roles, command)
        self.kinds[who][kind] += 1

    def result(self) -> dict[str, Any]:
        per_day, kinds, denied = self.per_day, self.kinds, self.denied
        identities = sorted({who for c in per_day.values() for who in c} | set(denied))
        return {
            "tz": self.hours.tz_name,
            "identities": identities,
            "days": [{"day": day, "counts": dict(sorted(per_day[day].items()))}
                     for day in sorted(per_day)],
            "by_identity": {who: {"read": kinds[who][KIND_READ],
                                  "write": kinds[who][KIND_WRITE],
                                  "other": kinds[who][KIND_OTHER], "denied": denied[who],
                                  "total": sum(kinds[who].values())} for who in identities},
            "note": "recorded commands (SPEC §6: commands on phi_keys keys, and commands that "
                    "read or destroy keys without naming them), by kind; keys are never listed",
        }


class Denials:
    """Refused commands by identity, role, command and kind; lockouts; refused connections."""

    def __init__(self) -> None:
        self.denials: Counter[tuple[str, str, str, str]] = Counter()
        self.lockouts: list[dict[str, Any]] = []
        self.refused: Counter[tuple[str, str]] = Counter()

    def add(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "denied":
            self.denials[(identity_label(record.get("identity")), str(record.get("role")),
                          command_label(record.get("command")),
                          reason_kind(record.get("reason")))] += 1
        elif event == "lockout":
            blocked = record.get("blocked") if isinstance(record.get("blocked"), dict) else {}
            self.lockouts.append({
                "ts": ts_text(record["_ts"]), "kind": blocked.get("kind"),
                "address": blocked.get("address"), "subject": blocked.get("subject"),
                "fingerprint": blocked.get("fingerprint"), "failures": record.get("failures"),
                "block_s": record.get("block_s"), "reason": record.get("reason")})
        elif event in ("tls_failed", "identity_refused"):
            who = str(record.get("subject") or record.get("src") or "?")
            self.refused[(str(event), who)] += 1

    def result(self) -> dict[str, Any]:
        return {
            "denials": [{"identity": i, "role": r, "command": c, "reason": k,
                         "reason_text": REASON_KINDS[k], "count": n}
                        for (i, r, c, k), n in sorted(self.denials.items())],
            "denials_total": sum(self.denials.values()),
            "lockouts": sorted(self.lockouts, key=lambda x: x["ts"] or ""),
            "refused_connections": [{"event": e, "who": w, "count": n}
                                    for (e, w), n in sorted(self.refused.items())],
        }


class AfterHours:
    """Recorded commands and refusals outside the usual hours, per identity."""

    def __init__(self, hours: Hours):
        self.hours = hours
        self.per: dict[str, Counter[str]] = defaultdict(Counter)
        self.span: dict[str, list[datetime]] = {}

    def add(self, record: dict[str, Any]) -> None:
        ts = record["_ts"]
        if record.get("event") not in ("command", "denied") or not self.hours.after_hours(ts):
            return
        who = identity_label(record.get("identity"))
        self.per[who][str(record.get("event"))] += 1
        span = self.span.setdefault(who, [ts, ts])
        span[0], span[1] = min(span[0], ts), max(span[1], ts)

    def result(self) -> dict[str, Any]:
        return {
            "definition": self.hours.describe(),
            "identities": [{"identity": who, "commands": c["command"], "denied": c["denied"],
                            "first": ts_text(self.span[who][0]),
                            "last": ts_text(self.span[who][1])}
                           for who, c in sorted(self.per.items())],
            "total": sum(c["command"] + c["denied"] for c in self.per.values()),
        }


def top_findings(report: dict[str, Any]) -> list[dict[str, str]]:
    """Shown first: a broken trail, failed controls, then the access review's findings."""
    out: list[dict[str, str]] = []
    review = report["access_review"]
    out += [f for f in review["findings"] if f["severity"] in ("critical", "high")]
    for section in report["controls"]["sections"]:
        for f in section["findings"]:
            if f["verdict"] == "fail":
                out.append({"severity": "high", "finding": (
                    f"control {f['id']} ({f['hipaa']}) failed: {f['title']}: {f['observed']}; "
                    f"fix: {f['fix']}")})
    if not report["controls"]["backend_checked"]:
        out.append({"severity": "high", "finding": (
            "backend controls not checked: " + str(report["controls"]["backend_unreachable"]))})
    for cert in report["certificates"]["inventory"]:
        if cert.get("status") not in ("valid", None):
            out.append({"severity": "high" if cert["status"] == "expired" else "medium",
                        "finding": f"{cert['role']} {cert.get('subject', '')}: "
                                   f"{cert['status']}"})
    crl = report["certificates"]["crl"]
    if crl.get("status") != "current":
        out.append({"severity": "medium", "finding": f"CRL {crl.get('file')}: {crl['status']}"})
    if report["denials"]["lockouts"]:
        out.append({"severity": "medium", "finding": (
            f"{len(report['denials']['lockouts'])} lockout(s) in the window")})
    if report["after_hours"]["total"]:
        out.append({"severity": "low", "finding": (
            f"{report['after_hours']['total']} PHI command(s) or refusals after hours "
            f"({report['hours']['definition']})")})
    out += [f for f in review["findings"] if f["severity"] not in ("critical", "high")]
    return out
