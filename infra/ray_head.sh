#!/usr/bin/env bash
# A single-node Ray head with its dashboard on 127.0.0.1, for `ray job submit` on this machine.
#
#   infra/ray_head.sh start      # start it (PID in $RAY_HEAD_STATE/head.pid), wait until jobs can be submitted
#   infra/ray_head.sh status     # cluster resources and dashboard address
#   infra/ray_head.sh stop       # stop it by its PID
#
# Then:  export RAY_AUTH_MODE=token
#        ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/compress_corpus.py --input videos/ --output out/
#
# The head requires Ray's token authentication; the token lives in ~/.ray/auth_token (made on first start), and
# clients send it when RAY_AUTH_MODE=token.
set -euo pipefail

STATE=${RAY_HEAD_STATE:-${TMPDIR:-/tmp}/tokendyn-ray-head}
NUM_CPUS=${RAY_HEAD_CPUS:-$(nproc)}
GCS_PORT=${RAY_HEAD_PORT:-6379}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
AGENT_PORT=${RAY_AGENT_PORT:-52365}
RAY=${RAY:-ray}
# Local-only mode keeps GCS, raylet and dashboard on loopback instead of the machine's external address.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_MODE=token

http_answers() { [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1" || true)" != "000" ]]; }

pid_alive() { [[ -f "$STATE/head.pid" ]] && kill -0 "$(cat "$STATE/head.pid")" 2>/dev/null; }

start() {
  if pid_alive; then echo "Ray head already running (PID $(cat "$STATE/head.pid"))"; return 0; fi
  mkdir -p "$STATE"
  "$RAY" get-auth-token --generate >/dev/null
  # --block keeps `ray start` in the foreground as the parent of the head's processes; stopping that one PID
  # stops the whole head.
  "$RAY" start --head --block --num-cpus="$NUM_CPUS" --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true \
    --dashboard-agent-listen-port="$AGENT_PORT" \
    --disable-usage-stats >"$STATE/head.log" 2>&1 &
  echo $! >"$STATE/head.pid"
  for _ in $(seq 1 120); do
    # Jobs can be submitted once both the dashboard and the head's job agent answer HTTP (any status: 401 when
    # token authentication is on). The dashboard alone answers first and rejects jobs with "no available agent".
    if http_answers "$DASHBOARD_PORT/api/version" && http_answers "$AGENT_PORT/api/local_raylet_healthz"; then
      echo "Ray head up (PID $(cat "$STATE/head.pid")); dashboard and job API at http://127.0.0.1:$DASHBOARD_PORT"
      return 0
    fi
    pid_alive || { echo "Ray head exited; log:"; cat "$STATE/head.log"; return 1; }
    sleep 1
  done
  echo "Ray head did not answer within 120 s; log in $STATE/head.log"; stop; return 1
}

stop() {
  if ! pid_alive; then echo "Ray head not running"; rm -f "$STATE/head.pid"; return 0; fi
  local pid; pid=$(cat "$STATE/head.pid")
  kill -TERM "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  rm -f "$STATE/head.pid"
  echo "Ray head stopped"
}

status() {
  if ! pid_alive; then echo "Ray head not running"; return 1; fi
  echo "Ray head PID $(cat "$STATE/head.pid"), dashboard http://127.0.0.1:$DASHBOARD_PORT (clients: RAY_AUTH_MODE=token)"
  "$RAY" status --address "127.0.0.1:$GCS_PORT"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status   (env: RAY_HEAD_STATE, RAY_HEAD_CPUS, RAY_HEAD_PORT, RAY_DASHBOARD_PORT, RAY_AGENT_PORT)"; exit 2 ;;
esac
