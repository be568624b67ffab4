#!/usr/bin/env bash
# A whole fedfin deployment on one machine, over loopback: the commands of
# docs/deployment.md, in order. A coordinator runs a SuperLink with TLS and SuperNode
# authentication; three banks each run a SuperNode with their own key, data and state;
# the coordinator launches two rounds and each bank audits its own ledger.
#
# Usage: bash scripts/deployment_demo.sh WORK_DIR [BASE_PORT]
# Every process it starts is stopped on exit, by PID.
set -euo pipefail
work="$(mkdir -p "$1" && cd "$1" && pwd)"
port="${2:-19000}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$root/.venv/bin:$PATH"
export FLWR_HOME="$work/flwr-home"  # the coordinator's Flower CLI config lives here
banks=(bank-00 bank-01 bank-02)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
    sleep 1
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
start() {  # start a long-running process in its own process group; remember its PID
    local log="$1"; shift
    setsid "$@" >"$log" 2>&1 &
    pids+=("$!")
    echo "$!" >>"$work/pids"
}

# --- Coordinator: TLS material and the pretrained encoder ---------------------------
fedfin certs --out "$work/certs" --host localhost --host 127.0.0.1
fedfin pretrain --data lending-club --out "$work/encoder" --quiet

# --- Each bank: its SuperNode key pair (and, for this demo, its data) ---------------
fedfin split --data lending-club --banks "${#banks[@]}" --out "$work/bank-data"
for bank in "${banks[@]}"; do
    fedfin keys --out "$work/keys" --name "$bank"
done

# --- Coordinator: SuperLink with TLS, SuperNode auth, a durable database -------------
start "$work/superlink.log" flower-superlink \
    --ssl-ca-certfile "$work/certs/ca.crt" \
    --ssl-certfile "$work/certs/server.pem" \
    --ssl-keyfile "$work/certs/server.key" \
    --enable-supernode-auth \
    --database "$work/superlink.db" \
    --disable-runtime-dependency-installation \
    --port "$port"
mkdir -p "$FLWR_HOME"
cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "fedfin"

[superlink.fedfin]
address = "127.0.0.1:$port"
root-certificates = "$work/certs/ca.crt"
TOML
for _ in $(seq 60); do  # wait until the SuperLink answers with the right certificate
    fedfin check-connection --superlink "127.0.0.1:$port" \
        --root-certificates "$work/certs/ca.crt" 2>/dev/null && break
    sleep 1
done

# --- Coordinator: register each bank's public key ------------------------------------
for bank in "${banks[@]}"; do
    flwr supernode register "$work/keys/$bank.pub" fedfin
done

# --- Each bank: start its SuperNode (private settings in --node-config) --------------
i=0
for bank in "${banks[@]}"; do
    i=$((i + 1))
    start "$work/supernode-$bank.log" flower-supernode \
        --superlink "127.0.0.1:$port" \
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
flwr run . fedfin --run-config "encoder-dir='$work/encoder' out-dir='$work/server' num-server-rounds=2"
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
