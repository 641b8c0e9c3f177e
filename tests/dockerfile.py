"""Reads the repository's Dockerfile into instructions, for the tests that check what it
promises (tests/unit/test_deploy_examples.py) and run its HEALTHCHECK against a live proxy
(tests/integration/test_packaging.py)."""

from __future__ import annotations

import json
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, `\\` continuations joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        whole = (pending + line.strip()).strip()
        pending = ""
        if whole:
            name, _, args = whole.partition(" ")
            result.append((name.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


def stages(path: Path = DOCKERFILE) -> list[list[tuple[str, str]]]:
    """The instructions of each stage (a FROM opens one); what comes before the first FROM
    (global ARGs) is stage 0's prelude and is dropped."""
    found: list[list[tuple[str, str]]] = []
    for name, args in instructions(path):
        if name == "FROM":
            found.append([])
        if found:
            found[-1].append((name, args))
    return found


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument list; shell form is refused: it needs a shell and
    hides the argv."""
    argv = json.loads(args)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), args
    return argv


def healthcheck_argv(path: Path = DOCKERFILE) -> list[str]:
    """The command of the final stage's HEALTHCHECK (its --interval etc. options skipped)."""
    checks = [args for name, args in stages(path)[-1] if name == "HEALTHCHECK"]
    assert len(checks) == 1, "the final stage has no HEALTHCHECK"
    _, _, command = checks[0].partition(" CMD ")
    assert command, f"HEALTHCHECK without CMD: {checks[0]}"
    return exec_form(command.strip())


def env(path: Path = DOCKERFILE) -> dict[str, str]:
    """The final stage's ENV (KEY=value pairs, unquoted values)."""
    found: dict[str, str] = {}
    for name, args in stages(path)[-1]:
        if name == "ENV":
            for pair in args.split():
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {args}: write KEY=value"
                found[key] = value
    return found
