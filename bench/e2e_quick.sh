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
source "$ROOT/bench/e2e_lib.sh"

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
