"""`phiproxy audit verify FILE... --key-file KEY`: check a trail's HMAC chain.

Which files: each FILE that is a current trail (`audit.jsonl`, no numeric suffix) brings
its rotated siblings `audit.jsonl.N ... .1` found on disk; a rotated file given by name
(`audit.jsonl.3`) is checked as given. The files are put in chain order (oldest first,
the current file last) whatever the order on the command line, so `audit.jsonl*` works;
`.head` and `.torn-*` files in the list are skipped. The numbers must be contiguous: a
missing `audit.jsonl.2` between `.3` and `.1` is reported.

Several trails: the configured path also brings the trails `phiproxy run --workers N` writes
beside it (`audit.w1.jsonl`, `audit.w2.jsonl`, ...; they stand in for `audit.jsonl` when it
does not exist), and files of different trails may be given together. Each trail is its
own chain and is checked on its own; exit 0 only if every one verifies.

What is checked, record by record: a complete line, JSON, the field order of SPEC §6, the
MAC over the exact bytes, seq = previous seq + 1, prev = previous mac, and prev = 64 zeros
for seq 1. A series may start after seq 1 (older files rotated away). Then the head file
(`<current>.head`, or --head FILE) when the series includes the current file: its own HMAC,
that the trail reaches the seq it names with the same mac (else records were cut off the
end) and that the series starts where the head says the oldest kept file starts (else
rotated files are missing). A trail without a head file (a collector's copy, standard
output) is checked with --no-head.

Exit 0: all good (prints the count); 1: the first broken record is printed (file, line,
seq, what is wrong); 2: bad usage (no key, missing file argument).
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy.audit import files
from proxy.audit.chain import GENESIS, AuditError, Head, Mac, load_key, read_head, split_line

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
COMMON_FIELDS = ["ts", "seq", "event", "environment", "instance", "conn", "src", "identity",
                 "role"]


class UsageError(Exception):
    pass


class Broken(Exception):
    """The first broken record: where and what."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


@dataclass
class Report:
    records: int = 0
    files: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    notes: list[str] = field(default_factory=list)


def worker_trails(path: str) -> list[str]:
    """The trails `phiproxy run --workers N` writes for the configured trail `path`
    (`audit.jsonl` -> `audit.w1.jsonl`, `audit.w2.jsonl`, ...), by worker number."""
    directory, name = os.path.split(path)
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, ""
    pattern = re.compile(re.escape(stem) + r"\.w([1-9][0-9]*)" + (re.escape("." + suffix)
                                                                 if suffix else "") + "$")
    found = []
    try:
        entries = os.listdir(directory or ".")
    except OSError:
        return []
    for entry in entries:
        match = pattern.match(entry)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, entry)))
    return [trail for _, trail in sorted(found)]


def group_trails(arguments: Sequence[str]) -> list[list[str]]:
    """The arguments split into trails (a trail: one file and its rotated siblings).

    A configured trail path also brings the per-worker trails of `--workers N` next to
    it; when only those exist (the proxy always ran with workers), they stand in for it.
    """
    groups: dict[str, list[str]] = {}
    for argument in map(os.path.normpath, arguments):
        name = os.path.basename(argument)
        if name.endswith(files.HEAD_SUFFIX) or ".torn-" in name:
            continue
        base, number = files.split_rotated(argument)
        if number == 0:
            workers = worker_trails(argument)
            for trail in workers:
                groups.setdefault(trail, []).append(trail)
            if workers and not os.path.isfile(argument):
                continue
        groups.setdefault(base, []).append(argument)
    return list(groups.values())


def plan(arguments: Sequence[str]) -> tuple[list[str], str | None]:
    """The files to check in chain order, and the current file if it is among them."""
    chosen: dict[str, int] = {}
    bases = set()
    for argument in map(os.path.normpath, arguments):
        name = os.path.basename(argument)
        if name.endswith(files.HEAD_SUFFIX) or ".torn-" in name:
            continue
        base, number = files.split_rotated(argument)
        bases.add(base)
        if number == 0:
            if not os.path.isfile(argument):
                raise UsageError(f"{argument}: no such file; give the audit trail's path "
                                 f"(e.g. audit/audit.jsonl)")
            for path in files.discover(argument):
                chosen[path] = files.split_rotated(path)[1]
        elif not os.path.isfile(argument):
            raise UsageError(f"{argument}: no such file")
        else:
            chosen[argument] = number
    if not chosen:
        raise UsageError("no audit file given; e.g. phiproxy audit verify audit/audit.jsonl "
                         "--key-file secrets/audit.key")
    if len(bases) > 1:
        raise UsageError("these files belong to different trails (" + ", ".join(sorted(bases))
                         + "); verify one trail at a time")
    base = bases.pop()
    order = sorted(chosen, key=lambda p: (chosen[p] == 0, -chosen[p]))
    return order, (base if base in chosen else None)


