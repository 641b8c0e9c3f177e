"""Framer throughput: phiproxy's RESP framers beside hiredis.Reader on the same bytes.

    .venv/bin/python bench/bench_framer.py

Prints commands (or replies) per second for a 10,000-command pipelined GET/SET buffer
parsed in one feed, the same buffer cut in 16 KiB chunks (what a socket delivers), and
the replies such a pipeline gets back. hiredis builds Python objects for every value;
the reply framer only finds boundaries, so the ratio there is not like for like.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import hiredis

from proxy.resp.reply import ReplyFramer
from proxy.resp.request import RequestFramer, encode_command

N = 10_000
CHUNK = 16 * 1024


def best_of(fn: Callable[[], int], repeat: int = 15) -> float:
    """Best wall time of fn() over `repeat` runs (the least disturbed one)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def hiredis_count(chunks: list[bytes]) -> int:
    reader = hiredis.Reader()
    got = 0
    for chunk in chunks:
        reader.feed(chunk)
        while reader.gets() is not False:
            got += 1
    return got


def request_count(chunks: list[bytes]) -> int:
    framer = RequestFramer()
    return sum(len(framer.feed(chunk)) for chunk in chunks)


def reply_count(chunks: list[bytes]) -> int:
    framer = ReplyFramer()
    return sum(len(framer.feed(chunk)) for chunk in chunks)


def chunked(buf: bytes, size: int) -> list[bytes]:
    return [buf[i : i + size] for i in range(0, len(buf), size)]


def report(label: str, ours: Callable[[], int], theirs: Callable[[], int]) -> None:
    assert ours() == theirs() == N, (ours(), theirs())
    t_ours, t_theirs = best_of(ours), best_of(theirs)
    print(
        f"{label:<34} phiproxy {N / t_ours / 1e6:5.2f} M/s   "
        f"hiredis {N / t_theirs / 1e6:5.2f} M/s   ratio {t_theirs / t_ours:4.2f}"
    )


def main() -> None:
    commands = []
    replies = []
    for i in range(N // 2):
        key = b"key:%08d" % i
        commands.append([b"SET", key, b"v" * 64])
        commands.append([b"GET", key])
        replies.append(b"+OK\r\n")
        replies.append(b"$64\r\n" + b"v" * 64 + b"\r\n")
    requests = b"".join(encode_command(argv) for argv in commands)
    answers = b"".join(replies)
    assert RequestFramer().feed(requests) == commands

    print(f"{N} pipelined GET/SET: requests {len(requests)} B, replies {len(answers)} B")
    for label, chunks in (("one feed", [requests]), (f"{CHUNK // 1024} KiB chunks", None)):
        chunks = chunks or chunked(requests, CHUNK)
        report(
            f"requests, {label}",
            lambda chunks=chunks: request_count(chunks),
            lambda chunks=chunks: hiredis_count(chunks),
        )
    for label, chunks in (("one feed", [answers]), (f"{CHUNK // 1024} KiB chunks", None)):
        chunks = chunks or chunked(answers, CHUNK)
        report(
            f"replies, {label}",
            lambda chunks=chunks: reply_count(chunks),
            lambda chunks=chunks: hiredis_count(chunks),
        )
    best = best_of(lambda: [encode_command(argv) for argv in commands])
    print(f"{'encode_command':<34} phiproxy {N / best / 1e6:5.2f} M/s")


if __name__ == "__main__":
    main()
