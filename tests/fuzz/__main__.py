"""`python -m tests.fuzz TARGET [libFuzzer flags]`: one harness under atheris."""

import sys

from tests.fuzz.common import TARGETS, run_atheris

if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
    sys.exit(f"usage: python -m tests.fuzz {{{'|'.join(TARGETS)}}} [libFuzzer flags] [corpus dir]")
run_atheris(sys.argv[1], sys.argv[2:])