def _check_contiguous(order: list[str]) -> None:
    """Oldest first, each file's number is one less than the one before (.3, .2, .1, base)."""
    numbers = [files.split_rotated(p)[1] for p in order]
    base = files.split_rotated(order[0])[0]
    for older, newer, path in zip(numbers, numbers[1:], order[1:], strict=False):
        if newer != older - 1:
            missing = files.rotated(base, older - 1)
            raise Broken(missing, f"missing file in series: {missing} is not there (between "
                                  f"{files.rotated(base, older)} and {path}); records were "
                                  "removed")


class _Checker:
    def __init__(self, key: bytes, head: Head | None):
        self.mac = Mac(key)
        self.head = head
        self.head_seen: bytes | None = None  # mac of the record at head.seq, when reached
        self.next_seq: int | None = None
        self.prev: bytes | None = None
        self.report = Report()

    def check_file(self, path: str) -> None:
        self.report.files += 1
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as e:
            raise Broken(path, f"cannot be read ({e.strerror})") from None
        with f:
            for number, line in enumerate(f, 1):
                self.check_line(f"{path}:{number}", line)

    def check_line(self, where: str, line: bytes) -> None:
        if not line.endswith(b"\n"):
            raise Broken(where, f"torn last line: {len(line)} bytes without a newline (a crash "
                                "during a write, or the file was cut in the middle of a record)")
        try:
            record = json.loads(line)
        except ValueError as e:
            raise Broken(where, f"malformed JSON ({e})") from None
        if not isinstance(record, dict):
            raise Broken(where, "malformed record: not a JSON object")
        seq, prev = record.get("seq"), record.get("prev")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise Broken(where, "malformed record: no integer seq")
        where = f"{where}: seq {seq}"
        names = list(record)
        if names[:len(COMMON_FIELDS)] != COMMON_FIELDS or names[-2:] != ["prev", "mac"]:
            raise Broken(where, "malformed record: fields missing or out of order")
        parts = split_line(line)
        if parts is None or not isinstance(prev, str) or len(prev) != 64:
            raise Broken(where, "malformed record: prev or mac is not 64 hex digits")
        before, mac = parts
        prev_b = prev.encode()
        if not hmac.compare_digest(self.mac.record(prev_b, before), mac):
            raise Broken(where, "bad mac: the record was altered, or forged without the key "
                                "(or the key is not the one that wrote it)")
        if self.next_seq is None:
            if seq == 1 and prev_b != GENESIS:
                raise Broken(where, "prev mismatch: the first record of a chain must have "
                                    "prev = 64 zeros")
            if seq != 1:
                self.report.notes.append(f"the series starts at seq {seq} (earlier records "
                                         "are in files rotated away)")
            self.report.first_seq = seq
        else:
            if seq != self.next_seq:
                what = ("records are missing before it" if seq > self.next_seq
                        else "a record is repeated or out of order")
                raise Broken(where, f"seq gap: seq {seq} where {self.next_seq} was expected: "
                                    f"{what}")
            if prev_b != self.prev:
                raise Broken(where, "prev mismatch: prev is not the mac of the record before "
                                    "(a record was removed, inserted or reordered)")
        if self.head is not None and seq == self.head.seq:
            self.head_seen = mac
        self.next_seq = seq + 1
        self.prev = mac
        self.report.records += 1
        self.report.last_seq = seq

    def check_head(self, head_path: str, last_where: str) -> None:
        head, report = self.head, self.report
        assert head is not None
        last = report.last_seq or 0
        if head.seq > last:
            raise Broken(last_where, f"truncated tail: the trail ends at seq {last} but "
                                     f"{head_path} says seq {head.seq} was written: records "
                                     "were removed from the end")
        first = report.first_seq
        if head.first and first is not None and first > head.first:
            raise Broken(last_where, f"missing file in series: the files start at seq {first} "
                                     f"but {head_path} says the oldest kept record is seq "
                                     f"{head.first}: the oldest file(s) were removed")
        if head.seq and first is not None and head.seq < first:
            raise Broken(head_path, f"the head file names seq {head.seq}, before the first "
                                    f"record checked (seq {first}): an old head file, or the "
                                    "wrong files")
        if head.seq and first is not None and self.head_seen != head.mac:
            raise Broken(head_path, f"the record at seq {head.seq} is not the one the head "
                                    "file names: records were replaced")
        if head.seq < last:
            report.notes.append(f"the head file is {last - head.seq} record(s) behind the "
                                "trail (the proxy stopped between a write and the head "
                                "update): accepted")


