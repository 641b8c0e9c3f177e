#!/usr/bin/env bash
# latency_c1.sh - per-request GET latency at concurrency 1, as percentile curves (PNG) and a
# p50/p90/p99/p99.9/max table, for three mutual-TLS targets on loopback:
#   redis-mtls    redis-server, TLS only, client certificate required ("no proxy" baseline)
#   haproxy-mtls  haproxy 'mode tcp' (nbthread 1): client mTLS -> TLS with a client cert -> redis
#   phiproxy      phiproxy started as `bench/peers_phiproxy.sh serve PORT` does it (every
#                 benchmark key PHI, so each GET is audited write-ahead) -> redis
# Workload: redis-benchmark -t get -c 1 -P 1 -n $REQUESTS -d 64 -r 100000 over mutual TLS
# (client cert CN=bench-client); redis is pre-filled with the 100000 keys key:%012d (64-byte
# values), so every GET hits. One connection, one request in flight: the latency is the round
# trip through the target, not a throughput limit.
#
# USAGE (from any directory; installs what is missing, see below)
#   bench/latency_c1.sh
#   REQUESTS=20000 bench/latency_c1.sh         # quicker
#   OUT_DIR=/tmp/mine bench/latency_c1.sh
#
# KNOBS (environment)  REQUESTS=50000 (measured GETs per target)  WARMUP=2000 (GETs per target
#   run just before its measured run, discarded)  OUT_DIR=/tmp/latency-c1-<time>
#   SERVER_CPU=0  CLIENT_CPU=1  RUN_TIMEOUT=600 (seconds, per redis-benchmark run)
#
# ORDER  not interleaved: one measured run per target, redis-mtls, then haproxy-mtls, then
#   phiproxy, each right after its own warm-up run. Noise from other tenants is therefore not
#   spread evenly over the targets; run the script twice before trusting a small difference.
#
# CPU PLACEMENT (as ../shared/bench/peers.sh, 2-core machine): every server process - redis,
#   haproxy, phiproxy - pinned with `taskset -c $SERVER_CPU` (0), redis-benchmark alone with
#   `taskset -c $CLIENT_CPU` (1). Without taskset nothing is pinned (a warning says so).
#
# OUTPUT  the table on stdout (also OUT_DIR/latency-c1-table.txt); in OUT_DIR: latency-c1.png,
#   latency-c1-<name>.txt (raw redis-benchmark output per target), versions.txt, logs/.
#   Every process started here is stopped on exit; the work dir (PKI, configs) is removed,
#   OUT_DIR is kept.
# NEEDS   scripts/bootstrap.sh's packages and venv (redis-server, redis-tools, openssl), haproxy
#   (apt-get installed when missing and running as root), matplotlib in the venv (pip-installed
#   when missing; it is the project's `bench` extra).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/../scripts/bootstrap.sh"   # sets ROOT, puts .venv/bin first on PATH

REQUESTS=${REQUESTS:-50000}
WARMUP=${WARMUP:-2000}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
RUN_TIMEOUT=${RUN_TIMEOUT:-600}
KEYSPACE=100000 VALUE_SIZE=64
OUT_DIR=${OUT_DIR:-/tmp/latency-c1-$(date +%Y%m%d-%H%M%S)}

