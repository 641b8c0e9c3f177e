"""What the harnesses share: reading fuzz input, and running one under atheris."""

from __future__ import annotations

import random
import shlex
import sys
from collections.abc import Iterator


def chunks(data: bytes, seed: int) -> Iterator[bytes]:
    """data cut at points drawn from seed (sizes 1..~2x the mean, some whole-rest)."""
    rng = random.Random(seed)
    mean = rng.choice((1, 2, 3, 7, 16, 64, 1 << 20))
    pos = 0
    while pos < len(data):
        size = rng.randint(1, 2 * mean)
        yield data[pos : pos + size]
        pos += size


TARGETS = ("request", "reply", "acl", "glob", "config")


def run_atheris(target: str, argv: list[str]) -> None:
    """Fuzz one target's check() under atheris with libFuzzer flags from argv.

    The proxy package is instrumented for coverage (imported inside the hook, so the
    harness must be imported here first); the harness and its reference are not.
    """
    import importlib

    import atheris

    with atheris.instrument_imports(include=["proxy"]):
        module = importlib.import_module(f"tests.fuzz.fuzz_{target}")
    # libFuzzer re-runs argv[0] through the shell for -merge, -fork and -jobs: make it the
    # command that runs this harness again.
    again = f"{shlex.quote(sys.executable)} -m tests.fuzz {target}"
    atheris.Setup([again, *argv], module.check)
    atheris.Fuzz()
