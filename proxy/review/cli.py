"""`phiproxy access-review` and `phiproxy report` (SPEC §2, §11). Both exit 0 once their
output is written, whatever they found; 2 for a bad configuration or bad arguments."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime

EXIT_OK, EXIT_USAGE = 0, 2


def add_arguments(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    review = sub.add_parser(
        "access-review", help="per identity and role: granted, used, and a tightened rule",
        description="Reads and verifies the audit trail of the last --since; exit 0 once "
                    "written (a broken trail is a finding), 2 for a bad configuration.")
    review.add_argument("-c", "--config", required=True, help="configuration TOML file")
    review.add_argument("--since", default="30d", help="window, counted back from now: "
                                                      "30d, 12h, 90m (default 30d)")
    review.add_argument("--json", action="store_true", help="print one JSON object")

    report = sub.add_parser(
        "report", help="write an evidence pack: report.html and report.json",
        description="Exit 0 once written (failed controls and a broken trail are findings), "
                    "2 for a bad configuration.")
    report.add_argument("-c", "--config", required=True, help="configuration TOML file")
    report.add_argument("--since", default="30d", help="window (default 30d)")
    report.add_argument("--out", required=True, help="directory to write into")
    report.add_argument("--hours", default="07-19",
                        help="usual hours, local to --tz: access outside them (and on "
                             "Saturdays and Sundays) is after-hours (default 07-19)")
    report.add_argument("--tz", default="UTC", help="time zone of the usual hours and of the "
                                                   "per-day chart, e.g. America/New_York "
                                                   "(default UTC)")
    report.add_argument("--gap", default="1h", help="report silences in the trail longer than "
                                                   "this (default 1h)")


def _load(config_path: str):  # type: ignore[no-untyped-def]
    from proxy.startup import load_policy_or_report

    return load_policy_or_report(config_path)


def cmd_access_review(args: argparse.Namespace) -> int:
    from proxy.review.access import render_text, run_access_review
    from proxy.review.trail import parse_since, read_trail

    try:
        since = parse_since(args.since)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    loaded = _load(args.config)
    if loaded is None:
        return EXIT_USAGE
    config, _, roles = loaded
    review = run_access_review(config, roles, read_trail(config, since))
    print(json.dumps(review, indent=2) if args.json else render_text(review))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from proxy.review.evidence import Hours, build_report
    from proxy.review.html import render_html
    from proxy.review.trail import parse_since, read_trail

    try:
        since = parse_since(args.since)
        gap = parse_since(args.gap)
        hours = Hours.parse(args.hours, args.tz)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    loaded = _load(args.config)
    if loaded is None:
        return EXIT_USAGE
    config, decide, roles = loaded
    now = datetime.now(UTC)
    report = build_report(config, decide, roles, read_trail(config, since, now=now), hours,
                          gap, now)
    try:
        os.makedirs(args.out, exist_ok=True)
        json_path = os.path.join(args.out, "report.json")
        html_path = os.path.join(args.out, "report.html")
        _write(json_path, json.dumps(report, indent=2) + "\n")
        _write(html_path, render_html(report))
    except OSError as exc:
        print(f"error: --out {args.out}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(html_path)
    print(json_path)
    return EXIT_OK


def _write(path: str, text: str) -> None:
    """Written whole or not at all (the pack may be picked up while it is written); 0640:
    it names identities and roles, though never keys or values."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
