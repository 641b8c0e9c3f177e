"""`phiproxy keys new|add|rewrap` (SPEC §2, §9).

The rewrap audit record and a running proxy: a file trail (and a head_file) is locked by
the proxy that writes it (flock on its head: two writers would interleave two chains into a
broken one). So rewrap appends its `rewrap` record to the configured trail, continuing its
chain, when no proxy holds it; while one does, it writes the record to the companion trail
`<name>.keys<suffix>` next to it (audit.jsonl -> audit.keys.jsonl): a chain of its own under
the same key, verified with `phiproxy audit verify` like the main one. Where the record
went is printed. The trail is tried before the run: a run that could not be audited is not
started.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import fcntl
import getpass
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.audit.chain import AuditError
from proxy.audit.record import AuditRecords
from proxy.audit.target import is_syslog
from proxy.config import AuditConfig, Config, ConfigError, load_config
from proxy.protect.keyring import KeyringError, add_key, create_keyring

if TYPE_CHECKING:
    from proxy.protect.rewrap import Counts

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_arguments(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="data-encryption keyring (SPEC §9)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    new = keys_sub.add_parser("new", help="create a keyring (0600) with one primary key")
    new.add_argument("--out", required=True, type=Path, help="the keyring file to create")
    add = keys_sub.add_parser("add", help="add a new key to the configured keyring and make "
                                          "it primary (SIGHUP makes it live)")
    add.add_argument("-c", "--config", required=True, type=Path)
    rewrap = keys_sub.add_parser(
        "rewrap", help="re-encrypt stored protected values under the primary key, online",
        description="Exit 0: every value is under the primary (or left in a stream with "
                    "consumer groups); 1: values that do not decrypt were left; 2: bad "
                    "configuration, or the backend or audit trail cannot be used.")
    rewrap.add_argument("-c", "--config", required=True, type=Path)
    rewrap.add_argument("--pattern", metavar="GLOB",
                        help="only keys matching GLOB (Redis glob syntax)")
    rewrap.add_argument("--dry-run", action="store_true",
                        help="change nothing; report what would be rewrapped")


def cmd_keys(args: argparse.Namespace) -> int:
    if args.keys_command == "new":
        return _new(args.out)
    if args.keys_command == "add":
        return _add(args.config)
    return _rewrap(args)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _new(out: Path) -> int:
    try:
        out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_id = create_keyring(out)
    except FileExistsError:
        return _error(f"--out {out}: the file exists and is never overwritten (it may hold the "
                      "only copy of keys that stored values need); to rotate, use: phiproxy "
                      "keys add -c CONFIG")
    except OSError as exc:
        return _error(f"--out {out}: {exc.strerror or exc}")
    print(f"{out}: new keyring (mode 0600), primary key {key_id}. Back it up somewhere safe: "
          "values encrypted under its keys cannot be read without it. Then set [encryption] "
          f'keyring = "{out}" in the configuration.')
    return EXIT_OK


def _load(path: Path) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return None


def _add(path: Path) -> int:
    config = _load(path)
    if config is None:
        return EXIT_USAGE
    keyring = config.encryption.keyring
    if keyring is None:
        return _error(f"{config.path}: [encryption] keyring is not set; create one with "
                      "phiproxy keys new --out secrets/keyring.json and set it there")
    try:
        key_id, kept = add_key(keyring)
    except KeyringError as exc:
        return _error(f"{config.path}: [encryption] keyring: {exc}")
    except OSError as exc:
        return _error(f"{config.path}: [encryption] keyring {keyring}: cannot write it "
                      f"({exc.strerror or exc}); the directory must be writable by this user")
    print(f"{keyring}: added key {key_id} as primary (kept {', '.join(kept)}). Send SIGHUP to "
          "every phiproxy process that uses this keyring (new writes then use the new key; "
          "check their `reload` audit records), then move stored values to it with: phiproxy "
          f"keys rewrap -c {path}")
    return EXIT_OK


# --- rewrap -----------------------------------------------------------------------------

def companion_trail(audit: AuditConfig) -> AuditConfig:
    """Where rewrap writes its record while a proxy holds the configured trail."""
    if audit.path != "-" and not is_syslog(audit.path):
        base = Path(audit.path)
    else:  # stdout or syslog: the head file's directory
        base = Path(audit.head_file or "audit.jsonl").with_suffix(".jsonl")
    return dataclasses.replace(audit, path=str(base.with_name(f"{base.stem}.keys{base.suffix}")),
                               head_file=None)


def _held_by_another(audit: AuditConfig) -> bool:
    """Whether another process holds the trail's head lock (a running proxy)."""
    from proxy.audit import files

    head = audit.head_file if audit.path == "-" or is_syslog(audit.path) else \
        files.head_path(audit.path)
    if head is None:
        return False
    try:
        fd = os.open(head, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


async def _append(audit: AuditConfig, body: Callable[[AuditRecords], bytes] | None) -> str:
    """Open the trail, write the record (None: only check it can be), close; where it went."""
    from proxy.audit.writer import AuditWriter

    writer = AuditWriter(audit)
    writer.open()
    try:
        if body is not None:
            if not writer.write_one(body(writer.records)):
                raise AuditError(f"{audit.path}: the rewrap record could not be written")
            await writer.drain()
        where = f"{audit.path} (seq {writer.seq})"
    finally:
        writer.close()
    return where


async def audit_record(audit: AuditConfig, body: Callable[[AuditRecords], bytes] | None) -> str:
    """Append to the configured trail, or to its companion while a proxy holds it."""
    try:
        return await _append(audit, body)
    except AuditError:
        if not _held_by_another(audit):
            raise
    where = await _append(companion_trail(audit), body)
    return f"{where}, the companion of {audit.path}, which a running phiproxy holds"


def _rewrap(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    if not any(rule.encrypt for rule in config.protection.rules):
        return _error(f"{config.path}: no [[protect]] rule has encrypt = true, so no stored "
                      "value is encrypted; nothing to rewrap")
    return asyncio.run(_rewrap_async(config, args.pattern, args.dry_run))


async def _rewrap_async(config: Config, pattern: str | None, dry_run: bool) -> int:
    from proxy.protect.rewrap import Counts, RewrapError, default_progress, rewrap

    cipher = config.encryption.cipher
    assert cipher is not None
    try:
        await audit_record(config.audit, None)  # a run that cannot be audited is not started
    except AuditError as exc:
        return _error(f"{config.path}: [audit] {exc}")
    progress = default_progress()
    reason = None
    counts = None
    try:
        counts = await rewrap(config, dry_run=dry_run, pattern=pattern, progress=progress)
    except (RewrapError, OSError, TimeoutError) as exc:
        reason = f"stopped: {exc or type(exc).__name__}"
    finally:
        if progress is not None:
            progress.done()
    done = counts or Counts()
    by = {"user": _user(), "host": socket.gethostname(), "pid": os.getpid()}
    ok = reason is None and not done.undecryptable and not done.busy
    try:
        where = await audit_record(config.audit, lambda records: records.rewrap(
            ok=ok, dry_run=dry_run, primary=cipher.primary, pattern=pattern,
            counts=done.as_dict(), by=by, reason=reason))
    except AuditError as exc:
        print(f"error: {config.path}: [audit] the rewrap record could not be written: {exc}",
              file=sys.stderr)
        where = None
    _report(config, done, dry_run, cipher.primary)
    if where is not None:
        print(f"audit: rewrap record written to {where}")
    if reason is not None:
        return _error(f"{config.path}: [backend] rewrap {reason}; values done so far are "
                      "rewrapped, run it again to finish")
    if where is None:
        return EXIT_FAILED
    return EXIT_OK if ok else EXIT_FAILED


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def _report(config: Config, c: Counts, dry_run: bool, primary: str) -> None:
    verb = "would rewrap" if dry_run else "rewrapped"
    print(f"{'dry run: ' if dry_run else ''}primary key {primary}: {c.keys} protected keys "
          f"read; {verb} {c.rewrapped} values in {c.keys_changed} keys; {c.current} already "
          "under the primary")
    if c.undecryptable:
        print(f"left as they are, undecryptable: {c.undecryptable} values ({c.not_ciphertext} "
              f"not ciphertext (written before protection?), {c.tampered} tampered or copied "
              f"from another key, {c.unknown_key} under a key id the keyring does not have)")
    if c.streams_with_groups:
        print(f"left: {c.streams_with_groups} streams with consumer groups ({c.stream_values_left}"
              " values under old keys): keep those keys in the keyring until the entries are "
              "trimmed (XTRIM) or the stream is deleted")
    if c.other_types:
        print(f"{c.other_types} keys hold sets, sorted sets or other types: nothing to rewrap")
    if c.retries or c.busy:
        print(f"{c.retries} keys read again after a concurrent write; {c.busy} left after "
              "too many concurrent writes (run rewrap again)")
