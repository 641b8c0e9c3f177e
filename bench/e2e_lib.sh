# e2e_lib.sh - sourced by e2e_quick.sh and protect_cost.sh: a work dir, a dev PKI, a TLS-only
# redis-server pinned to CPU 0, and write_config NAME PORT PHI_KEYS [EXTRA_TOML] for a
# phiproxy in front of it (one role "bench", identity CN=bench). Needs scripts/bootstrap.sh.
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
write_config() { # name port phi_keys [extra toml]
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
acl = "+@read +@write +ping +config|get +select ~key:* ~counter:* ~mylist ~myset:* ~app:phi:*"
[[identities]]
subject_cn = "bench"
role = "bench"
${4:-}
TOML
}
