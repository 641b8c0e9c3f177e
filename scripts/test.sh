#!/usr/bin/env bash
# The whole test suite: lint, then every test (real redis-server, real clients).
# Extra arguments go to pytest (e.g. scripts/test.sh -k pipeline, or -m slow).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
echo "== ruff" >&2
ruff check proxy tests bench scripts
echo "== pytest" >&2
set +e
python -m pytest -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit "$status"
