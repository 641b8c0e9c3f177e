#!/usr/bin/env bash
# Installs what phiproxy's demo and tests need on a fresh Debian machine: redis-server and
# redis-tools from apt when missing, and a virtualenv (.venv) with the package and test extras.
# Idempotent; sourced by demo.sh and test.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

apt_install() { # packages...
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "bootstrap: apt-get install -y $*" >&2
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >&2
}

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v openssl >/dev/null || missing+=(openssl)
command -v promtool >/dev/null || missing+=(prometheus)  # promtool tests the alert rules
[ -x /usr/sbin/rsyslogd ] || missing+=(rsyslog)  # a real syslog collector for the audit sink tests
command -v chromium >/dev/null || missing+=(chromium)  # renders report.html in the evidence-pack tests
if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
# Debian starts a plaintext redis-server on 6379 when the package is installed; we never use it.

PYTHON=${PYTHON:-python3}
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  if ! "$PYTHON" -m venv "$ROOT/.venv" >/dev/null 2>&1; then
    apt_install python3-venv
    "$PYTHON" -m venv "$ROOT/.venv"
  fi
fi
stamp="$ROOT/.venv/.phiproxy-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "bootstrap: installing phiproxy and its test dependencies into .venv" >&2
  "$ROOT/.venv/bin/pip" install -q --upgrade pip >&2
  "$ROOT/.venv/bin/pip" install -q -e "$ROOT[test]" >&2
  touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
