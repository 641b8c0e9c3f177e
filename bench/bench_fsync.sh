#!/usr/bin/env bash
# bench_fsync.sh - what `[audit] fsync` costs: redis-benchmark SET through phiproxy with
# fsync = "no", "everysec" and "always", every benchmark key PHI (each SET audited, write-
# ahead), at -c 50 -P 1 and -c 1 -P 1. The benchmark configuration is bench/bench_config.py's
# (one role, three key patterns, pool_size 8) plus `fsync` and a metrics port.
#
# USAGE
#   bench/bench_fsync.sh                      # 2 workloads x 3 modes, ~12 s each: ~1.5 min
#   DURATION=20 bench/bench_fsync.sh          # longer runs
#   AUDIT_DIR=/mnt/ssd/phi bench/bench_fsync.sh   # the filesystem to measure (default: /tmp)
#
# METHOD  One TLS-only redis-server (no persistence) on SERVER_CPU; for each workload, for each
#   mode, one after another: a fresh phiproxy (pinned to SERVER_CPU, its own empty audit
#   directory under AUDIT_DIR), a probe (the steady rate after PROBE_SECONDS of a long run, cut
#   there, not recorded) that sizes the measured run to about DURATION seconds, the measured run
#   (redis-benchmark --csv on CLIENT_CPU; -r 100000 -d 64, so keys key:%012d, all PHI), then
#   SIGTERM and `phiproxy audit verify` of the trail. /metrics is read before and after the
#   measured run: fsyncs of the trail per second and records per fsync (group commit).
#
# KNOBS (environment)  DURATION=12  PROBE_SECONDS=3  MODES="no everysec always"  WORKLOADS="c50 c1"
#   SERVER_CPU=0  CLIENT_CPU=1  AUDIT_DIR=<work dir>/audit  OUT_DIR=/tmp/fsync-<time>
#   RUN_TIMEOUT=120 (seconds per redis-benchmark run)  KEEP_WORK=0
#
# OUTPUT  progress on stderr; the markdown table (with date, machine and `df -T` of the audit
#   directory) on stdout and in OUT_DIR/table.md; OUT_DIR/bench.csv has redis-benchmark's rows.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/bootstrap.sh"

DURATION=${DURATION:-12}
PROBE_SECONDS=${PROBE_SECONDS:-3}
MODES=${MODES:-no everysec always}
WORKLOADS=${WORKLOADS:-c50 c1}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
RUN_TIMEOUT=${RUN_TIMEOUT:-120}
KEEP_WORK=${KEEP_WORK:-0}
OUT_DIR=${OUT_DIR:-/tmp/fsync-$(date +%Y%m%d-%H%M%S)}
declare -A ARGS=([c50]="-c 50 -P 1" [c1]="-c 1 -P 1")

for tool in taskset timeout redis-server redis-benchmark; do
  command -v "$tool" >/dev/null || { echo "bench_fsync.sh: $tool missing" >&2; exit 1; }
done
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d /tmp/fsync-work.XXXXXX)
AUDIT_DIR=${AUDIT_DIR:-$WORK/audit}
PKI=$WORK/pki
REDIS_PID="" PROXY_PID=""

