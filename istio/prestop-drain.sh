#!/bin/sh
# prestop-drain.sh: drain this pod's handoff filter before Kubernetes stops it.
#
# Starts a drain on handoff's admin path (POST), then polls its state (GET) until no request is
# in flight in this Envoy, or until the deadline passes. An open WebSocket counts as in flight
# until it is closed (with the drain's `websocket` part, handoff closes each one with 1001). Use it as the preStop hook of the
# container that runs it (it needs only curl and a POSIX sh):
#
#   lifecycle:
#     preStop:
#       exec:
#         command: ["/bin/sh", "/handoff/prestop-drain.sh", "-d", "25"]
#
# Keep the deadline below terminationGracePeriodSeconds (and Istio's terminationDrainDuration).
#
# Options (each also an environment variable):
#   -u URL    admin URL              HANDOFF_DRAIN_URL (default: see below)
#   -t TOKEN  bearer token           HANDOFF_DRAIN_TOKEN (needed unless the peer is loopback)
#   -d SECS   deadline in seconds    HANDOFF_DRAIN_DEADLINE_S (default 25)
#   -g SECS   grace before new requests get 503 (default: the configured grace_s)
#                                    HANDOFF_DRAIN_GRACE_S
#   -i SECS   poll interval          HANDOFF_DRAIN_POLL_S (default 1)
# The default URL is http://127.0.0.1:10000/.well-known/handoff/drain (a standalone Envoy). In
# Istio, call the sidecar's inbound listener through the pod IP and the app's port, with a token:
# -u "http://$POD_IP:8080/.well-known/handoff/drain" -t "$HANDOFF_DRAIN_TOKEN".
#
# Exit codes:
#   0  drained: the drain is on and no request is in flight
#   1  the deadline passed with requests still in flight (the drain stays on)
#   2  usage error
#   3  the drain could not be started (unreachable, refused, not configured)
set -u

url=${HANDOFF_DRAIN_URL:-http://127.0.0.1:10000/.well-known/handoff/drain}
token=${HANDOFF_DRAIN_TOKEN:-}
deadline_s=${HANDOFF_DRAIN_DEADLINE_S:-25}
grace_s=${HANDOFF_DRAIN_GRACE_S:-}
poll_s=${HANDOFF_DRAIN_POLL_S:-1}

usage() {
  echo "usage: $0 [-u URL] [-t TOKEN] [-d DEADLINE_S] [-g GRACE_S] [-i POLL_S]" >&2
  exit 2
}

while getopts u:t:d:g:i:h opt; do
  case $opt in
    u) url=$OPTARG ;;
    t) token=$OPTARG ;;
    d) deadline_s=$OPTARG ;;
    g) grace_s=$OPTARG ;;
    i) poll_s=$OPTARG ;;
    *) usage ;;
  esac
done
case $deadline_s in ''|*[!0-9]*) usage ;; esac
case $grace_s in *[!0-9]*) usage ;; esac
case $poll_s in ''|*[!0-9.]*) usage ;; esac

log() { echo "prestop-drain: $*" >&2; }

# curl with the token, if any; prints the body and then the status on its own line.
call() {
  method=$1
  target=$2
  if [ -n "$token" ]; then
    curl -sS -m 5 -X "$method" -H "Authorization: Bearer $token" -w '\n%{http_code}' "$target"
  else
    curl -sS -m 5 -X "$method" -w '\n%{http_code}' "$target"
  fi
}

start_url=$url
[ -n "$grace_s" ] && start_url="$url?grace_s=$grace_s"
out=$(call POST "$start_url") || { log "cannot reach $url"; exit 3; }
status=$(printf '%s\n' "$out" | tail -n 1)
if [ "$status" != 200 ]; then
  log "starting the drain failed: HTTP $status: $(printf '%s\n' "$out" | sed '$d')"
  exit 3
fi
log "drain started: $(printf '%s\n' "$out" | sed '$d')"

now() { date +%s; }
end=$(( $(now) + deadline_s ))
while :; do
  body=$(call GET "$url" | sed '$d')
  inflight=$(printf '%s' "$body" | sed -n 's/.*"inflight"[[:space:]]*:[[:space:]]*\([0-9][0-9]*\).*/\1/p')
  if [ "$inflight" = 0 ]; then
    log "no request in flight: $body"
    exit 0
  fi
  if [ "$(now)" -ge "$end" ]; then
    log "deadline of ${deadline_s}s passed with ${inflight:-unknown} request(s) in flight"
    exit 1
  fi
  sleep "$poll_s"
done
