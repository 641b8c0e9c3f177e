"""`phiproxy access-review`: per identity and role, what was granted, what was used, and a
tightened rule that still allows everything used (SPEC §11). The content is a dict (the
JSON output and a section of the report); `render_text` is the terminal view."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from proxy.config import Config
from proxy.policy.engine import CompiledRole
from proxy.review.tighten import tighten, unused_grants
from proxy.review.trail import Trail
from proxy.review.usage import (
    MAX_SHAPES_PER_ROLE,
    UsageCollector,
    by_role,
    identity_label,
    identity_rules_seen,
    ts_text,
)

COVERAGE = ("the trail records every command that touches a phi_keys key or can read or "
            "destroy keys without naming them, and every refusal (SPEC §6); commands on other "
            "keys appear only in each connection's command count (connection_commands), so "
            "the tightened rules cover PHI access: check them before applying them")


def trail_summary(trail: Trail) -> dict[str, Any]:
    status = trail.status()
    return {
        "status": status, "source": trail.source, "unavailable": trail.unavailable,
        "checks": [c.as_dict() for c in trail.checks],
        "records_in_window": trail.records_in_window, "records_in_files": trail.total_records,
        "unreadable_lines": trail.unreadable_lines,
        "numbers_from_broken_trail": status == "broken",
    }


def run_access_review(config: Config, roles: dict[str, CompiledRole],
                      trail: Trail) -> dict[str, Any]:
    """Scan the trail and review it (the access-review command)."""
    usage = UsageCollector(config, roles)
    trail.scan([usage.add])
    return access_review(config, roles, trail, usage)


def access_review(config: Config, roles: dict[str, CompiledRole], trail: Trail,
                  usage_seen: UsageCollector) -> dict[str, Any]:
    """The review, from a trail already scanned into `usage_seen`."""
    uses = usage_seen.uses
    per_role = by_role(uses)
    shapes = usage_seen.shapes()
    role_out: dict[str, Any] = {}
    for name, compiled in roles.items():
        role_config = config.roles[name]
        used = shapes.get(name, [])
        usage = per_role.get(name)
        tightened = tighten(compiled, role_config, used, config.audit.phi_keys).as_dict()
        if usage is not None and usage.unrecorded():
            tightened["notes"].append(
                f"{usage.unrecorded()} command(s) on this role's connections have no record "
                "(no phi_keys key: connection setup, PING, other keys): the tightened rule "
                "does not cover them; add what they need before applying it")
        role_out[name] = {
            "acl": role_config.acl, "dbs": list(role_config.dbs) if role_config.dbs else None,
            "identities": sorted(set(usage.identity["identities"])) if usage else [],
            "usage": usage.as_dict() if usage else None,
            "unused_grants": unused_grants(compiled, role_config, used),
            "tightened": tightened,
        }
    rules = identity_rules_seen(config, uses)
    out = {
        "window": {"since": ts_text(trail.since), "until": ts_text(trail.until)},
        "config": str(config.path),
        "trail": trail_summary(trail),
        "coverage": COVERAGE + (
            f"; {usage_seen.shapes_dropped} uses beyond {MAX_SHAPES_PER_ROLE} distinct shapes "
            "per role were counted but not re-checked" if usage_seen.shapes_dropped else ""),
        "identities": [u.as_dict() for u in sorted(
            uses.values(), key=lambda u: (identity_label(u.identity), u.role))],
        "roles": role_out,
        "identity_rules": rules,
        "identities_never_seen": [r for r in rules if not r["seen"]],
    }
    out["findings"] = findings(out)
    return out


def findings(review: dict[str, Any]) -> list[dict[str, str]]:
    """What a reviewer acts on, most serious first."""
    out: list[dict[str, str]] = []
    trail = review["trail"]
    if trail["status"] == "broken":
        for check in trail["checks"]:
            if check["verified"] is False:
                out.append({"severity": "critical", "finding": (
                    f"audit trail {check['trail']} does not verify: {check['broken_at']}: "
                    f"{check['problem']}; the numbers below come from a broken trail")})
    elif trail["status"] != "verified":
        out.append({"severity": "high", "finding": "audit trail not verified: " + (
            trail["unavailable"] or "; ".join(c["problem"] or "" for c in trail["checks"]))})
    for name, role in review["roles"].items():
        tight = role["tightened"]
        if not tight["confirmed"] and role["usage"]:
            out.append({"severity": "medium", "finding": (
                f"role '{name}': the tightened rule could not be confirmed for "
                f"{', '.join(tight['refused'] + tight['not_reproduced'])}")})
        unused = role["unused_grants"]
        if unused["commands"] or unused["key_patterns"]:
            out.append({"severity": "medium", "finding": (
                f"role '{name}': grants never used in the window: "
                + ", ".join(unused["commands"] + unused["key_patterns"])
                + f"; tightened rule: {tight['rule']}")})
    for rule in review["identities_never_seen"]:
        match = ", ".join(f"{k} = {v!r}" for k, v in rule["match"].items())
        out.append({"severity": "low", "finding": (
            f"{rule['rule']} ({match}, role '{rule['role']}') was never seen in the window: "
            "remove it if the client is gone")})
    for ident in review["identities"]:
        if ident["denials_total"]:
            out.append({"severity": "low", "finding": (
                f"{identity_label(ident['identity'])} (role '{ident['role']}') was refused "
                f"{ident['denials_total']} time(s): " + ", ".join(
                    f"{d['command']} ({d['reason_text']}) x{d['count']}"
                    for d in ident["denials"]))})
    return out


def render_text(review: dict[str, Any]) -> str:
    window = review["window"]
    trail = review["trail"]
    lines = [f"phiproxy access-review: {review['config']}",
             f"window: {window['since']} .. {window['until']}",
             f"audit trail: {trail['status']} ({trail['records_in_window']} records in the "
             f"window, {len(trail['checks'])} trail(s))"]
    if review["findings"]:
        lines += ["", "findings:"]
        lines += [f"  [{f['severity']}] {f['finding']}" for f in review["findings"]]
    lines += ["", "identities:"]
    for ident in review["identities"]:
        lines.append(f"  {identity_label(ident['identity'])} "
                     f"(sha256 {(ident['identity'].get('fingerprint') or '-')[:16]}...) as "
                     f"role '{ident['role']}': {ident['connections']} connection(s), "
                     f"first {ident['first_use']}, last {ident['last_use']}")
        commands = ", ".join(f"{c} x{n}" for c, n in ident["commands"].items()) or "none"
        lines.append(f"    commands: {commands}")
        patterns = ", ".join(f"{p} x{n}" for p, n in ident["key_patterns"].items()) or "none"
        lines.append(f"    key patterns: {patterns}")
        for d in ident["denials"]:
            lines.append(f"    denied: {d['command']}: {d['reason_text']} x{d['count']}")
    lines += ["", "roles:"]
    for name, role in review["roles"].items():
        unused, tight = role["unused_grants"], role["tightened"]
        lines.append(f"  {name}: acl = \"{role['acl']}\"")
        lines.append(f"    identities: {', '.join(role['identities']) or 'none seen'}")
        lines.append(f"    commands granted: {unused['granted_commands']}, used: "
                     f"{unused['used_commands']}")
        lines.append("    never used: " + (", ".join(unused["commands"] + unused["key_patterns"])
                                           or "nothing"))
        state = ("confirmed by the policy engine" if tight["confirmed"] else "NOT confirmed")
        lines.append(f"    tightened: acl = \"{tight['rule']}\"" +
                     (f", dbs = {tight['dbs']}" if tight["dbs"] else "") +
                     f" ({state}: {tight['still_allowed']}/{tight['checked']} uses allowed)")
        for note in tight["notes"]:
            lines.append(f"    note: {note}")
    lines += ["", "identity rules never seen:"]
    lines += [f"  {r['rule']}: role '{r['role']}' {r['match']}"
              for r in review["identities_never_seen"]] or ["  none"]
    lines += ["", f"coverage: {review['coverage']}"]
    return "\n".join(lines)


def generated_at(now: datetime) -> str:
    return ts_text(now) or ""
