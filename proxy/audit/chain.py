"""The HMAC chain of the audit trail, and the head file that pins its end.

Record MAC: mac = hex(HMAC-SHA256(key, prev_ascii + line_before_mac)), where
line_before_mac is the exact line up to (not including) its `,"mac":"..."}` suffix; the
first record of a chain has prev = 64 zeros. Verification works on the bytes as written:
nothing is re-serialised, so no JSON library can change what is checked.

Head file (`<trail>.head` for a file trail; `[audit] head_file`, if set, for stdout or
syslog): 256 bytes holding the seq and mac of the last record written, the first seq of
the oldest file still kept, and an HMAC of those (its own domain, so a record MAC can
never pass as a head MAC). The writer (writer.py) rewrites it in place with one pwrite:
at open, once per event loop iteration that wrote records (every client read of the
iteration shares it), at close, and after every batch when there is no loop (tools).
So the head can lag the trail by one iteration's records; a crash in that window leaves
a file trail ahead of its head, which restart accepts and verify notes (only a head
ahead of the trail is an error). Standard output and syslog cannot be read back, so
there a restart continues the chain from the head itself.

Why a head file: a chain proves that no record was changed, inserted or removed between
two records, but not that records were cut off the end. The head names the end; without
the key nobody can forge a head that agrees with a shortened trail. Cost per rewrite:
one HMAC and one pwrite of 256 bytes into the page cache (the same page every time, no
growth, no fsync), a few µs. `first` catches the removal of the oldest rotated files.
Limits (documented): someone with write access can put back an *older* head they copied
earlier together with a trail cut at that point; ship the trail to a collector (syslog)
to defend against that.
"""

from __future__ import annotations

import hmac
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

try:  # the C object: its copy() is ~30% cheaper than hmac.HMAC's
    from _hashlib import hmac_new as _hmac_new  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover
    _hmac_new = None

GENESIS = b"0" * 64
MIN_KEY_BYTES = 32
MAC_SUFFIX = b',"mac":"'
MAC_SUFFIX_LEN = len(MAC_SUFFIX) + 64 + 3  # ,"mac":" + hex + "}\n
HEAD_SIZE = 256
_HEAD_DOMAIN = b"phiproxy-audit-head\x00"
_HEX64 = re.compile(rb"[0-9a-f]{64}")
_KEY_FIX = "e.g. head -c 32 /dev/urandom > {path} && chmod 600 {path}"


class AuditError(Exception):
    """The audit trail cannot be opened or used; the message says which file and what to do."""


def load_key(path: str | Path) -> bytes:
    """The HMAC key: the raw bytes of the file.

    A text key (printable ASCII, as written by `openssl rand -hex 32 > key`) loses its
    trailing newline; a binary key is used exactly as it is, so a random key ending in a
    newline byte stays 32 bytes. Fewer than 32 bytes of key is refused.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise AuditError(f"{path}: cannot read the audit key ({e.strerror}); "
                         f"check the path and that this user can read it") from None
    key = raw
    text = raw.rstrip(b"\r\n")
    if text and all(32 <= b < 127 or b == 9 for b in text):
        key = text
    fix = _KEY_FIX.format(path=path)
    if not key:
        raise AuditError(f"{path}: the audit key file is empty; fill it with a random key, "
                         f"{fix}")
    if len(key) < MIN_KEY_BYTES:
        raise AuditError(f"{path}: the audit key has {len(key)} bytes, fewer than "
                         f"{MIN_KEY_BYTES}; write a longer random key, {fix}")
    return key


class Mac:
    """HMAC-SHA256 with the key's pads computed once."""

    __slots__ = ("_base", "key")

    def __init__(self, key: bytes):
        self.key = key
        self._base = (_hmac_new(key, digestmod="sha256") if _hmac_new is not None
                      else hmac.new(key, digestmod="sha256"))

    def record(self, prev: bytes, before_mac: bytes) -> bytes:
        """The hex MAC (ASCII bytes) of a record, given its prev and its bytes before mac."""
        h = self._base.copy()
        h.update(prev)
        h.update(before_mac)
        return h.hexdigest().encode()

    def head(self, seq: int, mac: bytes, first: int) -> bytes:
        h = self._base.copy()
        h.update(_HEAD_DOMAIN + b"%d:%s:%d" % (seq, mac, first))
        return h.hexdigest().encode()


