#!/usr/bin/env bash
# Starts the demo: payments stable (v1) on :8081, canary (v2) on :8082, Envoy with handoff on
# :10000 (admin :9901), using envoy/demo.yaml. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
ENVOY_BIN=${ENVOY_BIN:-.venv/bin/envoy}
PAYMENTS=target/debug/examples/payments
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

for port in 8081 8082 10000 9901; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "port $port is in use: stop what runs there (a previous 'make run'?) and retry" >&2; exit 1
  fi
done
$PAYMENTS --name stable --version v1 --listen 127.0.0.1:8081 >/dev/null & pids+=($!)
$PAYMENTS --name canary --version v2 --listen 127.0.0.1:8082 >/dev/null & pids+=($!)
"$ENVOY_BIN" -c envoy/demo.yaml --concurrency 2 -l warn --component-log-level wasm:info & pids+=($!)

for _ in $(seq 1 300); do
  curl -fs 127.0.0.1:9901/ready >/dev/null 2>&1 && break
  kill -0 "${pids[2]}" 2>/dev/null || { echo "Envoy exited; see its log above" >&2; exit 1; }
  sleep 0.1
done
curl -fs 127.0.0.1:9901/ready >/dev/null || { echo "Envoy did not become ready" >&2; exit 1; }

cat <<'TXT'

handoff demo is up: Envoy 127.0.0.1:10000 (admin 127.0.0.1:9901)
  stable payments (v1) 127.0.0.1:8081, canary payments (v2) 127.0.0.1:8082

Try:
  # sticky canary: the same user always lands on the same version (12.5% canary)
  curl -si -H 'x-user-id: alice' 127.0.0.1:10000/ | grep -iE 'x-canary-variant|x-upstream'
  curl -si -H 'x-user-id: u-1'   127.0.0.1:10000/ | grep -iE 'x-canary-variant|x-upstream'   # allow-listed
  # a client cannot pick its cohort: the header is replaced
  curl -si -H 'x-user-id: alice' -H 'x-canary-variant: canary' 127.0.0.1:10000/ | grep -i x-upstream
  # anonymous users get a cookie and keep their cohort
  curl -si 127.0.0.1:10000/ | grep -i set-cookie
  # translation: u-1 is a canary user, so its v1 request reaches the v2 backend translated both
  # ways; idempotency: the same key again is replayed (idempotent-replayed: true), not executed
  curl -si 127.0.0.1:10000/api/v1/payments -H 'x-user-id: u-1' -H 'idempotency-key: demo-1' \
       -H 'content-type: application/json' -d '{"amount": 12.5, "currency": "EUR", "customer_id": "c-1"}'
  curl -si 127.0.0.1:10000/api/v1/payments -H 'x-user-id: u-1' -H 'idempotency-key: demo-1' \
       -H 'content-type: application/json' -d '{"amount": 12.5, "currency": "EUR", "customer_id": "c-1"}'
  curl -s 127.0.0.1:8082/_admin/executions      # the v2 backend ran demo-1 once
  # the same key with another body: 422; no key: 400 (application/problem+json)
  curl -si 127.0.0.1:10000/api/v1/payments -H 'x-user-id: u-1' -H 'idempotency-key: demo-1' \
       -H 'content-type: application/json' -d '{"amount": 99, "currency": "EUR", "customer_id": "c-1"}'
  # drain: Envoy sends GOAWAY / connection: close, responses carry reconnect hints
  curl -s -X POST 127.0.0.1:10000/.well-known/handoff/drain
  curl -si 127.0.0.1:10000/ | grep -iE 'x-handoff-reconnect-after-ms|connection'
  curl -s -X DELETE 127.0.0.1:10000/.well-known/handoff/drain
  # decisions as Prometheus metrics
  curl -s 127.0.0.1:9901/stats/prometheus | grep ^handoff_

Ctrl-C stops everything.
TXT
wait -n "${pids[@]}"
