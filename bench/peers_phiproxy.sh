#!/usr/bin/env bash
# peers_phiproxy.sh - run ../shared/bench/peers.sh with phiproxy as its extra target (x), then
# print the issue-5 ratios computed from that same run (bench/peers_ratios.py).
#
#   bench/peers_phiproxy.sh                          # peers.sh defaults: 3 rounds, targets a b c d e x
#   ROUNDS=1 RUN_SECONDS=3 bench/peers_phiproxy.sh   # quicker (~3 min)
#   TARGETS="b c" bench/peers_phiproxy.sh            # only direct TLS + haproxy + phiproxy
#   LATENCY_PLOT=0 bench/peers_phiproxy.sh           # skip the c=1 latency plot (latency_c1.sh,
#                                                    # LATENCY_REQUESTS=20000) written to OUT_DIR
#   WITH_PYFORWARD=1 bench/peers_phiproxy.sh         # plus a 2nd peers.sh run: TARGETS="b c" +
#                                                    # pyforward.py (uvloop) as x, own OUT_DIR
# Knobs: PEERS (path of peers.sh), PHIPROXY_PORT (default: a free port), OUT_DIR (default
# /tmp/peers-phiproxy-<time>; the pyforward run goes to $OUT_DIR-pyforward), and every peers.sh knob.
#
# phiproxy config (written at EXTRA_CMD start time into $BENCH_DIR/phiproxy.toml, from the
# variables peers.sh exports): listener = server.pem/server-key.pem with client_ca = ca.pem;
# backend = peers.sh's TLS redis (ca.pem, server_name localhost, proxy-client cert);
# one role, three key patterns (~key:* ~counter:* ~my*), identity CN=bench-client; every
# benchmark key is PHI (audited, write-ahead) with a fresh 32-byte key file (mode 600).
# Internally the script re-invokes itself as `peers_phiproxy.sh serve PORT` for EXTRA_CMD.
set -uo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
ROOT=$(cd "$(dirname "$SELF")/.." && pwd)
VENV_BIN=$ROOT/.venv/bin

if [[ ${1:-} == serve ]]; then   # EXTRA_CMD: write the config from BENCH_* and exec phiproxy
  PORT=$2
  : "${BENCH_DIR:?serve mode needs BENCH_DIR (exported by peers.sh)}" "${BENCH_PKI:?}" "${BENCH_REDIS_TLS_PORT:?}"
  (umask 077; head -c 32 /dev/urandom >"$BENCH_DIR/phiproxy-audit.key")
  chmod 600 "$BENCH_DIR/phiproxy-audit.key"
  "$VENV_BIN/python" "$ROOT/bench/bench_config.py" config --out "$BENCH_DIR/phiproxy.toml" \
    --port "$PORT" --cert "$BENCH_PKI/server.pem" --key "$BENCH_PKI/server-key.pem" \
    --client-ca "$BENCH_PKI/ca.pem" --backend-port "$BENCH_REDIS_TLS_PORT" \
    --backend-ca "$BENCH_PKI/ca.pem" --backend-cert "$BENCH_PKI/proxy-client.pem" \
    --backend-key "$BENCH_PKI/proxy-client-key.pem" \
    --audit-path "$BENCH_DIR/phiproxy-audit.jsonl" --audit-key "$BENCH_DIR/phiproxy-audit.key" \
    --subject-cn bench-client || exit 1
  exec "$VENV_BIN/phiproxy" run -c "$BENCH_DIR/phiproxy.toml"
fi

source "$ROOT/scripts/bootstrap.sh"   # venv and redis; the peers below when missing
peer_missing=()
command -v haproxy >/dev/null || peer_missing+=(haproxy)
command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || peer_missing+=(stunnel4)
command -v nutcracker >/dev/null || peer_missing+=(nutcracker)
if [ ${#peer_missing[@]} -gt 0 ]; then apt_install "${peer_missing[@]}"; fi
set +e

PEERS=${PEERS:-$(dirname "$SELF")/../../shared/bench/peers.sh}
[[ -f $PEERS ]] || { echo "peers.sh not found at $PEERS (set PEERS=...)" >&2; exit 1; }
BASE_PORT=${BASE_PORT:-47380}
free_port() { # a free loopback port outside peers.sh's BASE_PORT..BASE_PORT+6
  local p
  while :; do
    p=$("$VENV_BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    ((p < BASE_PORT || p > BASE_PORT + 6)) && { echo "$p"; return; }
  done
}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT_DIR=${OUT_DIR:-/tmp/peers-phiproxy-$STAMP}
PHIPROXY_PORT=${PHIPROXY_PORT:-$(free_port)}

echo "== peers.sh with phiproxy on 127.0.0.1:$PHIPROXY_PORT, results in $OUT_DIR" >&2
OUT_DIR=$OUT_DIR EXTRA_NAME=phiproxy EXTRA_PORT=$PHIPROXY_PORT EXTRA_TLS=1 \
  EXTRA_CMD="'$SELF' serve $PHIPROXY_PORT" bash "$PEERS"
rc=$?
if [[ -f $OUT_DIR/raw.csv ]]; then
  echo
  "$VENV_BIN/python" "$(dirname "$SELF")/peers_ratios.py" "$OUT_DIR/raw.csv" | tee "$OUT_DIR/ratios.txt"
fi

if [[ ${LATENCY_PLOT:-1} == 1 && $rc == 0 ]]; then
  # The c=1 percentile curves (PNG) of direct TLS redis, haproxy and phiproxy, next to the
  # results above (bench/latency_c1.sh: its own servers, pinned as peers.sh pins them).
  echo "== latency at c=1: bench/latency_c1.sh, into $OUT_DIR" >&2
  OUT_DIR=$OUT_DIR REQUESTS=${LATENCY_REQUESTS:-20000} bash "$(dirname "$SELF")/latency_c1.sh" || rc=$?
fi

if [[ ${WITH_PYFORWARD:-0} == 1 ]]; then
  PY_OUT=$OUT_DIR-pyforward PY_PORT=$(free_port)
  PYFWD=$(dirname "$PEERS")/pyforward.py
  echo "== peers.sh (TARGETS=\"b c\") with pyforward.py uvloop on $PY_PORT, results in $PY_OUT" >&2
  OUT_DIR=$PY_OUT TARGETS="b c" EXTRA_NAME=pyforward-uvloop EXTRA_PORT=$PY_PORT EXTRA_TLS=1 \
    EXTRA_CMD="'$VENV_BIN/python' '$PYFWD' $PY_PORT uvloop" bash "$PEERS"
  [[ -f $PY_OUT/raw.csv ]] && "$VENV_BIN/python" "$(dirname "$SELF")/peers_ratios.py" "$PY_OUT/raw.csv" \
    --name pyforward-uvloop | tee "$PY_OUT/ratios.txt"
fi
exit $rc
