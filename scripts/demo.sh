#!/usr/bin/env bash
# The demo: a development PKI, a TLS-only backend redis-server, phiproxy in front of it, and
# redis-cli talking through the proxy as mapped (and unmapped) clients. Everything lives in
# ./demo-run (recreated each time) and is stopped on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"

RUN="$ROOT/demo-run"
rm -rf "$RUN" && mkdir -p "$RUN" && chmod 700 "$RUN"
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BACKEND_PORT=$(free_port)
PROXY_PORT=$(free_port)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@" 2>&1 | sed 's/^/  /' || true; }

step "1. development PKI (phiproxy certs dev)"
phiproxy certs dev --out "$RUN/certs" --client billing-service --client reports --client intruder \
  | sed "s|$RUN/||" | tr '\n' ' '; echo

step "2. TLS-only backend redis-server on 127.0.0.1:$BACKEND_PORT (plaintext port off, client certs required)"
(umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$RUN/backend.pass")
cat >"$RUN/redis-users.acl" <<ACL
user default off
user phiproxy on >$(cat "$RUN/backend.pass") ~* &* +@all
ACL
chmod 600 "$RUN/redis-users.acl"
redis-server --port 0 --tls-port "$BACKEND_PORT" --bind 127.0.0.1 \
  --tls-cert-file "$RUN/certs/backend.pem" --tls-key-file "$RUN/certs/backend-key.pem" \
  --tls-ca-cert-file "$RUN/certs/backend-ca.pem" --tls-auth-clients yes \
  --aclfile "$RUN/redis-users.acl" --save '' --appendonly no --dir "$RUN" \
  --logfile "$RUN/redis.log" &
PIDS+=($!)

step "3. phiproxy on 127.0.0.1:$PROXY_PORT (mutual TLS in, TLS + AUTH out)"
(umask 077; head -c 32 /dev/urandom >"$RUN/audit.key")
mkdir -p "$RUN/audit"
cat >"$RUN/phiproxy.toml" <<TOML
[listener]
address = "127.0.0.1"
port = $PROXY_PORT
cert = "certs/proxy.pem"
key = "certs/proxy-key.pem"
client_ca = "certs/clients-ca.pem"
crl = "certs/clients.crl"
allow_networks = ["127.0.0.0/8"]

[backend]
address = "127.0.0.1"
port = $BACKEND_PORT
ca = "certs/backend-ca.pem"
server_name = "localhost"
cert = "certs/proxy-client.pem"
key = "certs/proxy-client-key.pem"
username = "phiproxy"
password_file = "backend.pass"

[audit]
path = "audit/audit.jsonl"
key_file = "audit.key"
phi_keys = ["app:phi:*"]
environment = "demo"
instance = "demo-proxy"

[metrics]
port = 0

[roles.writer]
acl = "+@read +@write -@dangerous ~app:phi:* &app:events:*"

[roles.reader]
acl = "+@read -@dangerous ~app:phi:*"

[[identities]]
subject_cn = "billing-service"
role = "writer"

[[identities]]
subject_cn = "reports"
role = "reader"
TOML
show phiproxy check-config -c "$RUN/phiproxy.toml"
phiproxy run -c "$RUN/phiproxy.toml" 2>"$RUN/proxy.log" &
PIDS+=($!)
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PROXY_PORT") 2>/dev/null && break
  sleep 0.1
done

cli() { # client-name args...
  local name=$1; shift
  redis-cli --tls -h 127.0.0.1 -p "$PROXY_PORT" --cacert "$RUN/certs/clients-ca.pem" \
    --cert "$RUN/certs/client-$name.pem" --key "$RUN/certs/client-$name-key.pem" "$@"
}

step "4. billing-service (role writer) stores and reads PHI through the proxy"
show cli billing-service SET app:phi:patient:1001 '{"name":"Jane Doe","mrn":"A-1001"}'
show cli billing-service GET app:phi:patient:1001
show cli billing-service AUTH legacy-user legacy-password
echo '$ printf "INCR app:phi:visits\r\nINCR app:phi:visits\r\nGET app:phi:visits\r\n" | redis-cli --tls ...  # several commands from stdin'
printf 'INCR app:phi:visits\r\nINCR app:phi:visits\r\nGET app:phi:visits\r\n' | cli billing-service 2>&1 | sed 's/^/  /'

step "5. reports (role reader) reads; writes and other keys are refused with NOPERM"
show cli reports GET app:phi:patient:1001
show cli reports SET app:phi:patient:1001 overwritten
show cli reports GET billing:invoice:7
show cli reports FLUSHALL

step "6. refused before any command: unmapped certificate, no certificate"
show cli intruder PING
printf '$ redis-cli --tls (no client certificate) PING\n'
redis-cli --tls -h 127.0.0.1 -p "$PROXY_PORT" --cacert "$RUN/certs/clients-ca.pem" PING 2>&1 | sed 's/^/  /' || true

step "6b. why: phiproxy explain (the role, the decision and the rule that decided)"
show phiproxy explain -c "$RUN/phiproxy.toml" --cert "$RUN/certs/client-reports.pem" -- FLUSHALL
printf 'GET app:phi:patient:1001\nSET app:phi:patient:1001 x\nKEYS *\n' | \
  phiproxy explain -c "$RUN/phiproxy.toml" --role writer 2>/dev/null | sed 's/^/  /'

step "7. the backend, read directly with the proxy's own identity (password from backend.pass)"
direct() {
  REDISCLI_AUTH=$(cat "$RUN/backend.pass") redis-cli --tls -h 127.0.0.1 -p "$BACKEND_PORT" \
    --cacert "$RUN/certs/backend-ca.pem" --cert "$RUN/certs/proxy-client.pem" \
    --key "$RUN/certs/proxy-client-key.pem" --user phiproxy "$@"
}
show direct GET app:phi:patient:1001
show direct ACL WHOAMI

step "8. the audit trail: PHI commands, refusals, connections; never a value"
sleep 0.2
python - "$RUN/audit/audit.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    who = (r.get("identity") or {}).get("cn") or "-"
    what = r.get("command") or ""
    keys = " ".join(r.get("keys") or [])
    print(f"  #{r['seq']:<3} {r['event']:<17} {who:<16} {r.get('role') or '-':<7} {what} {keys}"
          f"{'  (' + r['reason'][:60] + ')' if r.get('reason') else ''}")
PY
if grep -q 'Jane Doe' "$RUN/audit/audit.jsonl"; then echo "  !! a value reached the trail"; else echo "  (the stored value 'Jane Doe' appears nowhere in the trail)"; fi
show phiproxy audit verify "$RUN/audit/audit.jsonl" --key-file "$RUN/audit.key"
printf '$ (edit one record) && phiproxy audit verify ...\n'
cp "$RUN/audit/audit.jsonl" "$RUN/audit/tampered.jsonl"
sed -i '0,/"command":"get"/s//"command":"del"/' "$RUN/audit/tampered.jsonl"
phiproxy audit verify "$RUN/audit/tampered.jsonl" --key-file "$RUN/audit.key" --no-head 2>&1 | sed 's/^/  /' || true

step "9. the backend's hardening, by HIPAA section (phiproxy scan-backend; the demo backend is not hardened)"
printf '$ phiproxy scan-backend -c %s | grep -E "^HIPAA|FAIL|summary"\n' "$RUN/phiproxy.toml"
phiproxy scan-backend -c "$RUN/phiproxy.toml" 2>&1 | grep -E "^HIPAA|^  FAIL|^summary" | sed 's/^/  /' || true

step "10. access review: per identity and role, what was granted, used, refused; a tightened rule"
show phiproxy access-review -c "$RUN/phiproxy.toml" --since 1d

step "11. the evidence pack for an auditor (phiproxy report: report.html, report.json)"
show phiproxy report -c "$RUN/phiproxy.toml" --since 1d --out "$RUN/evidence"
python - "$RUN/evidence/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"  audit trail: {r['trail_status']}; controls: {r['controls']['summary']}")
for f in r["findings"][:5]:
    print(f"  [{f['severity']}] {f['finding'][:110]}")
print(f"  ... {len(r['findings'])} findings; open {sys.argv[1][:-4]}html in a browser or print it")
PY
if grep -q 'patient:1001' "$RUN/evidence/report.html" "$RUN/evidence/report.json"; then
  echo "  !! a key name reached the evidence pack"
else
  echo "  (no key name, e.g. app:phi:patient:1001, appears in the evidence pack)"
fi

step "12. what the proxy logged (stderr)"
sleep 0.2
sed 's/^/  /' "$RUN/proxy.log"
printf '\nDemo files are in %s (certificates, configuration, logs).\n' "$RUN"