def verify(arguments: Sequence[str], key: bytes, *, head_file: str | None = None,
           no_head: bool = False) -> Report:
    """Check a trail; raise Broken for the first problem, UsageError for bad arguments."""
    order, current = plan(arguments)
    head_path = head_file or (files.head_path(current) if current and not no_head else None)
    head = None
    mac = Mac(key)
    if head_path is not None:
        try:
            head = read_head(mac, head_path)
        except ValueError as e:
            raise Broken(head_path, f"head file {e}") from None
        if head is None:
            raise Broken(head_path, "head file missing, so records cut off the end could not "
                                    "be detected; for a trail that has none (a collector's "
                                    "copy, standard output) pass --no-head")
    _check_contiguous(order)
    checker = _Checker(key, head)
    last_where = order[-1]
    for path in order:
        checker.check_file(path)
        if checker.report.last_seq is not None:
            last_where = f"{path}: seq {checker.report.last_seq}"
    if head is not None:
        assert head_path is not None
        checker.check_head(head_path, f"{last_where} (last record)")
    return checker.report


def cmd_audit_verify(args: argparse.Namespace) -> int:
    try:
        key = load_key(args.key_file)
    except AuditError as e:
        print(f"error: --key-file {e}", file=sys.stderr)
        return EXIT_USAGE
    head_file = getattr(args, "head", None)
    no_head = getattr(args, "no_head", False)
    trails = group_trails(args.files)
    if len(trails) > 1 and head_file is not None:
        print("error: --head names the head file of one trail; these files belong to "
              f"{len(trails)} trails: verify them one at a time", file=sys.stderr)
        return EXIT_USAGE
    if len(trails) <= 1:
        return _verify_one(args.files, key, head_file, no_head, label="")
    # Several trails (e.g. one per worker): each is a chain of its own; all must verify.
    failed = 0
    for trail in trails:
        code = _verify_one(trail, key, None, no_head, label=f"{trail[0]}: ")
        if code == EXIT_USAGE:
            return code
        failed += code != EXIT_OK
    if failed:
        print(f"FAILED: {failed} of {len(trails)} trails do not verify")
        return EXIT_FAILED
    print(f"OK: all {len(trails)} trails verify")
    return EXIT_OK


def _verify_one(files_: Sequence[str], key: bytes, head_file: str | None, no_head: bool,
                label: str) -> int:
    try:
        report = verify(files_, key, head_file=head_file, no_head=no_head)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Broken as e:
        print(f"{label}FAILED {e.where}: {e.problem}")
        return EXIT_FAILED
    for note in report.notes:
        print(f"{label}note: {note}")
    span = (f" (seq {report.first_seq}..{report.last_seq})" if report.records else "")
    print(f"{label}OK: {report.records} records{span} in {report.files} file(s)")
    return EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="the trail (its rotated files and per-worker trails are found), "
                             "or files of one or more trails")
    parser.add_argument("--key-file", required=True, help="the HMAC key ([audit] key_file)")
    parser.add_argument("--head", metavar="FILE", help="head file (default: FILE.head)")
    parser.add_argument("--no-head", action="store_true",
                        help="no head file (a collector's copy): the end is not checked")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phiproxy audit verify",
                                     description="Check an audit trail's HMAC chain.")
    add_arguments(parser)
    return cmd_audit_verify(parser.parse_args(argv))
