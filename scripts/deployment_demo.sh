#!/usr/bin/env bash
# A whole fedfin deployment on one machine, over loopback: the commands of
# docs/deployment.md, in order. The coordinator runs a SuperLink that listens on 127.0.0.1
# only (TLS, SuperNode authentication, a durable database, process isolation), an
# authenticated executor for the ServerApp, and one public door: nginx, forwarding only
# Fleet API calls. Three banks each run a SuperNode with their own key, data and state,
# connecting through the door; the coordinator launches two rounds over its loopback
# Control API and each bank audits its own ledger.
#
# Usage: bash scripts/deployment_demo.sh WORK_DIR [BASE_PORT] [--hold]
#   ports: BASE_PORT SuperLink (loopback), +1 the door, +2.. each bank's SuperNode
#   --hold: when done, write WORK_DIR/ready and keep everything running until stopped
#           (the deployment tests use the live deployment this way)
#   ROUNDS=N (environment): server rounds, default 2
# Every process it starts is stopped on exit, by PID; their PIDs are in WORK_DIR/pids.
set -euo pipefail
work="$(mkdir -p "$1" && cd "$1" && pwd)"
port="${2:-19000}"
hold="${3:-}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$root/.venv/bin:$PATH"
export FLWR_HOME="$work/flwr-home"    # the coordinator's Flower CLI config lives here
export FLWR_TELEMETRY_ENABLED=0       # Flower sends no usage events ...
export FLWR_DISABLE_UPDATE_CHECK=1    # ... and asks no server for new versions
link_port="$port"
door_port="$((port + 1))"
door_host="${DOOR_HOST:-127.0.0.1}"   # a real coordinator: its public address, or 0.0.0.0
banks=(bank-00 bank-01 bank-02)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
    sleep 1
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 143' TERM INT
start() {  # start a long-running process in its own process group; remember its PID
    local log="$1"; shift
    setsid "$@" >"$log" 2>&1 &
    pids+=("$!")
    echo "$! $(basename "$log" .log)" >>"$work/pids"  # PID and name, for the tests
}
wait_for_tls() {  # until HOST:PORT answers with a certificate signed by our CA
    for _ in $(seq 60); do
        fedfin check-connection --superlink "$1" --root-certificates "$work/certs/ca.crt" \
            >/dev/null 2>&1 && return 0
        sleep 1
    done
    fedfin check-connection --superlink "$1" --root-certificates "$work/certs/ca.crt"
}

# --- Coordinator: the door is nginx from the distribution ------------------------------
if ! command -v nginx >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "nginx is missing: apt-get install -y nginx (as root)" >&2; exit 1; }
    apt-get install -y nginx >/dev/null || { apt-get update >/dev/null && apt-get install -y nginx >/dev/null; }
fi

# --- Coordinator: TLS material, the executor's secret, the pretrained encoder --------
fedfin certs --out "$work/certs" --host localhost --host 127.0.0.1
fedfin exec-secret --out "$work/coordinator/exec.secret"
fedfin pretrain --data lending-club --out "$work/encoder" --quiet

# --- Each bank: its SuperNode key pair (and, for this demo, its data) ---------------
fedfin split --data lending-club --banks "${#banks[@]}" --out "$work/bank-data"
for bank in "${banks[@]}"; do
    fedfin keys --out "$work/keys" --name "$bank"
done

# --- Coordinator: SuperLink on loopback: TLS, SuperNode auth, a durable database -----
mkdir -p "$work/coordinator/state"
start "$work/superlink.log" flower-superlink \
    --ssl-ca-certfile "$work/certs/ca.crt" \
    --ssl-certfile "$work/certs/server.pem" \
    --ssl-keyfile "$work/certs/server.key" \
    --enable-supernode-auth \
    --database "$work/coordinator/state/superlink.db" \
    --disable-runtime-dependency-installation \
    --isolation process \
    --superexec-auth-secret-file "$work/coordinator/exec.secret" \
    --host 127.0.0.1 \
    --port "$link_port"
wait_for_tls "127.0.0.1:$link_port"

# --- Coordinator: the ServerApp's executor, authenticated with the shared secret -----
start "$work/superexec.log" flower-superexec \
    --runtime-api-address "127.0.0.1:$link_port" \
    --root-certificates "$work/certs/ca.crt" \
    --superexec-auth-secret-file "$work/coordinator/exec.secret"

# --- Coordinator: the one public door, forwarding Fleet API calls only ---------------
fedfin proxy-config --certs "$work/certs" --listen "$door_host:$door_port" \
    --superlink-port "$link_port" --prefix "$work/door" --out "$work/door/nginx.conf"
start "$work/door.log" nginx -c "$work/door/nginx.conf" -p "$work/door" -g 'daemon off;'
wait_for_tls "$door_host:$door_port"

# --- Coordinator: its own Flower CLI talks to the Control API on loopback ------------
mkdir -p "$FLWR_HOME"
cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "fedfin"

[superlink.fedfin]
address = "127.0.0.1:$link_port"
root-certificates = "$work/certs/ca.crt"
TOML

# --- Coordinator: register each bank's public key; keep its node ID to revoke it ------
mkdir -p "$work/coordinator/nodes"
for bank in "${banks[@]}"; do
    flwr supernode register "$work/keys/$bank.pub" fedfin --format json \
        | python -c 'import json,sys; print(json.load(sys.stdin)["node-id"])' \
        >"$work/coordinator/nodes/$bank"
    echo "registered $bank as node $(cat "$work/coordinator/nodes/$bank")"
done

# --- Each bank: check the door, then start its SuperNode ----------------------------
i=1
for bank in "${banks[@]}"; do
    i=$((i + 1))
    fedfin check-connection --superlink "$door_host:$door_port" \
        --root-certificates "$work/certs/ca.crt"
    start "$work/supernode-$bank.log" flower-supernode \
        --superlink "$door_host:$door_port" \
        --root-certificates "$work/certs/ca.crt" \
        --auth-supernode-private-key "$work/keys/$bank" \
        --port "$((port + i))" \
        --node-config "bank-name='$bank' data-path='$work/bank-data/$bank' state-dir='$work/state/$bank' epsilon-budget=1.0 delta=1e-5 max-grad-norm=1.0 min-noise-multiplier=0.5"
done
for _ in $(seq 60); do
    [ "$(flwr supernode list fedfin --format json 2>/dev/null | grep -c '"online"')" -ge "${#banks[@]}" ] && break
    sleep 1
done

# --- Coordinator: launch the run from the fedfin project and follow it ---------------
cd "$root"
flwr run . fedfin --run-config "encoder-dir='$work/encoder' out-dir='$work/server' num-server-rounds=${ROUNDS:-2}"
status=""
for _ in $(seq 600); do
    status="$(flwr ls fedfin --format json | python -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["status"])')"
    case "$status" in finished:*) break ;; esac
    sleep 2
done
flwr ls fedfin --format json >"$work/runs.json"
run_id="$(python -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["run-id"])' <"$work/runs.json")"
flwr log "$run_id" fedfin --show >"$work/serverapp.log" 2>&1 || true
echo "run $run_id status: $status"

# --- Each bank: audit its own ledger --------------------------------------------------
for bank in "${banks[@]}"; do
    fedfin audit "$work/state/$bank" --json "$work/audit-$bank.json"
done
[ "$status" = "finished:completed" ]

if [ "$hold" = "--hold" ]; then
    touch "$work/ready"
    sleep 86400 &
    pids+=("$!")
    wait "$!"
fi
