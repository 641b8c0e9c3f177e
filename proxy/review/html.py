"""report.html from the report dict: one self-contained file, inline CSS and SVG, no script,
no font, no image or style fetched from anywhere; readable printed (print CSS keeps tables
whole and drops colours that carry no meaning). Every value is escaped."""

from __future__ import annotations

from html import escape
from typing import Any

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
color:#1a1a1a;margin:2em auto;max-width:72em;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #333;padding-bottom:.2em;
margin-top:2em}h3{margin-bottom:.3em}
table{border-collapse:collapse;width:100%;margin:.5em 0 1em}
th,td{border:1px solid #bbb;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#eee}td.n{text-align:right;font-variant-numeric:tabular-nums}
td{overflow-wrap:break-word}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em;word-break:break-all}
.meta{color:#444}.pass{color:#17692b;font-weight:600}.fail{color:#b00020;font-weight:700}
.unknown,.not-checked{color:#8a5a00;font-weight:600}
.critical{background:#b00020;color:#fff}.high{background:#f8d7da}.medium{background:#fff3cd}
.low{background:#e8f0fe}.sev{padding:0 .4em;border-radius:3px;font-weight:600;white-space:nowrap}
.banner{border:3px solid #b00020;padding:.6em 1em;margin:1em 0;font-weight:600}
.ok{border-color:#17692b}
svg{max-width:100%;height:auto}
@media print{body{margin:0;max-width:none;font-size:11px}h2{break-after:avoid}
table,svg,.banner{break-inside:avoid}a{color:inherit;text-decoration:none}}
"""


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    if not rows:
        return "<p class=meta>none</p>"
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(
        f"<td class=n>{_cell(c)}</td>" if i in numeric else f"<td>{_cell(c)}</td>"
        for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Raw(str):
    """Already escaped HTML."""

    __slots__ = ()


def _cell(value: Any) -> str:
    return value if isinstance(value, Raw) else _e(value)


def _verdict(verdict: str) -> Raw:
    css = verdict.replace(" ", "-")
    return Raw(f"<span class={css}>{_e(verdict.upper())}</span>")


def _sev(severity: str) -> Raw:
    return Raw(f"<span class='sev {_e(severity)}'>{_e(severity)}</span>")


def day_chart(phi: dict[str, Any]) -> str:
    """Stacked bars: recorded PHI commands per day, one colour per identity."""
    days = phi["days"]
    identities = phi["identities"]
    if not days:
        return "<p class=meta>no PHI command recorded in the window</p>"
    width, height, left, bottom, top = 760, 260, 50, 40, 10
    top_value = max(sum(d["counts"].values()) for d in days) or 1
    slot = (width - left - 10) / len(days)
    bar = max(2.0, min(40.0, slot * 0.7))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} '
             f'{height + 20 * ((len(identities) + 3) // 4)}" role="img" '
             f'aria-label="PHI commands per identity per day">']
    plot_h = height - bottom - top
    for i in range(5):  # grid and scale
        y = top + plot_h * (1 - i / 4)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" '
                     'stroke="#ddd"/>')
        parts.append(f'<text x="{left - 5}" y="{y + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{round(top_value * i / 4)}</text>')
    colour = {who: PALETTE[i % len(PALETTE)] for i, who in enumerate(identities)}
    label_every = max(1, len(days) // 12)
    for index, day in enumerate(days):
        x = left + slot * index + (slot - bar) / 2
        y = top + plot_h
        for who in identities:
            count = day["counts"].get(who, 0)
            if not count:
                continue
            h = plot_h * count / top_value
            y -= h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                         f'fill="{colour[who]}"><title>{_e(day["day"])} {_e(who)}: '
                         f'{count}</title></rect>')
        if index % label_every == 0:
            parts.append(f'<text x="{x + bar / 2:.1f}" y="{top + plot_h + 15}" font-size="10" '
                         f'text-anchor="middle">{_e(day["day"][5:])}</text>')
    for i, who in enumerate(identities):
        lx = left + (i % 4) * 180
        ly = height + 20 * (i // 4)
        parts.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" '
                     f'fill="{colour[who]}"/><text x="{lx + 16}" y="{ly}" '
                     f'font-size="12">{_e(who)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def kind_chart(by_identity: dict[str, dict[str, int]]) -> str:
    """Horizontal bars per identity: reads, writes, other, denied."""
    if not by_identity:
        return ""
    kinds = (("read", "#1f77b4"), ("write", "#ff7f0e"), ("other", "#7f7f7f"),
             ("denied", "#d62728"))
    rows = list(by_identity.items())
    top_value = max(sum(v[k] for k, _ in kinds) for _, v in rows) or 1
    width, row_h, left = 760, 22, 160
    height = row_h * len(rows) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
             'role="img" aria-label="PHI commands by kind per identity">']
    for i, (who, counts) in enumerate(rows):
        y = 5 + i * row_h
        parts.append(f'<text x="{left - 6}" y="{y + 13}" font-size="12" '
                     f'text-anchor="end">{_e(who)}</text>')
        x = float(left)
        for kind, colour in kinds:
            w = (width - left - 60) * counts[kind] / top_value
            if w:
                parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="16" '
                             f'fill="{colour}"><title>{_e(who)} {kind}: {counts[kind]}'
                             '</title></rect>')
            x += w
        parts.append(f'<text x="{x + 4:.1f}" y="{y + 13}" font-size="11">'
                     f'{sum(counts[k] for k, _ in kinds)}</text>')
    ly = height - 8
    for i, (kind, colour) in enumerate(kinds):
        parts.append(f'<rect x="{left + i * 110}" y="{ly - 10}" width="12" height="12" '
                     f'fill="{colour}"/><text x="{left + i * 110 + 16}" y="{ly}" '
                     f'font-size="12">{kind}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: dict[str, Any]) -> str:
    r = report
    out = ["<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
           "<meta name=viewport content='width=device-width, initial-scale=1'>",
           f"<title>{_e(r['title'])}: {_e(r['environment'])} / {_e(r['instance'])}</title>",
           f"<style>{CSS}</style></head><body>",
           f"<h1>{_e(r['title'])}</h1>",
           f"<p class=meta>environment <b>{_e(r['environment'])}</b>, instance "
           f"<b>{_e(r['instance'])}</b>; configuration <code>{_e(r['config'])}</code><br>"
           f"window {_e(r['window']['since'])} to {_e(r['window']['until'])}; generated "
           f"{_e(r['generated'])}</p>"]
    status = r["trail_status"]
    banner_ok = status == "verified" and not any(
        f["severity"] in ("critical", "high") for f in r["findings"])
    out.append(f"<div class='banner{' ok' if banner_ok else ''}'>audit trail: "
               f"{_e(status)}" + ("; the numbers below come from a trail that does NOT verify"
                                  if r["numbers_from_broken_trail"] else "") +
               f"; controls: {_e(_summary(r['controls']['summary']))}</div>")
    out.append("<h2 id=findings>1. Findings</h2>")
    out.append(_table(["severity", "finding"], [[_sev(f["severity"]), f["finding"]]
                                                for f in r["findings"]]))
    out.append(_controls(r["controls"]))
    out.append(_permissions(r["permissions"]))
    out.append(_certificates(r["certificates"]))
    out.append(_integrity(r["integrity"]))
    phi = r["phi_access"]
    out.append("<h2 id=phi>6. PHI access per identity</h2>")
    out.append(f"<p class=meta>{_e(phi['note'])}; days in {_e(phi['tz'])}.</p>")
    out.append(day_chart(phi))
    out.append(kind_chart(phi["by_identity"]))
    out.append(_table(["identity", "read", "write", "other", "denied", "total"],
                      [[who, c["read"], c["write"], c["other"], c["denied"], c["total"]]
                       for who, c in phi["by_identity"].items()], {1, 2, 3, 4, 5}))
    out.append(_denials(r["denials"]))
    ah = r["after_hours"]
    out.append("<h2 id=after-hours>8. After-hours access</h2>")
    out.append(f"<p class=meta>{_e(ah['definition'])}.</p>")
    out.append(_table(["identity", "commands", "denied", "first", "last"],
                      [[a["identity"], a["commands"], a["denied"], a["first"], a["last"]]
                       for a in ah["identities"]], {1, 2}))
    out.append(_review(r["access_review"]))
    out.append("<p class=meta>Key names and values never appear in this report: keys are "
               "counted by the pattern that covers them.</p></body></html>")
    return "\n".join(out)


def _summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in counts.items())


def _controls(c: dict[str, Any]) -> str:
    out = ["<h2 id=controls>2. Controls by HIPAA Security Rule section (45 CFR 164.312)</h2>"]
    if not c["backend_checked"]:
        out.append(f"<p class='banner'>Backend controls not checked: "
                   f"{_e(c['backend_unreachable'])}</p>")
    for section in c["sections"]:
        out.append(f"<h3>{_e(section['section'])} {_e(section['title'])}</h3>")
        out.append(_table(["verdict", "control", "source", "observed", "fix"], [
            [_verdict(f["verdict"]), f["title"], f["source"], f["observed"],
             "" if f["verdict"] == "pass" else f["fix"]] for f in section["findings"]]))
    return "\n".join(out)


def _permissions(perms: list[dict[str, Any]]) -> str:
    out = ["<h2 id=permissions>3. Identities, roles and effective permissions</h2>"]
    for p in perms:
        out.append(f"<h3>role {_e(p['role'])}</h3>")
        idents = "; ".join(p["identities"]) or "no [[identities]] rule maps to it"
        out.append(f"<p>certificates: {_e(idents)}</p><ul>" + "".join(
            f"<li>{_e(w)}</li>" for w in p["in_words"]) + "</ul>")
        out.append(f"<p>rule: <code>{_e(p['acl'])}</code>"
                   + (f", dbs = {_e(p['dbs'])}" if p["dbs"] is not None else "")
                   + f"<br><span class=meta>{_e(p['extras'])}</span></p>")
    return "\n".join(out)


def _certificates(c: dict[str, Any]) -> str:
    out = ["<h2 id=certificates>4. Certificates</h2>"]
    out.append(_table(["certificate", "subject", "issuer", "not after", "days left", "status",
                       "SHA-256"], [
        [x["role"], x.get("subject"), x.get("issuer"), x.get("not_after"), x.get("days_left"),
         x["status"], Raw(f"<code>{_e(x.get('sha256'))}</code>")] for x in c["inventory"]],
        {4}))
    crl = c["crl"]
    out.append("<h3>Certificate revocation list</h3>")
    out.append(_table(["file", "issuer", "last update", "next update", "revoked", "status"],
                      [[crl.get("file"), crl.get("issuer"), crl.get("last_update"),
                        crl.get("next_update"), crl.get("revoked"), crl["status"]]], {4}))
    out.append("<h3>Client certificates seen in the window</h3>")
    out.append(f"<p class=meta>{_e(c['clients_note'])}</p>")
    out.append(_table(["CN", "URI SAN", "SHA-256", "roles", "connections", "refused",
                       "locked out", "first seen", "last seen"], [
        [x["cn"], x["san_uri"], Raw(f"<code>{_e(x['fingerprint'])}</code>"),
         ", ".join(x["roles"]), x["connections"], x["refused"], x["locked_out"],
         x["first_seen"], x["last_seen"]] for x in c["clients_seen"]], {4, 5, 6}))
    return "\n".join(out)


def _integrity(i: dict[str, Any]) -> str:
    out = ["<h2 id=integrity>5. Audit-trail integrity</h2>"]
    out.append(f"<p>status: <b>{_e(i['status'])}</b>"
               + (f" ({_e(i['unavailable'])})" if i["unavailable"] else "")
               + f"; {i['records_in_window']} records in the window ({_e(i['span']['first'])} "
               f"to {_e(i['span']['last'])}), {i['records_in_files']} in the files"
               + (f"; {i['unreadable_lines']} unreadable line(s)" if i["unreadable_lines"]
                  else "") + "</p>")
    out.append(_table(["trail", "verified", "records", "seq", "first broken record", "problem"], [
        [ch["trail"], _verdict("pass" if ch["verified"] else "fail" if ch["verified"] is False
                               else "unknown"), ch["records"],
         f"{ch['first_seq']}..{ch['last_seq']}" if ch["first_seq"] is not None else "",
         ch["broken_at"], ch["problem"]] for ch in i["checks"]], {2}))
    out.append("<h3>Records per event</h3>")
    out.append(_table(["event", "records"], [[e, n] for e, n in i["events"].items()], {1}))
    out.append(f"<h3>Gaps longer than {_e(i['gap_threshold_hours'])} h</h3>")
    out.append(_table(["from", "to", "hours"], [
        [g["from"], g["to"], g["hours"]] for g in i["gaps"]], {2}))
    out.append("<h3>Starts, stops and reloads</h3>")
    out.append(_table(["time", "event", "ok", "instance"], [
        [x["ts"], x["event"], x["ok"], x["instance"]] for x in i["lifecycle"]]))
    return "\n".join(out)


def _denials(d: dict[str, Any]) -> str:
    out = ["<h2 id=denials>7. Denials and lockouts</h2>"]
    out.append(f"<p>{d['denials_total']} refused command(s).</p>")
    out.append(_table(["identity", "role", "command", "why", "count"], [
        [x["identity"], x["role"], x["command"], x["reason_text"], x["count"]]
        for x in d["denials"]], {4}))
    out.append("<h3>Lockouts</h3>")
    out.append(_table(["time", "blocked", "who", "failures", "block (s)", "reason"], [
        [x["ts"], x["kind"], x["subject"] or x["address"] or x["fingerprint"], x["failures"],
         x["block_s"], x["reason"]] for x in d["lockouts"]], {3, 4}))
    out.append("<h3>Refused connections</h3>")
    out.append(_table(["event", "who", "count"], [
        [x["event"], x["who"], x["count"]] for x in d["refused_connections"]], {2}))
    return "\n".join(out)


def _review(a: dict[str, Any]) -> str:
    out = ["<h2 id=access-review>9. Access review</h2>",
           f"<p class=meta>{_e(a['coverage'])}</p>"]
    out.append(_table(["severity", "finding"], [[_sev(f["severity"]), f["finding"]]
                                                for f in a["findings"]]))
    out.append("<h3>Per identity</h3>")
    out.append(_table(["identity", "role", "commands", "key patterns", "denials", "first use",
                       "last use"], [
        [x["identity"].get("cn") or x["identity"].get("fingerprint"), x["role"],
         ", ".join(f"{c} ×{n}" for c, n in x["commands"].items()),
         ", ".join(f"{p} ×{n}" for p, n in x["key_patterns"].items()),
         ", ".join(f"{d['command']} ({d['reason_text']}) ×{d['count']}" for d in x["denials"]),
         x["first_use"], x["last_use"]] for x in a["identities"]]))
    out.append("<h3>Per role: unused grants and tightened rules</h3>")
    rows = []
    for name, role in a["roles"].items():
        unused, tight = role["unused_grants"], role["tightened"]
        state = (f"confirmed ({tight['still_allowed']}/{tight['checked']} uses allowed)"
                 if tight["confirmed"] else "NOT confirmed")
        rows.append([name, Raw(f"<code>{_e(role['acl'])}</code>"),
                     f"{unused['used_commands']} of {unused['granted_commands']}",
                     ", ".join(unused["commands"] + unused["key_patterns"]) or "none",
                     Raw(f"<code>{_e(tight['rule'])}</code>"
                         + (f" dbs = {_e(tight['dbs'])}" if tight["dbs"] else "")),
                     state])
    out.append(_table(["role", "rule", "commands used", "never used", "tightened rule",
                       "policy engine"], rows))
    out.append("<h3>Identity rules never seen in the window</h3>")
    out.append(_table(["rule", "match", "role"], [
        [x["rule"], ", ".join(f"{k} = {v}" for k, v in x["match"].items()), x["role"]]
        for x in a["identities_never_seen"]]))
    return "\n".join(out)
