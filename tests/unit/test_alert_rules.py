"""The Prometheus alert rules are valid and every one behaves as its unit test says."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[2] / "config" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        # a failure, not a skip: untested alert rules would pass unnoticed
        pytest.fail("promtool is not installed; scripts/test.sh installs it (scripts/bootstrap.sh "
                    "runs apt-get install prometheus), or run: apt-get install -y prometheus")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=RULES)


def test_rules_are_valid(promtool: str) -> None:
    done = _run(promtool, "check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_rules_unit_tests_pass(promtool: str) -> None:
    done = _run(promtool, "test", "rules", "alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_every_rule_has_a_unit_test() -> None:
    rules = (RULES / "alerts.yml").read_text()
    tests = (RULES / "alerts.test.yml").read_text()
    names = [line.split(":", 1)[1].strip() for line in rules.splitlines()
             if line.strip().startswith("- alert:")]
    assert len(names) >= 9
    untested = [n for n in names if f"alertname: {n}\n" not in tests]
    assert not untested, f"alerts without a test in alerts.test.yml: {untested}"
