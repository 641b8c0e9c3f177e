"""A small seeded mutator for the in-pytest run: same inputs on every machine and run.

atheris mutates with coverage feedback in the long runs (bench/fuzz.py); here a fixed
seed replays a fixed set of byte-level mutations of the seed corpus, so a failure is
reproducible from its index.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

CORPUS = Path(__file__).parent / "corpus"

# Bytes that matter to RESP and TOML framing, spliced in more often than random bytes.
_INTERESTING = [b"\r\n", b"\r", b"\n", b"*", b"$", b"-1", b"0", b"\x00", b"*\x00", b"$\x00",
                b"9223372036854775807", b"-9223372036854775808", b"2147483648", b'"', b"'",
                b"\\", b"[", b"]", b"=", b"{", b"}", b"(", b")", b"~", b"%", b"|", b">", b"_"]


def corpus(target: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / target).iterdir()) if p.is_file()]


def mutate(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        at = rng.randint(0, len(buf))
        if op == 0 and buf:  # flip a byte
            buf[min(at, len(buf) - 1)] = rng.randrange(256)
        elif op == 1:  # insert something interesting
            buf[at:at] = rng.choice(_INTERESTING)
        elif op == 2 and buf:  # delete a run
            del buf[at : at + rng.randint(1, 8)]
        elif op == 3:  # duplicate a slice
            end = min(len(buf), at + rng.randint(1, 32))
            buf[at:at] = buf[at:end]
        elif op == 4:  # splice from another seed
            other = rng.choice(pool)
            s = rng.randint(0, len(other))
            buf[at:at] = other[s : s + rng.randint(1, 64)]
        elif op == 5:  # truncate
            del buf[at:]
        else:  # change a digit run
            digits = [i for i, c in enumerate(buf) if 48 <= c <= 57]
            if digits:
                buf[rng.choice(digits)] = rng.choice(b"0123456789")
    return bytes(buf)


def inputs(target: str, count: int, seed: int = 1234) -> Iterator[tuple[str, bytes]]:
    """The corpus, then `count` mutations of it: (label, data)."""
    pool = corpus(target)
    for n, data in enumerate(pool):
        yield f"seed-{n}", data
    rng = random.Random(seed)
    for n in range(count):
        yield f"mutation-{n}", mutate(rng.choice(pool), rng, pool)
