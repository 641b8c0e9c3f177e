#!/usr/bin/env bash
# The cost of value encryption (SPEC §9: GET and SET of 100-byte values on protected keys
# keep >= 0.8x the throughput of the same on unprotected keys, same run): redis-benchmark
# through two phiproxy instances in front of one TLS-only redis-server, identical but for
# a [[protect]] rule with encrypt = true on the benchmark keys in one of them (every key
# PHI, audited, in both). Runs alternate between the two, ROUNDS times.
# Pins the servers (redis + proxy) to CPU 0 and redis-benchmark to CPU 1 when taskset exists.
#   bench/protect_cost.sh              # -t set,get -d 100 -c 50 -P 1 and -P 16, 3 rounds
#   REQUESTS=500000 ROUNDS=5 bench/protect_cost.sh
# For the full side-by-side with haproxy/stunnel/twemproxy use ../shared/bench/peers.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/bootstrap.sh"
REQUESTS=${REQUESTS:-200000}
ROUNDS=${ROUNDS:-3}
source "$ROOT/bench/e2e_lib.sh"

# Two proxies in the same run: protected (encrypted values) or not; every key PHI in both.
phiproxy keys new --out "$WORK/keyring.json" >/dev/null
PROT_PORT=$PROXY
PLAIN_PORT=$(free_port)
PHI='["key:*", "counter:*", "mylist", "myset:*"]'
write_config protected "$PROT_PORT" "$PHI" '[encryption]
keyring = "keyring.json"
[[protect]]
keys = ["key:*"]
encrypt = true'
write_config plain "$PLAIN_PORT" "$PHI" ''
(pin 0 phiproxy run -c "$WORK/protected.toml" 2>"$WORK/protected.log") &
PIDS+=($!)
(pin 0 phiproxy run -c "$WORK/plain.toml" 2>"$WORK/plain.log") &
PIDS+=($!)
for port in "$PROT_PORT" "$PLAIN_PORT"; do
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
done

bench() { # label port args...
  local label=$1 port=$2; shift 2
  local out
  out=$( (pin 1 redis-benchmark --tls --cacert "$P/clients-ca.pem" --cert "$P/client-bench.pem" \
        --key "$P/client-bench-key.pem" -h 127.0.0.1 -p "$port" -n "$REQUESTS" -r 100000 -d 100 \
        -q "$@" 2>/dev/null) | tr '\r' '\n' | grep -E 'requests per second' || true)
  printf '%-10s %-22s %s\n' "$label" "$*" "$(echo "$out" | tr '\n' ' ')"
}
P=$WORK/pki
echo "phiproxy $(phiproxy --version 2>/dev/null || true); $(date -u +%FT%TZ); $REQUESTS requests, -d 100"
for round in $(seq "$ROUNDS"); do
  echo "round $round"
  for args in "-t set,get -c 50 -P 1" "-t set,get -c 50 -P 16"; do
    # Own databases: a plaintext value the other one wrote would be refused (or wrong).
    # shellcheck disable=SC2086
    bench plain "$PLAIN_PORT" $args --dbnum 0
    # shellcheck disable=SC2086
    bench protected "$PROT_PORT" $args --dbnum 1
  done
done
