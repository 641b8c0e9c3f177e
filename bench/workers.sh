#!/usr/bin/env bash
# workers.sh - throughput of `phiproxy run --workers N` for N=1 vs N=2 on a 2-core machine:
# redis-benchmark -t get -c 50 -P 16 -d 64 -r 100000 (mutual TLS) through phiproxy in front of
# a TLS-only redis-server pre-filled with the 100000 keys (key:%012d, 64-byte values: every GET
# hits). The phiproxy config is the benchmark one of bench/peers_phiproxy.sh (serve mode): every
# benchmark key is PHI (audited, write-ahead), one role with three key patterns, pool_size 8.
#
# USAGE
#   bench/workers.sh                            # 3 interleaved rounds of 300000 requests
#   ROUNDS=1 REQUESTS=200000 bench/workers.sh   # quick look (about 1 minute)
#   PLACEMENTS=A bench/workers.sh               # one placement only
#
# PLACEMENTS (CPU numbers are the knobs below; 2-core default)
#   A "servers on CPU 0": redis-server and phiproxy (`taskset -c 0 phiproxy run --workers N`, the
#     forked workers inherit the mask) on SERVER_CPU, redis-benchmark alone on CLIENT_CPU - the
#     ../shared/bench/peers.sh placement. With N=2 both workers share one core: this shows what
#     a second process costs when there is no second core to give it.
#   B "workers spread": redis-server on SERVER_CPU, phiproxy on SPREAD_CPUS (0,1: not pinned, the
#     scheduler may put the workers on both cores), redis-benchmark on CLIENT_CPU - the client
#     competes with whichever worker runs on its core.
#
# METHOD  For each round, for each placement, for N in 1 2: a fresh phiproxy start (own audit
#   directory; wait for the port), a warm-up run (WARMUP requests, same workload, not recorded),
#   one measured run of REQUESTS with --csv, then SIGTERM (phiproxy drains and exits 0; the
#   script waits for it). Report per placement and N: median ops/s and median p50 over rounds;
#   "ratio" = median over rounds of (N=2 ops/s / N=1 ops/s of the same round and placement).
#   Connections per worker: lines with "event":"connect" in each worker's audit trail
#   (audit.w1.jsonl, audit.w2.jsonl next to the configured audit.jsonl) opened during the
#   measured run (count after it minus count before it); one "w1/w2" per round.
#   After every N=2 run `phiproxy audit verify <configured audit.jsonl>` checks the set: it
#   finds each worker's trail beside the configured path and verifies each chain; any failure
#   (or fewer trails than workers) fails the script.
#
# KNOBS (environment)  ROUNDS=3  REQUESTS=300000  WARMUP=50000  PLACEMENTS="A B"
#   SERVER_CPU=0  CLIENT_CPU=1  SPREAD_CPUS=0,1  RUN_TIMEOUT=120 (seconds per redis-benchmark run)
#   OUT_DIR=/tmp/workers-<time>  KEEP_WORK=0 (1 keeps the work dir: configs, PKI, audit, logs)
#
# OUTPUT  progress on stderr; the markdown table on stdout. In OUT_DIR: table.md, raw.csv (one
#   row per measured run, incl. client and proxy CPU%), bench.csv (redis-benchmark's raw --csv
#   lines), verify.txt (audit verify output), logs/ (phiproxy and redis logs).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/bootstrap.sh"

ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-300000}
WARMUP=${WARMUP:-50000}
PLACEMENTS=${PLACEMENTS:-A B}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
SPREAD_CPUS=${SPREAD_CPUS:-0,1}
RUN_TIMEOUT=${RUN_TIMEOUT:-120}
KEEP_WORK=${KEEP_WORK:-0}
OUT_DIR=${OUT_DIR:-/tmp/workers-$(date +%Y%m%d-%H%M%S)}
KEYSPACE=100000 VALUE_SIZE=64
WORKLOAD=(-t get -c 50 -P 16 -d "$VALUE_SIZE" -r "$KEYSPACE")
declare -A LABEL=([A]="servers on CPU $SERVER_CPU" [B]="workers spread")
declare -A PROXY_CPUS=([A]=$SERVER_CPU [B]=$SPREAD_CPUS)

for tool in taskset timeout redis-server redis-cli redis-benchmark; do
  command -v "$tool" >/dev/null || { echo "workers.sh: $tool missing" >&2; exit 1; }