class Chain:
    """The chain's end in memory (last seq and mac; the head file is written from it).
    `seal` computes lines without committing them."""

    __slots__ = ("mac", "seq", "_mac")

    def __init__(self, key: bytes, seq: int = 0, mac: bytes = GENESIS):
        self._mac = Mac(key)
        self.seq = seq
        self.mac = mac

    def seal(self, ts: bytes, bodies: list[bytes]) -> tuple[list[bytes], int, bytes]:
        """The full lines for `bodies`, and the (seq, mac) they would leave as head.

        The caller commits with `advance` only once the lines are written, so a record that
        never reached the sink never becomes `prev`.
        """
        seq, mac = self.seq, self.mac
        record = self._mac.record  # the one definition of a record's MAC (verify uses it)
        lines = []
        stamp = b'{"ts":"' + ts + b'","seq":'
        for body in bodies:
            seq += 1
            before = b'%s%d,%s,"prev":"%s"' % (stamp, seq, body, mac)
            mac = record(mac, before)
            lines.append(b'%s,"mac":"%s"}\n' % (before, mac))
        return lines, seq, mac

    def advance(self, seq: int, mac: bytes) -> None:
        self.seq, self.mac = seq, mac


def split_line(line: bytes) -> tuple[bytes, bytes] | None:
    """(bytes before mac, mac) of a complete line, or None if it does not end as a record."""
    if len(line) < MAC_SUFFIX_LEN or not line.endswith(b'"}\n'):
        return None
    cut = len(line) - MAC_SUFFIX_LEN
    if line[cut:cut + len(MAC_SUFFIX)] != MAC_SUFFIX:
        return None
    mac = line[cut + len(MAC_SUFFIX):-3]
    return (line[:cut], mac) if _HEX64.fullmatch(mac) else None


@dataclass(frozen=True)
class LastRecord:
    seq: int
    mac: bytes
    prev: bytes


def check_line(mac: Mac, line: bytes) -> LastRecord:
    """Parse a complete record line and check its own MAC; raise ValueError saying why not."""
    parts = split_line(line)
    if parts is None:
        raise ValueError("not a complete record (no mac at its end)")
    try:
        record = json.loads(line)
    except ValueError as e:
        raise ValueError(f"malformed JSON ({e})") from None
    seq, prev = record.get("seq"), record.get("prev")
    if (not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(prev, str)
            or not _HEX64.fullmatch(prev.encode())):
        raise ValueError("malformed record (seq or prev missing or invalid)")
    if not hmac.compare_digest(mac.record(prev.encode(), parts[0]), parts[1]):
        raise ValueError("bad mac (record altered, or written with another key)")
    return LastRecord(seq, parts[1], prev.encode())


# --- head file --------------------------------------------------------------------------

@dataclass(frozen=True)
class Head:
    seq: int
    mac: bytes
    first: int  # seq of the first record of the oldest file kept; 0: unknown


def encode_head(mac: Mac, seq: int, last: bytes, first: int) -> bytes:
    text = b'{"seq":%d,"mac":"%s","first":%d,"hmac":"%s"}' % (
        seq, last, first, mac.head(seq, last, first))
    return text.ljust(HEAD_SIZE - 1) + b"\n"


def decode_head(mac: Mac, data: bytes) -> Head | None:
    """The head in `data` (None if empty); ValueError saying what is wrong."""
    if not data:  # created but never written (the writer creates it to lock it)
        return None
    try:
        doc = json.loads(data)
        seq, last, first, tag = doc["seq"], doc["mac"].encode(), doc["first"], doc["hmac"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError("unreadable (not a head record)") from None
    if not (isinstance(seq, int) and isinstance(first, int) and _HEX64.fullmatch(last)):
        raise ValueError("unreadable (bad fields)")
    if not hmac.compare_digest(mac.head(seq, last, first), str(tag).encode()):
        raise ValueError("bad hmac (altered, or written with another key)")
    return Head(seq, last, first)


def read_head(mac: Mac, path: str) -> Head | None:
    """The head stored at `path`, None if there is none; ValueError if it is bad."""
    try:
        with open(path, "rb") as f:
            data = f.read(HEAD_SIZE * 4)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"cannot be read ({e.strerror})") from None
    return decode_head(mac, data)


def open_head(path: str) -> int:
    """An fd for rewriting the head in place (0600, created if missing)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
