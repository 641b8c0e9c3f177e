#!/usr/bin/env bash
# Quick end-to-end comparison in one run: redis-benchmark against a TLS-only redis-server
# directly (mutual TLS) and through two phiproxy instances in front of it, one where every
# benchmark key is PHI (each command audited, write-ahead) and one where none is.
# Pins the servers (redis + proxy) to CPU 0 and redis-benchmark to CPU 1 when taskset exists.
#   bench/e2e_quick.sh                 # -t set,get -c 50 -P 1 and -P 16, 200k requests
#   REQUESTS=500000 bench/e2e_quick.sh
# For the full side-by-side with haproxy/stunnel/twemproxy use ../shared/bench/peers.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/bootstrap.sh"
REQUESTS=${REQUESTS:-200000}
WORK=$(mktemp -d /tmp/phiproxy-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
pin() { if command -v taskset >/dev/null; then exec taskset -c "$1" "${@:2}"; else exec "${@:2}"; fi; }
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

phiproxy certs dev --out "$WORK/pki" --client bench >/dev/null
BACKEND=$(free_port); PROXY=$(free_port)
(pin 0 redis-server --port 0 --tls-port "$BACKEND" --bind 127.0.0.1 --save '' --appendonly no \
  --tls-cert-file "$WORK/pki/backend.pem" --tls-key-file "$WORK/pki/backend-key.pem" \
  --tls-ca-cert-file "$WORK/pki/backend-ca.pem" --tls-auth-clients yes --dir "$WORK" \
  --logfile "$WORK/redis.log") &
PIDS+=($!)
(umask 077; head -c 32 /dev/urandom >"$WORK/audit.key")
write_config() { # name port phi_keys
  cat >"$WORK/$1.toml" <<TOML
[listener]
address = "127.0.0.1"
port = $2
cert = "pki/proxy.pem"
key = "pki/proxy-key.pem"
client_ca = "pki/clients-ca.pem"
max_connections = 1000
[backend]
address = "127.0.0.1"
port = $BACKEND
ca = "pki/backend-ca.pem"
server_name = "localhost"
cert = "pki/proxy-client.pem"
key = "pki/proxy-client-key.pem"
pool_size = 8
[audit]
path = "$1-audit.jsonl"
key_file = "audit.key"
phi_keys = $3
[metrics]
port = 0
[roles.bench]
acl = "+@read +@write +ping +config|get ~key:* ~counter:* ~mylist ~myset:* ~app:phi:*"
[[identities]]
subject_cn = "bench"
role = "bench"
TOML
}
# Two proxies in the same run: every benchmark key is PHI (audited), or none is.
PHI_PORT=$PROXY
NOPHI_PORT=$(free_port)
write_config phi "$PHI_PORT" '["key:*", "counter:*", "mylist", "myset:*"]'
write_config nophi "$NOPHI_PORT" '[]'
(pin 0 phiproxy run -c "$WORK/phi.toml" 2>"$WORK/phi.log") &
PIDS+=($!)
(pin 0 phiproxy run -c "$WORK/nophi.toml" 2>"$WORK/nophi.log") &
PIDS+=($!)
for port in "$PHI_PORT" "$NOPHI_PORT"; do
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
done

bench() { # label port cacert cert key args...
  local label=$1 port=$2 ca=$3 cert=$4 key=$5; shift 5
  local out
  out=$( (pin 1 redis-benchmark --tls --cacert "$ca" --cert "$cert" --key "$key" -h 127.0.0.1 \
        -p "$port" -n "$REQUESTS" -r 100000 -d 64 -q "$@" 2>/dev/null) | tr '\r' '\n' | grep -E 'requests per second' || true)
  printf '%-9s %-22s %s\n' "$label" "$*" "$(echo "$out" | tr '\n' ' ')"
}
P=$WORK/pki
for args in "-t set,get -c 50 -P 1" "-t set,get -c 50 -P 16" "-t get -c 1 -P 1"; do
  # shellcheck disable=SC2086
  bench direct "$BACKEND" "$P/backend-ca.pem" "$P/proxy-client.pem" "$P/proxy-client-key.pem" $args
  # shellcheck disable=SC2086
  bench phi-all "$PHI_PORT" "$P/clients-ca.pem" "$P/client-bench.pem" "$P/client-bench-key.pem" $args
  # shellcheck disable=SC2086
  bench phi-none "$NOPHI_PORT" "$P/clients-ca.pem" "$P/client-bench.pem" "$P/client-bench-key.pem" $args
done
