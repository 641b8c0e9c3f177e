"""Files of a trail: rotated names, reading its ends, finding a series on disk.

A trail `audit.jsonl` rotates to `audit.jsonl.1` (newest rotated) ... `audit.jsonl.N`
(oldest); `audit.jsonl.head` pins its end (see chain.py).
"""

from __future__ import annotations

import os
import re

HEAD_SUFFIX = ".head"
_ROTATED = re.compile(r"^(?P<base>.+)\.(?P<n>[1-9][0-9]*)$")
_CHUNK = 64 * 1024
_MAX_LINE = 64 * 1024 * 1024  # a record larger than this is not a record


def rotated(path: str, n: int) -> str:
    return path if n == 0 else f"{path}.{n}"


def head_path(path: str) -> str:
    return path + HEAD_SUFFIX


def split_rotated(path: str) -> tuple[str, int]:
    """('audit.jsonl', 3) for 'audit.jsonl.3'; (path, 0) for the current file."""
    found = _ROTATED.match(path)
    return (found["base"], int(found["n"])) if found else (path, 0)


def rotated_numbers(base: str) -> list[int]:
    """The suffixes N of the existing files `base.N`, ascending."""
    directory, name = os.path.split(base)
    try:
        entries = os.listdir(directory or ".")
    except OSError:
        return []
    numbers = []
    for entry in entries:
        if entry.startswith(name + "."):
            found = _ROTATED.match(entry)
            if found and found["base"] == name:
                numbers.append(int(found["n"]))
    return sorted(numbers)


def read_tail(path: str) -> tuple[bytes | None, bytes]:
    """(last complete line or None, bytes after the last newline) of a file.

    A missing file reads as (None, b""). The trailing fragment is non-empty only when the
    last write was torn (or the file was cut mid-line).
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, reads backwards
    except FileNotFoundError:
        return None, b""
    with f:
        size = os.fstat(f.fileno()).st_size
        end = size
        buf = b""
        while end > 0 and size - end <= _MAX_LINE:
            start = max(0, end - _CHUNK)
            f.seek(start)
            buf = f.read(end - start) + buf
            end = start
            last_nl = buf.rfind(b"\n")
            if last_nl >= 0 and (buf.rfind(b"\n", 0, last_nl) >= 0 or end == 0):
                break
        last_nl = buf.rfind(b"\n")
        if last_nl < 0:
            return None, buf
        fragment = buf[last_nl + 1:]
        prev_nl = buf.rfind(b"\n", 0, last_nl)
        return buf[prev_nl + 1:last_nl + 1], fragment


def read_first_line(path: str) -> bytes | None:
    """The first complete line of a file, None if it has none."""
    try:
        with open(path, "rb") as f:
            line = f.readline(_MAX_LINE)
    except OSError:
        return None
    return line if line.endswith(b"\n") else None


def discover(base: str) -> list[str]:
    """The series of `base` as on disk, oldest first: base.N ... base.1, base."""
    return [rotated(base, n) for n in reversed(rotated_numbers(base))] + [base]

