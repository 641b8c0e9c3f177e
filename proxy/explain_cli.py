"""`phiproxy explain`: which identity and role a certificate maps to, and each decision."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proxy.config import IdentityRule
from proxy.identity import Identity, identity_from_der, map_role

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def identity_from_pem(path: Path) -> Identity:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return identity_from_der(cert.public_bytes(Encoding.DER))


def identity_from_subject(subject: str) -> Identity:
    """An Identity from "CN=..,OU=..": only CN and OU can match rules (no SANs, no hash)."""
    fields: dict[str, list[str]] = {}
    for part in subject.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not key:
            raise ValueError(f"--subject: {part.strip()!r} is not KEY=VALUE (e.g. CN=billing)")
        fields.setdefault(key.strip().upper(), []).append(value.strip())
    cn = fields.get("CN", [None])[0]
    return Identity(subject=subject, cn=cn, ous=tuple(fields.get("OU", ())), san_dns=(),
                    san_uris=(), san_emails=(), fingerprint="", serial=0,
                    not_after=datetime.max.replace(tzinfo=UTC))


def _describe_rule(index: int, rule: IdentityRule) -> str:
    given = [f'{name} = "{getattr(rule, name)}"' for name in (
        "subject_cn", "subject_ou", "san_dns", "san_uri", "san_email", "fingerprint_sha256")
        if getattr(rule, name) is not None]
    return f"[[identities]] #{index + 1}: " + ", ".join(given)


def cmd_explain(args: argparse.Namespace) -> int:
    from proxy.policy.explain import explain_command, split_args
    from proxy.policy.loader import disabled_refusal
    from proxy.startup import load_policy_or_report

    loaded = load_policy_or_report(args.config)
    if loaded is None:
        return EXIT_USAGE
    config, _, roles = loaded
    info = sys.stderr if not args.argv[1:] and not args.argv[:1] else sys.stdout
    role_name = args.role
    if role_name is None:
        try:
            identity = (identity_from_pem(args.cert) if args.cert is not None
                        else identity_from_subject(args.subject))
        except (OSError, ValueError) as exc:
            what = f"--cert {args.cert}" if args.cert is not None else "--subject"
            print(f"error: {what}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"identity: {identity.subject}"
              + (f" (sha256 {identity.fingerprint})" if identity.fingerprint else ""), file=info)
        mapped = map_role(config.identities, identity)
        if mapped is None:
            print("role: none: no [[identities]] rule matches; the connection would be refused",
                  file=info)
            return EXIT_FAILED
        role_name = mapped[0]
        print(f"role: {role_name} ({_describe_rule(mapped[1], config.identities[mapped[1]])})",
              file=info)
    elif role_name not in roles:
        print(f"error: --role: no role {role_name!r} in {config.path} "
              f"(roles: {', '.join(sorted(roles))})", file=sys.stderr)
        return EXIT_USAGE
    else:
        print(f"role: {role_name}", file=info)
    role = roles[role_name]
    disabled = frozenset(config.policy.disabled_commands)

    def explain(words: list[bytes]) -> dict[str, Any]:
        refusal = disabled_refusal(disabled, words)
        if refusal is None:
            return explain_command(role_name, role, words)
        return {"command": [w.decode("utf-8", "surrogateescape") for w in words],
                "decision": "deny", "reason": f"role '{role_name}': {refusal.reason}",
                "rule": refusal.rule, "extra": refusal.extra}

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if argv:
        result = explain([a.encode("utf-8", "surrogateescape") for a in argv])
        print(json.dumps(result))
        return EXIT_OK
    for raw in sys.stdin.buffer:
        line = raw.rstrip(b"\r\n")
        try:
            words = split_args(line)
        except ValueError as exc:
            print(json.dumps({"command": None, "decision": "deny", "reason": f"cannot split "
                              f"line: {exc}", "rule": None, "extra": None}), flush=True)
            continue
        if not words:
            continue
        print(json.dumps(explain(words)), flush=True)
    return EXIT_OK
