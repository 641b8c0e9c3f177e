"""The audit trail of a configuration, verified and read: every trail (the configured file,
its rotated files, the per-worker trails of `--workers N`), each checked with the same code
as `phiproxy audit verify` before its records are used. A broken chain does not stop the
review: it is reported, and the numbers drawn from that trail are marked as such."""

from __future__ import annotations

import json
import os
import re
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from proxy.audit.chain import AuditError, load_key
from proxy.audit.target import is_syslog
from proxy.audit.verify import Broken, UsageError, group_trails, plan, verify
from proxy.config import Config

_SINCE = re.compile(r"^([1-9][0-9]*)([dhm])$")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def parse_since(text: str) -> timedelta:
    """"30d", "12h", "90m" -> a timedelta; ValueError names the argument."""
    found = _SINCE.match(text.strip())
    if not found:
        raise ValueError(f"--since {text!r}: give a count and a unit, e.g. 30d, 12h or 90m")
    return timedelta(**{_UNITS[found.group(2)]: int(found.group(1))})


def parse_ts(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        return None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


@dataclass
class TrailCheck:
    """The verification of one trail (one chain)."""

    name: str  # the trail's current file (or the first file given)
    files: list[str]
    verified: bool | None  # None: could not be checked (no key)
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    where: str | None = None  # the first broken record
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"trail": self.name, "files": self.files, "verified": self.verified,
                "records": self.records, "first_seq": self.first_seq,
                "last_seq": self.last_seq, "broken_at": self.where, "problem": self.problem,
                "notes": self.notes}


Consumer = Callable[[dict[str, Any]], None]


@dataclass
class Trail:
    """The verified trail of a configuration; `scan` reads the records of the window once,
    streaming, and hands each to the consumers (a record is a dict with `_ts` added). The
    counts, the event tally and every record's time (for gaps) are kept here."""

    source: str
    since: datetime
    until: datetime
    checks: list[TrailCheck] = field(default_factory=list)
    records_in_window: int = 0
    total_records: int = 0  # in the files, whatever their time
    unreadable_lines: int = 0
    unavailable: str | None = None  # why nothing could be read
    events: Counter[str] = field(default_factory=Counter)
    stamps: array = field(default_factory=lambda: array("d"))  # POSIX seconds, file order
    lifecycle: list[dict[str, Any]] = field(default_factory=list)  # start, stop, reload

    @property
    def broken(self) -> bool:
        return any(check.verified is False for check in self.checks)

    @property
    def verified(self) -> bool:
        return bool(self.checks) and all(check.verified for check in self.checks)

    def status(self) -> str:
        """"verified", "broken", "not verified" or "unavailable"."""
        if self.unavailable is not None:
            return "unavailable"
        if self.broken:
            return "broken"
        return "verified" if self.verified else "not verified"

    def scan(self, consumers: Sequence[Consumer]) -> None:
        """One pass over every file of every trail (memory stays flat: ~8 bytes a record)."""
        for check in self.checks:
            for path in check.files:
                self._read(path, consumers)

    def _read(self, path: str, consumers: Sequence[Consumer]) -> None:
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except OSError:
            return  # reported by the verification
        since, until = self.since, self.until
        with f:
            for line in f:
                if not line.endswith(b"\n"):
                    self.unreadable_lines += 1  # a torn last line
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    self.unreadable_lines += 1
                    continue
                ts = parse_ts(record.get("ts")) if isinstance(record, dict) else None
                if ts is None:
                    self.unreadable_lines += 1
                    continue
                self.total_records += 1
                if not since <= ts <= until:
                    continue
                record["_ts"] = ts
                self.records_in_window += 1
                event = str(record.get("event"))
                self.events[event] += 1
                self.stamps.append(ts.timestamp())
                if event in ("start", "stop", "reload"):
                    self.lifecycle.append(record)
                for consume in consumers:
                    consume(record)


def read_trail(config: Config, since: timedelta, *, now: datetime | None = None) -> Trail:
    """Verify every trail of `config`, for the records of the last `since` (`Trail.scan`)."""
    until = now or datetime.now(UTC)
    trail = Trail(config.audit.path, until - since, until)
    path = config.audit.path
    if path == "-" or is_syslog(path):
        trail.unavailable = (f"[audit] path = {path!r}: the trail is kept by its collector, "
                             "not on this machine's disk")
        return trail
    groups = group_trails([path])
    groups = [g for g in groups if any(os.path.exists(p) for p in g)]
    if not groups:
        trail.unavailable = f"{path} does not exist (the proxy has not written a trail yet)"
        return trail
    key: bytes | None = None
    key_problem = "[audit] key_file is not set"
    if config.audit.key_file is not None:
        try:
            key = load_key(config.audit.key_file)
        except AuditError as exc:
            key_problem = str(exc)
    for group in groups:
        trail.checks.append(_verify(group, key, key_problem))
    return trail


def _verify(group: list[str], key: bytes | None, key_problem: str) -> TrailCheck:
    try:
        order, _ = plan(group)
    except UsageError as exc:
        return TrailCheck(group[0], group, False, where=group[0], problem=str(exc))
    check = TrailCheck(order[-1], order, None)
    if key is None:
        check.problem = f"not verified: {key_problem}"
        return check
    try:
        report = verify(group, key)
    except Broken as exc:
        check.verified, check.where, check.problem = False, exc.where, exc.problem
        return check
    except UsageError as exc:
        check.verified, check.where, check.problem = False, group[0], str(exc)
        return check
    check.verified = True
    check.records, check.first_seq, check.last_seq = (report.records, report.first_seq,
                                                      report.last_seq)
    check.notes = report.notes
    return check