fail() { echo "latency_c1.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }

if ! python -c 'import matplotlib' 2>/dev/null; then
  log "installing matplotlib into .venv (the project's bench extra)"
  python -m pip install -q matplotlib >&2 || fail "pip install matplotlib failed"
fi
HAPROXY=$(command -v haproxy || true)
[[ -z $HAPROXY && -x /usr/sbin/haproxy ]] && HAPROXY=/usr/sbin/haproxy
if [[ -z $HAPROXY ]]; then
  [[ $(id -u) -eq 0 ]] || fail "haproxy is missing: run 'sudo apt-get install -y haproxy' first"
  log "apt-get install -y haproxy"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >&2
  HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
fi
for tool in redis-server redis-cli redis-benchmark openssl timeout; do
  command -v "$tool" >/dev/null || fail "$tool is missing (scripts/bootstrap.sh installs it)"
done
PIN_SERVER=() PIN_CLIENT=()
if command -v taskset >/dev/null; then
  PIN_SERVER=(taskset -c "$SERVER_CPU") PIN_CLIENT=(taskset -c "$CLIENT_CPU")
else
  log "warning: taskset not found, nothing is pinned"
fi

mkdir -p "$OUT_DIR/logs" || fail "cannot create $OUT_DIR"
WORK=$(mktemp -d /tmp/latency-c1-work.XXXXXX)
PKI=$WORK/pki
PIDS=()
cleanup() {
  local p i alive
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for i in $(seq 50); do   # up to 5 s for a clean exit (phiproxy drains), then SIGKILL
    alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  cp "$WORK"/*.log "$OUT_DIR/logs/" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port seconds
  local i; for ((i = 0; i < $2 * 10; i++)); do port_open "$1" && return 0; sleep 0.1; done; return 1
}
start() { # name cmd... : in the background, pinned to SERVER_CPU, output to $WORK/name.log
  local name=$1; shift
  "${PIN_SERVER[@]}" "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
}

# ---------------------------------------------------------------- PKI (as peers.sh, ECDSA P-256)
issue() { # name subject extensions
  openssl ecparam -name prime256v1 -genkey -noout -out "$1-key.pem" &&
  openssl req -new -key "$1-key.pem" -subj "$2" -out "$1.csr" &&
  printf '%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n' "$3" >"$1.ext" &&
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 7 -sha256 \
    -extfile "$1.ext" -out "$1.pem"
}
make_pki() {
  mkdir -p "$PKI"
  (
    cd "$PKI" &&
    openssl ecparam -name prime256v1 -genkey -noout -out ca-key.pem &&
    openssl req -x509 -new -key ca-key.pem -sha256 -days 7 -subj /CN=bench-ca -out ca.pem \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign &&
    issue server /CN=localhost "subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth" &&
    issue client /CN=bench-client "extendedKeyUsage=clientAuth" &&
    issue proxy-client /CN=bench-proxy "extendedKeyUsage=clientAuth" &&
    chmod 600 ./*-key.pem &&
    cat server.pem server-key.pem >server-bundle.pem &&   # haproxy wants cert+key in one file
    cat proxy-client.pem proxy-client-key.pem >proxy-client-bundle.pem &&
    chmod 600 ./*-bundle.pem
  ) >"$WORK/pki.log" 2>&1 || fail "PKI generation failed: $(tail -n3 "$WORK/pki.log")"
}

# ---------------------------------------------------------------- servers
P_REDIS=$(free_port) P_HAPROXY=$(free_port) P_PHIPROXY=$(free_port)
TLS_ARGS=(--tls --cacert "$PKI/ca.pem" --cert "$PKI/client.pem" --key "$PKI/client-key.pem")

start_redis() {
  start redis-tls redis-server --port 0 --tls-port "$P_REDIS" --bind 127.0.0.1 --save '' \
    --appendonly no --dir "$WORK" --protected-mode no \
    --tls-cert-file "$PKI/server.pem" --tls-key-file "$PKI/server-key.pem" \
    --tls-ca-cert-file "$PKI/ca.pem" --tls-auth-clients yes --tls-protocols "TLSv1.2 TLSv1.3" \
    --logfile "$WORK/redis-tls.log"
  wait_port "$P_REDIS" 10 || fail "redis-server did not start (see $OUT_DIR/logs/redis-tls.log)"
}

prefill_commands() { # RESP: SET key:000000000000 .. KEYSPACE-1 to VALUE_SIZE-byte values
  python "$HERE/bench_config.py" prefill "$KEYSPACE" "$VALUE_SIZE"
}
prefill() { # so that every GET of redis-benchmark -r KEYSPACE hits
  prefill_commands | timeout 60 redis-cli -p "$P_REDIS" "${TLS_ARGS[@]}" --pipe >"$WORK/prefill.log" 2>&1 ||
    fail "prefill failed: $(tail -n3 "$WORK/prefill.log")"
  [[ $(redis-cli -p "$P_REDIS" "${TLS_ARGS[@]}" dbsize) == "$KEYSPACE" ]] ||
    fail "prefill failed: dbsize is not $KEYSPACE"
}

start_haproxy() {
  cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 2000
  ssl-default-bind-options ssl-min-ver TLSv1.2
  ssl-default-server-options ssl-min-ver TLSv1.2
defaults
  mode tcp
  timeout connect 5s
  timeout client 120s
  timeout server 120s
frontend mtls_in
  bind 127.0.0.1:$P_HAPROXY ssl crt $PKI/server-bundle.pem ca-file $PKI/ca.pem verify required
  default_backend redis_tls
backend redis_tls
  server r1 127.0.0.1:$P_REDIS ssl crt $PKI/proxy-client-bundle.pem ca-file $PKI/ca.pem verify required sni str(localhost) verifyhost localhost
EOF
  "$HAPROXY" -c -q -f "$WORK/haproxy.cfg" >"$WORK/haproxy-check.log" 2>&1 ||
    fail "haproxy config invalid: $(cat "$WORK/haproxy-check.log")"
  start haproxy "$HAPROXY" -db -f "$WORK/haproxy.cfg"
  wait_port "$P_HAPROXY" 10 || fail "haproxy did not start (see $OUT_DIR/logs/haproxy.log)"
}

start_phiproxy() { # exactly as peers.sh runs `peers_phiproxy.sh serve PORT` (EXTRA_CMD)
  export BENCH_DIR=$WORK BENCH_PKI=$PKI BENCH_REDIS_TLS_PORT=$P_REDIS
  start phiproxy bash "$HERE/peers_phiproxy.sh" serve "$P_PHIPROXY"
  wait_port "$P_PHIPROXY" 30 || fail "phiproxy did not start (see $OUT_DIR/logs/phiproxy.log)"
}

preflight() { # name port: PONG and a 64-byte hit with the client cert, refused without one
  local r
  r=$(timeout 10 redis-cli -p "$2" "${TLS_ARGS[@]}" ping 2>&1) || true
  [[ $r == PONG ]] || fail "$1 on port $2 does not answer PING: $r"
  r=$(timeout 10 redis-cli -p "$2" "${TLS_ARGS[@]}" get key:000000000042 2>&1) || true
  [[ ${#r} -eq $VALUE_SIZE ]] || fail "$1: GET key:000000000042 returned '$r', not a $VALUE_SIZE-byte value"
  r=$(timeout 10 redis-cli -p "$2" --tls --cacert "$PKI/ca.pem" ping 2>&1) || true
  [[ $r == PONG ]] && fail "$1 accepts clients without a certificate"
  log "  $1 on 127.0.0.1:$2: PING, GET hit, no-cert client refused"
}

run_get() { # port n outfile : one redis-benchmark run pinned to CLIENT_CPU, output to outfile
  local rc=0
  timeout "$RUN_TIMEOUT" "${PIN_CLIENT[@]}" redis-benchmark -h 127.0.0.1 -p "$1" "${TLS_ARGS[@]}" \
    -t get -c 1 -P 1 -n "$2" -d "$VALUE_SIZE" -r "$KEYSPACE" >"$3" 2>&1 || rc=$?
  ((rc == 0)) && grep -q 'Latency by percentile distribution:' "$3" ||
    fail "redis-benchmark -p $1 -n $2 failed (rc=$rc): $(tr '\r' '\n' <"$3" | grep -v '^ *$' | tail -n2)"
}

# ---------------------------------------------------------------- main
{
  echo "date: $(date -u +%FT%TZ)  kernel: $(uname -r)  cpus: $(nproc)  server cpu: $SERVER_CPU  client cpu: $CLIENT_CPU  pinned: $([[ ${#PIN_SERVER[@]} -gt 0 ]] && echo yes || echo no)"
  redis-server --version | cut -d' ' -f1-3
  redis-benchmark --version
  "$HAPROXY" -v | head -n1
  openssl version
  echo "phiproxy: $(python -c 'import importlib.metadata as m; print(m.version("phiproxy"))')  python: $(python -V 2>&1)"
  echo "workload: -t get -c 1 -P 1 -n $REQUESTS (warm-up $WARMUP) -d $VALUE_SIZE -r $KEYSPACE, mutual TLS"
} >"$OUT_DIR/versions.txt"
cat "$OUT_DIR/versions.txt" >&2

log "PKI and servers in $WORK, results in $OUT_DIR"
make_pki
start_redis
prefill
start_haproxy
start_phiproxy
NAMES=(redis-mtls haproxy-mtls phiproxy)
declare -A PORT=([redis-mtls]=$P_REDIS [haproxy-mtls]=$P_HAPROXY [phiproxy]=$P_PHIPROXY)
for name in "${NAMES[@]}"; do preflight "$name" "${PORT[$name]}"; done

specs=()
for name in "${NAMES[@]}"; do
  out=$OUT_DIR/latency-c1-$name.txt
  log "$name: warm-up -n $WARMUP, then -n $REQUESTS"
  run_get "${PORT[$name]}" "$WARMUP" "$WORK/warmup-$name.txt"
  run_get "${PORT[$name]}" "$REQUESTS" "$out"
  log "  $(tr '\r' '\n' <"$out" | grep -m1 'requests per second' | sed 's/^ *//')"
  specs+=("$name=$out")
done

python "$HERE/latency_plot.py" --out "$OUT_DIR/latency-c1.png" "${specs[@]}" |
  tee "$OUT_DIR/latency-c1-table.txt"
