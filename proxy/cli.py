"""The `phiproxy` command. Exit codes: 0 ok, 1 a check failed, 2 bad usage or configuration."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxy import __version__
from proxy.config import ConfigError
from proxy.startup import load_everything

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phiproxy", description="Redis proxy for PHI: mutual TLS, per-role policy, audit.")
    parser.add_argument("--version", action="version", version=f"phiproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="serve until SIGTERM/SIGINT")
    run.add_argument("-c", "--config", required=True, type=Path, help="configuration TOML file")
    run.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    check = sub.add_parser("check-config", help="validate everything `run` would load")
    check.add_argument("-c", "--config", required=True, type=Path)

    explain = sub.add_parser(
        "explain", help="show the identity, role and decision for a command",
        description="With no CMD, reads commands from standard input, one per line, and "
                    "prints one JSON object per line.")
    explain.add_argument("-c", "--config", required=True, type=Path)
    who = explain.add_mutually_exclusive_group(required=True)
    who.add_argument("--cert", type=Path, help="client certificate (PEM)")
    who.add_argument("--subject", help='a subject instead of a certificate: "CN=..,OU=.."')
    who.add_argument("--role", help="a role name instead of a certificate")
    explain.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")

    scan = sub.add_parser(
        "scan-backend", help="check the backend's hardening (SPEC §8)",
        description="Exit 0: no control failed; 1: a control failed; 2: bad configuration "
                    "or the backend cannot be reached.")
    scan.add_argument("-c", "--config", required=True, type=Path)
    scan.add_argument("--json", action="store_true", help="print one JSON object")

    certs = sub.add_parser("certs", help="certificate helpers")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True, metavar="SUBCOMMAND")
    dev = certs_sub.add_parser("dev", help="write a development PKI")
    dev.add_argument("--out", required=True, type=Path, help="directory to write into")
    dev.add_argument("--client", action="append", default=[], metavar="NAME",
                     help="also issue a client certificate with CN=NAME (repeatable)")

    audit = sub.add_parser("audit", help="audit trail tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    from proxy.audit.verify import add_arguments as add_verify_arguments

    add_verify_arguments(audit_sub.add_parser(
        "verify", help="check the audit hash chain (exit 0 ok, 1 broken, 2 bad usage)"))
    from proxy.review.cli import add_arguments as add_review_arguments

    add_review_arguments(sub)
    from proxy.protect.keys_cli import add_arguments as add_keys_arguments

    add_keys_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "check-config":
        return cmd_check_config(args)
    if args.command == "certs":
        return cmd_certs_dev(args)
    if args.command == "audit":
        from proxy.audit.verify import cmd_audit_verify

        return cmd_audit_verify(args)
    if args.command == "explain":
        from proxy.explain_cli import cmd_explain

        return cmd_explain(args)
    if args.command == "scan-backend":
        from proxy.scan import cmd_scan_backend

        return cmd_scan_backend(args)
    if args.command == "keys":
        from proxy.protect.keys_cli import cmd_keys

        return cmd_keys(args)
    if args.command in ("access-review", "report"):
        from proxy.review.cli import cmd_access_review, cmd_report

        return cmd_access_review(args) if args.command == "access-review" else cmd_report(args)
    return EXIT_USAGE


def _print_problems(problems: list[str]) -> None:
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        from proxy.config import backend_node
        from proxy.tls import strictness_warning

        config, _, roles = load_everything(args.config)
    except ConfigError as exc:
        _print_problems(exc.problems)
        return EXIT_USAGE
    print(f"{config.path}: OK: listener {config.listener.address}:{config.listener.port}, "
          f"backend {backend_node(config.backend)}, "
          f"{len(roles)} roles, {len(config.identities)} identity rules"
          f"{_protection_summary(config)}")
    strictness = strictness_warning(config.listener)
    if strictness is not None:
        print(f"warning: {config.path}: {strictness}", file=sys.stderr)
    return EXIT_OK


def _protection_summary(config: Any) -> str:
    """check-config's words on [[protect]] and the keyring (ids only, never key material)."""
    rules = config.protection.rules
    cipher = config.encryption.cipher
    if not rules and cipher is None:
        return ""
    text = f", {len(rules)} protect rules ({sum(r.encrypt for r in rules)} encrypting)"
    if cipher is not None:
        text += (f", keyring {config.encryption.keyring}: primary {cipher.primary}, "
                 f"{len(cipher.key_ids)} keys")
    return text


def cmd_run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
        format="%(asctime)s phiproxy[%(process)d] %(levelname)s %(name)s: %(message)s")
    from proxy.workers import MAX_WORKERS, run_workers, worker_config

    if not 1 <= args.workers <= MAX_WORKERS:
        print(f"error: --workers {args.workers}: give 1 to {MAX_WORKERS}", file=sys.stderr)
        return EXIT_USAGE
    try:
        config, decide, roles = load_everything(args.config)
    except ConfigError as exc:
        _print_problems(exc.problems)
        return EXIT_USAGE
    if args.workers == 1:
        return _serve(args, config, decide, roles, reuse_port=False)
    return run_workers(args.workers, lambda index: _serve(
        args, worker_config(config, index), decide, roles, reuse_port=True))


def _serve(args: argparse.Namespace, config: Any, decide: Any, roles: dict[str, Any], *,
           reuse_port: bool) -> int:
    import uvloop

    from proxy.audit.chain import AuditError
    from proxy.server import ServerState, serve

    async def _main() -> int:
        state = ServerState(config, decide, roles, reuse_port=reuse_port)
        metrics_cfg = config.metrics
        try:
            state.metrics.start_http(metrics_cfg.address, metrics_cfg.port, state.readiness)
        except OSError as exc:
            print(f"error: {config.path}: [metrics] cannot listen on "
                  f"{metrics_cfg.address}:{metrics_cfg.port}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        try:
            return await serve(state)
        except AuditError as exc:  # the trail cannot be continued safely (see the message)
            print(f"error: {config.path}: [audit] {exc}", file=sys.stderr)
            return EXIT_USAGE
        finally:
            state.metrics.stop_http()

    try:
        return uvloop.run(_main())
    except OSError as exc:  # e.g. the port is taken
        print(f"error: {args.config}: [listener] cannot listen on "
              f"{config.listener.address}:{config.listener.port}: {exc}", file=sys.stderr)
        return EXIT_USAGE


def cmd_certs_dev(args: argparse.Namespace) -> int:
    from proxy.certs import write_dev_pki

    try:
        written = write_dev_pki(args.out, args.client)
    except ValueError as exc:
        print(f"error: --client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"error: --out {args.out}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for path in written:
        print(path)
    return EXIT_OK