log() { echo "[$(date +%T)] $*" >&2; }
stop_pid() { # pid: SIGTERM, wait up to 30 s, then SIGKILL
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  [[ -n $PROXY_PID ]] && stop_pid "$PROXY_PID"
  [[ -n $REDIS_PID ]] && stop_pid "$REDIS_PID"
  if [[ $KEEP_WORK == 1 ]]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { local i; for ((i = 0; i < 150; i++)); do
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
metric() { # port name -> value (0 if absent)
  python - "$1" "$2" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
print(next((line.split()[-1] for line in text.splitlines() if line.startswith(sys.argv[2] + " ")), "0"))
PY
}

phiproxy certs dev --out "$PKI" --client bench >/dev/null
BACKEND=$(free_port)
taskset -c "$SERVER_CPU" redis-server --port 0 --tls-port "$BACKEND" --bind 127.0.0.1 --save '' \
  --appendonly no --tls-cert-file "$PKI/backend.pem" --tls-key-file "$PKI/backend-key.pem" \
  --tls-ca-cert-file "$PKI/backend-ca.pem" --tls-auth-clients yes --dir "$WORK" \
  --logfile "$WORK/redis.log" &
REDIS_PID=$!
wait_port "$BACKEND" || { log "redis-server did not start"; exit 1; }

bench() { # port requests workload -> one csv line: "SET","rps","avg",...,"p50",...
  # shellcheck disable=SC2086
  timeout "$RUN_TIMEOUT" taskset -c "$CLIENT_CPU" redis-benchmark --tls --cacert "$PKI/clients-ca.pem" \
    --cert "$PKI/client-bench.pem" --key "$PKI/client-bench-key.pem" -h 127.0.0.1 -p "$1" \
    -t set -n "$2" -r 100000 -d 64 ${ARGS[$3]} --csv 2>/dev/null | grep '^"SET"'
}

probe() { # port workload -> steady ops/s: PROBE_SECONDS of a long run, its last "overall" rate
  # shellcheck disable=SC2086
  timeout -s INT "$PROBE_SECONDS" taskset -c "$CLIENT_CPU" redis-benchmark --tls \
    --cacert "$PKI/clients-ca.pem" --cert "$PKI/client-bench.pem" --key "$PKI/client-bench-key.pem" \
    -h 127.0.0.1 -p "$1" -t set -n 100000000 -r 100000 -d 64 ${ARGS[$2]} 2>/dev/null \
    | tr '\r' '\n' | sed -n 's/^SET: rps=[0-9.]* (overall: \([0-9.]*\)).*/\1/p' | tail -1 || true
}

row() { # workload mode n t0 t1 fsyncs0 fsyncs1 records0 records1 csv-line -> table row
  python - "$@" <<'PY'
import sys
workload, mode, n, t0, t1, f0, f1, r0, r1, line = sys.argv[1:]
cols = [c.strip('"') for c in line.split(",")]
rps, avg, p50, p99 = float(cols[1]), cols[2], cols[4], cols[6]
secs = float(t1) - float(t0)
fsyncs = float(f1) - float(f0)
records = float(r1) - float(r0)
per_s = f"{fsyncs / secs:,.0f}" if fsyncs else "0"
per_sync = f"{records / fsyncs:.1f}" if fsyncs else "-"
print(f"| SET {workload} P1 | {mode} | {rps:,.0f} | {p50} | {p99} | {per_s} | {per_sync} "
      f"| {int(n):,} in {secs:.1f} s |")
PY
}

mkdir -p "$AUDIT_DIR"
FS=$(df -T "$AUDIT_DIR" | awk 'NR==2 {print $2" "$1" (mounted on "$7")"}')
STARTED=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
ROWS=()
for workload in $WORKLOADS; do
  for mode in $MODES; do
    port=$(free_port) mport=$(free_port) dir=$AUDIT_DIR/$workload-$mode
    mkdir -p "$dir"
    (umask 077; head -c 32 /dev/urandom >"$dir/audit.key")
    python "$ROOT/bench/bench_config.py" config --out "$dir/phiproxy.toml" --port "$port" \
      --cert "$PKI/proxy.pem" --key "$PKI/proxy-key.pem" --client-ca "$PKI/clients-ca.pem" \
      --backend-port "$BACKEND" --backend-ca "$PKI/backend-ca.pem" \
      --backend-cert "$PKI/proxy-client.pem" --backend-key "$PKI/proxy-client-key.pem" \
      --audit-path "$dir/audit.jsonl" --audit-key "$dir/audit.key" --subject-cn bench
    sed -i -e "s/^\[audit\]\$/[audit]\nfsync = \"$mode\"/" -e "s/^port = 0\$/port = $mport/" \
      "$dir/phiproxy.toml"
    taskset -c "$SERVER_CPU" phiproxy run -c "$dir/phiproxy.toml" 2>"$dir/proxy.log" &
    PROXY_PID=$!
    wait_port "$port" || { log "phiproxy ($mode) did not start:"; cat "$dir/proxy.log" >&2; exit 1; }
    rate=$(probe "$port" "$workload")
    n=$(python -c "print(max(1000, int(float('${rate:-0}' or 0) * $DURATION)))")
    fsyncs0=$(metric "$mport" phiproxy_audit_fsyncs_total)
    records0=$(metric "$mport" phiproxy_audit_records_written_total)
    log "$workload fsync=$mode: $n requests (probe: $rate ops/s)"
    t0=$(date +%s.%N)
    line=$(bench "$port" "$n" "$workload")
    t1=$(date +%s.%N)
    fsyncs1=$(metric "$mport" phiproxy_audit_fsyncs_total)
    records1=$(metric "$mport" phiproxy_audit_records_written_total)
    stop_pid "$PROXY_PID"; PROXY_PID=""
    phiproxy audit verify "$dir/audit.jsonl" --key-file "$dir/audit.key" >"$dir/verify.txt" \
      || { log "audit verify failed ($mode):"; cat "$dir/verify.txt" >&2; exit 1; }
    echo "$workload,$mode,$n,$line" >>"$OUT_DIR/bench.csv"
    ROWS+=("$(row "$workload" "$mode" "$n" "$t0" "$t1" "$fsyncs0" "$fsyncs1" "$records0" \
      "$records1" "$line")")
  done
done
{
  echo "bench_fsync.sh, $STARTED; audit trail on $FS; $(nproc) CPUs, servers on CPU $SERVER_CPU,"
  echo "redis-benchmark on CPU $CLIENT_CPU; $(redis-server --version | cut -d' ' -f3); every key PHI;"
  echo "load average $LOAD0 before, $(cut -d' ' -f1-3 /proc/loadavg) after (other work on the host)."
  echo
  echo "| workload | fsync | ops/s | p50 ms | p99 ms | fsyncs/s | records per fsync | run |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"
  printf '%s\n' "${ROWS[@]}"
} | tee "$OUT_DIR/table.md"
