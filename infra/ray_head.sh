#!/usr/bin/env bash
# A Ray head (and worker nodes joining it), for `ray job submit`.
#
#   infra/ray_head.sh start              # start a head (PID in $RAY_HEAD_STATE/head.pid), wait until jobs can be submitted
#   infra/ray_head.sh status             # cluster resources and dashboard address
#   infra/ray_head.sh stop               # stop it by its PID
#   infra/ray_head.sh join HEAD_IP:PORT  # on another machine: join that head as a worker node (PID in worker.pid)
#   infra/ray_head.sh leave              # stop this machine's worker node by its PID
#
# Single machine (default): Ray's local-only mode keeps GCS, raylet and dashboard on 127.0.0.1.
# Several machines: start the head with RAY_HEAD_IP set to the address the other machines reach it at; that turns
# on Ray's multi-node mode (the head then listens on that address, the dashboard stays on 127.0.0.1). On each other
# machine copy the head's ~/.ray/auth_token, set RAY_NODE_IP to that machine's own address and run
# `join HEAD_IP:6379`. Then, on the head:
#
#        export RAY_AUTH_MODE=token
#        ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/compress_corpus.py --input videos/ --output out/
#
# The head requires Ray's token authentication; the token lives in ~/.ray/auth_token (made on first start), and
# clients and joining nodes send it when RAY_AUTH_MODE=token.
#
# Environment: RAY_HEAD_STATE (PID files and logs), RAY_HEAD_CPUS (CPUs this node offers), RAY_HEAD_PORT,
# RAY_DASHBOARD_PORT, RAY_AGENT_PORT (this node's job agent), RAY_HEAD_IP, RAY_NODE_IP, RAY_NODE_ARGS (more
# `ray start` flags, e.g. "--num-gpus 1 --object-store-memory 2000000000"), RAY (the ray executable).
set -euo pipefail

STATE=${RAY_HEAD_STATE:-${TMPDIR:-/tmp}/tokendyn-ray-head}
NUM_CPUS=${RAY_HEAD_CPUS:-$(nproc)}
GCS_PORT=${RAY_HEAD_PORT:-6379}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
AGENT_PORT=${RAY_AGENT_PORT:-52365}
HEAD_IP=${RAY_HEAD_IP:-}
NODE_IP=${RAY_NODE_IP:-}
read -r -a NODE_ARGS <<<"${RAY_NODE_ARGS:-}"
RAY=${RAY:-ray}
if [[ -n "$HEAD_IP" || "${1:-}" == join ]]; then
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1  # multi-node: nodes on other machines must reach this one
else
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # local-only: everything on 127.0.0.1
fi
export RAY_AUTH_MODE=token

http_answers() { [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1" || true)" != "000" ]]; }

pid_alive() { [[ -f "$STATE/$1.pid" ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

start() {
  if pid_alive head; then echo "Ray head already running (PID $(cat "$STATE/head.pid"))"; return 0; fi
  mkdir -p "$STATE"
  "$RAY" get-auth-token --generate >/dev/null
  # --block keeps `ray start` in the foreground as the parent of the head's processes, in a process group of its
  # own (setsid): stopping that group stops the whole node.
  setsid "$RAY" start --head --block --num-cpus="$NUM_CPUS" --node-ip-address="${HEAD_IP:-127.0.0.1}" --port="$GCS_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true \
    --dashboard-agent-listen-port="$AGENT_PORT" --disable-usage-stats "${NODE_ARGS[@]}" >"$STATE/head.log" 2>&1 &
  echo $! >"$STATE/head.pid"
  for _ in $(seq 1 120); do
    # Jobs can be submitted once both the dashboard and the head's job agent answer HTTP (any status: 401 when
    # token authentication is on). The dashboard alone answers first and rejects jobs with "no available agent".
    if http_answers "$DASHBOARD_PORT/api/version" && http_answers "$AGENT_PORT/api/local_raylet_healthz"; then
      echo "Ray head up (PID $(cat "$STATE/head.pid")); dashboard and job API at http://127.0.0.1:$DASHBOARD_PORT"
      return 0
    fi
    pid_alive head || { echo "Ray head exited; log:"; cat "$STATE/head.log"; return 1; }
    sleep 1
  done
  echo "Ray head did not answer within 120 s; log in $STATE/head.log"; stop_node head; return 1
}

join() {
  local address=${1:?usage: $0 join HEAD_IP:PORT}
  if pid_alive worker; then echo "Worker node already running (PID $(cat "$STATE/worker.pid"))"; return 0; fi
  [[ -s ~/.ray/auth_token ]] || { echo "no ~/.ray/auth_token: copy the head's token first"; return 1; }
  mkdir -p "$STATE"
  local ip_args=()
  [[ -n "$NODE_IP" ]] && ip_args=(--node-ip-address="$NODE_IP")
  setsid "$RAY" start --address="$address" --block --num-cpus="$NUM_CPUS" "${ip_args[@]}" \
    --dashboard-agent-listen-port="$AGENT_PORT" --disable-usage-stats "${NODE_ARGS[@]}" >"$STATE/worker.log" 2>&1 &
  echo $! >"$STATE/worker.pid"
  for _ in $(seq 1 120); do
    # `ray start --block` prints this once the node's raylet has registered with the head.
    if grep -q "Ray runtime started" "$STATE/worker.log"; then
      echo "Worker node up (PID $(cat "$STATE/worker.pid")), joined $address"
      return 0
    fi
    pid_alive worker || { echo "Worker node exited; log:"; cat "$STATE/worker.log"; return 1; }
    sleep 1
  done
  echo "Worker node did not join within 120 s; log in $STATE/worker.log"; stop_node worker; return 1
}

stop_node() {  # head | worker
  if ! pid_alive "$1"; then echo "Ray $1 not running"; rm -f "$STATE/$1.pid"; return 0; fi
  local pid; pid=$(cat "$STATE/$1.pid")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid"
  rm -f "$STATE/$1.pid"
  echo "Ray $1 stopped"
}

status() {
  if ! pid_alive head; then echo "Ray head not running"; return 1; fi
  echo "Ray head PID $(cat "$STATE/head.pid"), dashboard http://127.0.0.1:$DASHBOARD_PORT (clients: RAY_AUTH_MODE=token)"
  "$RAY" status --address "${HEAD_IP:-127.0.0.1}:$GCS_PORT"
}

case "${1:-}" in
  start) start ;;
  stop) stop_node head ;;
  status) status ;;
  join) join "${2:-}" ;;
  leave) stop_node worker ;;
  *) echo "usage: $0 start|stop|status|join HEAD_IP:PORT|leave   (env: see the top of this script)"; exit 2 ;;
esac