done
for p in $PLACEMENTS; do
  [[ -n ${LABEL[$p]:-} ]] || { echo "workers.sh: unknown placement '$p' (A B)" >&2; exit 1; }
done
mkdir -p "$OUT_DIR/logs"
WORK=$(mktemp -d /tmp/workers-work.XXXXXX)
PKI=$WORK/pki
REDIS_PID="" PROXY_PID=""

log() { echo "[$(date +%T)] $*" | tee -a "$OUT_DIR/progress.log" >&2; }
fail() { log "workers.sh: $*"; exit 1; }
stop_pid() { # pid: SIGTERM, wait up to 30 s, then SIGKILL; returns the exit status
  local pid=$1 i rc=0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    log "pid $pid did not exit 30 s after SIGTERM; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || rc=$?
  return "$rc"
}
cleanup() {
  [[ -n $PROXY_PID ]] && { stop_pid "$PROXY_PID" || true; }
  [[ -n $REDIS_PID ]] && { stop_pid "$REDIS_PID" || true; }
  cp "$WORK"/*.log "$OUT_DIR/logs/" 2>/dev/null || true
  if ((KEEP_WORK)); then echo "work dir kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port seconds pid: until the port accepts, or fail when pid died
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    port_open "$1" && return 0
    kill -0 "$3" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
connects() { # audit file -> number of "event":"connect" records in it
  if [[ -f $1 ]]; then grep -c '"event":"connect"' "$1" || true; else echo 0; fi
}
proc_ticks() { # pids... -> utime+stime of them (clock ticks)
  local p line sum=0 f
  for p in "$@"; do
    { read -r line <"/proc/$p/stat"; } 2>/dev/null || continue
    read -ra f <<<"${line##*) }"
    sum=$((sum + f[11] + f[12]))
  done
  echo "$sum"
}
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------- PKI, redis, prefill
T0=$(date +%s)
{
  echo "date: $(date -u +%FT%TZ)  kernel: $(uname -r)  cpus: $(nproc)  server cpu: $SERVER_CPU" \
    " client cpu: $CLIENT_CPU  spread cpus: $SPREAD_CPUS"
  redis-server --version | cut -d' ' -f1-3
  redis-benchmark --version
  echo "phiproxy: $(python -c 'import importlib.metadata as m; print(m.version("phiproxy"))')"
  echo "rounds: $ROUNDS  requests: $REQUESTS  warmup: $WARMUP  workload: ${WORKLOAD[*]}"
} >"$OUT_DIR/versions.txt"
cat "$OUT_DIR/versions.txt" >&2
log "work dir $WORK, results in $OUT_DIR"

phiproxy certs dev --out "$PKI" --client bench >/dev/null
BACKEND=$(free_port)
taskset -c "$SERVER_CPU" redis-server --port 0 --tls-port "$BACKEND" --bind 127.0.0.1 --save '' \
  --appendonly no --protected-mode no --dir "$WORK" --logfile "$WORK/redis.log" \
  --tls-cert-file "$PKI/backend.pem" --tls-key-file "$PKI/backend-key.pem" \
  --tls-ca-cert-file "$PKI/backend-ca.pem" --tls-auth-clients yes &
REDIS_PID=$!
wait_port "$BACKEND" 10 "$REDIS_PID" || fail "redis-server did not start (see $WORK/redis.log)"
REDIS_TLS=(--tls --cacert "$PKI/backend-ca.pem" --cert "$PKI/proxy-client.pem"
  --key "$PKI/proxy-client-key.pem" -h 127.0.0.1 -p "$BACKEND")
python "$ROOT/bench/bench_config.py" prefill "$KEYSPACE" "$VALUE_SIZE" |
  timeout 60 redis-cli "${REDIS_TLS[@]}" --pipe >"$WORK/prefill.log" 2>&1
[[ $(redis-cli "${REDIS_TLS[@]}" dbsize) == "$KEYSPACE" ]] || fail "prefill failed (see $WORK/prefill.log)"
log "redis-server (TLS only) on 127.0.0.1:$BACKEND, CPU $SERVER_CPU, $KEYSPACE keys"

(umask 077; head -c 32 /dev/urandom >"$WORK/audit.key")
chmod 600 "$WORK/audit.key"
PROXY=$(free_port)
write_config() { # run-dir: the benchmark config (bench/bench_config.py), audit trail in run-dir
  python "$ROOT/bench/bench_config.py" config --out "$1/phiproxy.toml" --port "$PROXY" \
    --cert "$PKI/proxy.pem" --key "$PKI/proxy-key.pem" --client-ca "$PKI/clients-ca.pem" \
    --backend-port "$BACKEND" --backend-ca "$PKI/backend-ca.pem" \
    --backend-cert "$PKI/proxy-client.pem" --backend-key "$PKI/proxy-client-key.pem" \
    --audit-path "$1/audit.jsonl" --audit-key "$WORK/audit.key" --subject-cn bench
}
# Worker i's trail: proxy/workers.py worker_config() (audit.jsonl -> audit.wI.jsonl); N=1 keeps the path.
trail() { if (($2 == 1)); then echo "$1/audit.jsonl"; else echo "$1/audit.w$3.jsonl"; fi; }

bench() { # n csv-file: one redis-benchmark run through phiproxy, client on CLIENT_CPU
  timeout "$RUN_TIMEOUT" taskset -c "$CLIENT_CPU" redis-benchmark --tls --cacert "$PKI/clients-ca.pem" \
    --cert "$PKI/client-bench.pem" --key "$PKI/client-bench-key.pem" -h 127.0.0.1 -p "$PROXY" \
    "${WORKLOAD[@]}" -n "$1" --csv >"$2" 2>"$2.err"
}

# ---------------------------------------------------------------- runs
echo "round,placement,workers,requests,rps,avg_ms,p50_ms,p95_ms,p99_ms,max_ms,client_cpu,proxy_cpu,wall_s,connects" \
  >"$OUT_DIR/raw.csv"
: >"$OUT_DIR/bench.csv"
: >"$OUT_DIR/verify.txt"
one_run() { # round placement workers
  local r=$1 pl=$2 n=$3 dir="$WORK/r$1-$2-w$3" i pids before=() after=() conns="" rc=0
  mkdir -p "$dir"
  write_config "$dir"
  port_open "$PROXY" && fail "port $PROXY is still in use before the $pl/N=$n start"
  taskset -c "${PROXY_CPUS[$pl]}" phiproxy run -c "$dir/phiproxy.toml" --workers "$n" \
    --log-level warning 2>"$WORK/phiproxy-r$r-$pl-w$n.log" &
  PROXY_PID=$!
  wait_port "$PROXY" 30 "$PROXY_PID" || fail "phiproxy did not listen (see $OUT_DIR/logs/phiproxy-r$r-$pl-w$n.log)"
  if ((n > 1)); then  # every worker listens (SO_REUSEPORT): wait until each opened its trail
    for ((i = 0; i < 100; i++)); do
      [[ $(cat "/proc/$PROXY_PID/task/$PROXY_PID/children" 2>/dev/null | wc -w) -ge $n ]] && break
      sleep 0.1
    done
    sleep 0.5
  fi
  bench "$WARMUP" "$dir/warmup.csv" || fail "warm-up failed: $(tr '\r' '\n' <"$dir/warmup.csv.err" | tail -n2)"
  for ((i = 1; i <= n; i++)); do before+=("$(connects "$(trail "$dir" "$n" "$i")")"); done
  # shellcheck disable=SC2207
  pids=("$PROXY_PID" $(cat "/proc/$PROXY_PID/task/$PROXY_PID/children" 2>/dev/null))
  local p0 p1 tf="$dir/time" real usr sys TIMEFORMAT='%R %U %S'
  p0=$(proc_ticks "${pids[@]}")
  { time bench "$REQUESTS" "$dir/run.csv"; } 2>"$tf" || rc=$?
  p1=$(proc_ticks "${pids[@]}")
  ((rc == 0)) || fail "redis-benchmark failed (rc=$rc): $(tr '\r' '\n' <"$dir/run.csv.err" | tail -n2)"
  read -r real usr sys <"$tf"
  for ((i = 1; i <= n; i++)); do
    after+=("$(connects "$(trail "$dir" "$n" "$i")")")
    conns+="${conns:+/}$((after[i - 1] - before[i - 1]))"
  done
  local line rps avg p50 p95 p99 max ccpu pcpu
  line=$(grep -v '^"test"' "$dir/run.csv" | tail -n1)
  echo "$r,$pl,$n,$line" >>"$OUT_DIR/bench.csv"
  IFS=, read -r _ rps avg _ p50 p95 p99 max <<<"$(tr -d '"' <<<"$line")"
  ccpu=$(awk -v r="$real" -v u="$usr" -v s="$sys" 'BEGIN{printf "%.0f", (r > 0 ? 100 * (u + s) / r : 0)}')
  pcpu=$(awk -v r="$real" -v d="$((p1 - p0))" -v hz="$CLK_TCK" 'BEGIN{printf "%.0f", (r > 0 ? 100 * d / hz / r : 0)}')
  echo "$r,$pl,$n,$REQUESTS,$rps,$avg,$p50,$p95,$p99,$max,$ccpu,$pcpu,$real,$conns" >>"$OUT_DIR/raw.csv"
  log "  round $r  $pl (${LABEL[$pl]})  N=$n: $rps ops/s p50=${p50}ms p99=${p99}ms client=${ccpu}% proxy=${pcpu}% connects=$conns"
  rc=0; stop_pid "$PROXY_PID" || rc=$?
  PROXY_PID=""
  ((rc == 0)) || fail "phiproxy exited with $rc after SIGTERM (see $OUT_DIR/logs/phiproxy-r$r-$pl-w$n.log)"
  if ((n > 1)); then
    # The configured path: verify finds every worker's trail beside it and checks each chain.
    local out
    out=$(phiproxy audit verify "$dir/audit.jsonl" --key-file "$WORK/audit.key" 2>&1) || rc=$?
    echo "round $r $pl N=$n: ${out//$'\n'/; }" | tee -a "$OUT_DIR/verify.txt" >&2
    ((rc == 0)) || fail "audit verify failed for the worker trails in $dir"
    grep -q "OK: all $n trails verify" <<<"$out" || fail "audit verify did not find $n worker trails: $out"
  fi
}

for ((r = 1; r <= ROUNDS; r++)); do
  log "round $r/$ROUNDS"
  for pl in $PLACEMENTS; do
    for n in 1 2; do one_run "$r" "$pl" "$n"; done
  done
done

# ---------------------------------------------------------------- report
{
  python - "$OUT_DIR/raw.csv" "A=${LABEL[A]}" "B=${LABEL[B]}" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
labels = dict(a.split("=", 1) for a in sys.argv[2:])
def num(v):
    try:
        return float(v)
    except ValueError:
        return None
print("| placement | workers | ops/s (median) | p50 ms | ratio vs 1 worker | connections per worker |")
print("|---|---|---|---|---|---|")
for pl in dict.fromkeys(r["placement"] for r in rows):
    by = {(r["round"], r["workers"]): r for r in rows if r["placement"] == pl}
    for n in ("1", "2"):
        mine = [r for r in rows if r["placement"] == pl and r["workers"] == n]
        rps = [x for x in (num(r["rps"]) for r in mine) if x is not None]
        p50 = [x for x in (num(r["p50_ms"]) for r in mine) if x is not None]
        ratios = [num(r["rps"]) / num(by[(r["round"], "1")]["rps"]) for r in mine
                  if (r["round"], "1") in by and num(r["rps"]) and num(by[(r["round"], "1")]["rps"])]
        ratio = "1.00" if n == "1" else (f"{statistics.median(ratios):.2f}" if ratios else "NA")
        conns = ", ".join(r["connects"] for r in mine)
        print(f"| {pl}: {labels[pl]} | {n} | {statistics.median(rps):,.0f} | "
              f"{statistics.median(p50):.3f} | {ratio} | {conns} |" if rps else
              f"| {pl}: {labels[pl]} | {n} | NA | NA | NA | {conns} |")
EOF
  echo
  echo "A: redis-server + phiproxy (all workers) on CPU $SERVER_CPU, redis-benchmark on CPU $CLIENT_CPU." \
    "B: redis-server on CPU $SERVER_CPU, phiproxy on CPUs $SPREAD_CPUS, redis-benchmark on CPU $CLIENT_CPU."
  echo "redis-benchmark ${WORKLOAD[*]} -n $REQUESTS (mutual TLS, every key PHI); median of $ROUNDS" \
    "round(s); ratio = median per-round N=2/N=1; connections = \"event\":\"connect\" records per" \
    "worker trail during the measured run (w1/w2, one entry per round)."
  echo "audit verify: $(grep -c 'OK: all' "$OUT_DIR/verify.txt" || true) worker set(s) OK;" \
    "whole run: $(($(date +%s) - T0)) s; raw.csv, bench.csv, verify.txt, logs in $OUT_DIR"
} | tee "$OUT_DIR/table.md"
