"""keys rewrap pieces that need no server: progress on a terminal, the companion trail."""

from __future__ import annotations

import io
import sys

import pytest

from proxy.config import AuditConfig
from proxy.protect.keys_cli import companion_trail
from proxy.protect.rewrap import Counts, Progress, default_progress


def test_progress_is_one_rewritten_line_and_ends_with_a_newline() -> None:
    out = io.StringIO()
    progress = Progress(out)
    counts = Counts(keys=3, rewrapped=2, current=1, not_ciphertext=1)
    progress(counts, 0)
    progress(counts, 0)  # within 0.2 s: not drawn again
    progress.done()
    assert out.getvalue() == ("\rrewrap: db 0: 3 keys, 2 values rewrapped, 1 current, "
                              "1 undecryptable \n")


def test_nothing_is_drawn_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert default_progress() is None


def test_counts_add_up() -> None:
    total = Counts()
    total.add(Counts(keys=1, rewrapped=2, tampered=1))
    total.add(Counts(keys=1, unknown_key=2))
    assert (total.keys, total.rewrapped, total.undecryptable) == (2, 2, 3)
    assert total.as_dict()["unknown_key"] == 2


@pytest.mark.parametrize(("path", "head", "companion"), [
    ("/var/log/phiproxy/audit.jsonl", None, "/var/log/phiproxy/audit.keys.jsonl"),
    ("/var/log/audit", None, "/var/log/audit.keys"),
    ("-", "/var/lib/phiproxy/audit.head", "/var/lib/phiproxy/audit.keys.jsonl"),
    ("syslog+tcp://127.0.0.1:6514", "/var/lib/phiproxy/head", "/var/lib/phiproxy/head.keys.jsonl"),
])
def test_companion_trail_names(path: str, head: str | None, companion: str) -> None:
    found = companion_trail(AuditConfig(path=path, head_file=head))
    assert found.path == companion and found.head_file is None
