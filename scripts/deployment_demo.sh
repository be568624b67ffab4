#!/usr/bin/env bash
# A whole fedfin deployment on one machine, over loopback: the commands of
# docs/deployment.md, in order. The coordinator runs a SuperLink that listens on 127.0.0.1
# only (TLS, SuperNode authentication, a durable database, process isolation), an
# authenticated executor for the ServerApp, and one public door: nginx, forwarding only
# Fleet API calls. It builds the app bundle (FAB) the banks approve. Each of three banks
# runs a SuperNode that executes nothing (--isolation process, its own key, connecting
# through the door) and its own `fedfin bank-runner`, which answers the SuperNode's tasks
# with the bank's installed fedfin, only for the approved bundle (docs/bank-runner.md).
# The coordinator launches the run over its loopback Control API; each bank audits its ledger.
#
# Usage: bash scripts/deployment_demo.sh WORK_DIR [BASE_PORT] [--hold]
#   ports: BASE_PORT SuperLink (loopback), +1 the door, +2.. each bank's SuperNode
#   --hold: when done, write WORK_DIR/ready and keep everything running until stopped
#           (the deployment tests use the live deployment this way)
#   ROUNDS=N (environment): server rounds, default 2
#   RUN_CONFIG="key=value ..." (environment): more run config, e.g. "secure-aggregation=true"
#   BANK_CONFIG="key = value; ..." (environment): more [bank] keys for every bank's runner,
#           e.g. "distributed-dp = true; distributed-dp-accounting = \"aggregate\""
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

# --- Each bank: its SuperNode key pair, kept in the SuperNode's own directory --------
# (and, for this demo, its data). The public key goes to the coordinator.
fedfin split --data lending-club --banks "${#banks[@]}" --out "$work/bank-data"
mkdir -p "$work/coordinator/keys"
for bank in "${banks[@]}"; do
    mkdir -p -m 700 "$work/banks/$bank/node" "$work/banks/$bank/runner"
    fedfin keys --out "$work/banks/$bank/node" --name "$bank"
    cp "$work/banks/$bank/node/$bank.pub" "$work/coordinator/keys/"
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
    flwr supernode register "$work/coordinator/keys/$bank.pub" fedfin --format json \
        | python -c 'import json,sys; print(json.load(sys.stdin)["node-id"])' \
        >"$work/coordinator/nodes/$bank"
    echo "registered $bank as node $(cat "$work/coordinator/nodes/$bank")"
done

# --- Coordinator: the release banks approve: a fixed copy of the app and its bundle ---
# `flwr run` bundles the app directory it is given; running from this copy guarantees the
# banks' approved hash matches what is shipped, whatever happens to the checkout meanwhile.
release="$work/coordinator/fedfin-app"
mkdir -p "$release"
cp -R "$root/pyproject.toml" "$root/README.md" "$root/common" "$root/server" "$root/client" "$release/"
find "$release" -name __pycache__ -prune -exec rm -rf {} +
(cd "$work/coordinator" && flwr build --app "$release")
fab="$(ls "$work/coordinator"/fedfin.fedfin.*.fab)"

# --- Each bank: approve the bundle, then start its SuperNode and its runner ----------
i=1
for bank in "${banks[@]}"; do
    i=$((i + 1))
    node="$work/banks/$bank/node" runner="$work/banks/$bank/runner"
    fedfin check-connection --superlink "$door_host:$door_port" \
        --root-certificates "$work/certs/ca.crt"
    # One secret, two copies: only the runner can claim this SuperNode's tasks.
    fedfin exec-secret --out "$node/exec.secret"
    (umask 077 && cp "$node/exec.secret" "$runner/exec.secret")
    (
        umask 077
        {
            echo "[runner]"
            echo "runtime-api = \"127.0.0.1:$((port + i))\""
            echo "superexec-auth-secret-file = \"exec.secret\""
            echo
            fedfin app-hash "$fab"   # the [[runner.allow]] entry for the approved bundle
            echo
            echo "[bank]"
            echo "bank-name = \"$bank\""
            echo "data-path = \"$work/bank-data/$bank\""
            echo "state-dir = \"$work/state/$bank\""
            echo "epsilon-budget = 1.0"
            echo "delta = 1e-5"
            echo "max-grad-norm = 1.0"
            echo "min-noise-multiplier = 0.5"
            if [ -n "${BANK_CONFIG:-}" ]; then echo "$BANK_CONFIG" | tr ';' '\n' | sed 's/^ *//'; fi
        } >"$runner/runner.toml"
    )
    start "$work/supernode-$bank.log" flower-supernode \
        --superlink "$door_host:$door_port" \
        --root-certificates "$work/certs/ca.crt" \
        --auth-supernode-private-key "$node/$bank" \
        --isolation process \
        --port "$((port + i))" \
        --superexec-auth-secret-file "$node/exec.secret"
    start "$work/runner-$bank.log" fedfin bank-runner --config "$runner/runner.toml"
done
for _ in $(seq 60); do
    [ "$(flwr supernode list fedfin --format json 2>/dev/null | grep -c '"online"')" -ge "${#banks[@]}" ] && break
    sleep 1
done

# --- Coordinator: launch the run from the approved release and follow it -------------
flwr run "$release" fedfin --run-config "encoder-dir='$work/encoder' out-dir='$work/server' num-server-rounds=${ROUNDS:-2} ${RUN_CONFIG:-}"
status=""
for _ in $(seq 600); do
    status="$(flwr ls fedfin --format json | python -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["status"])')"
    case "$status" in finished:*) break ;; esac
    sleep 3
done
flwr ls fedfin --format json >"$work/runs.json"
run_id="$(python -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["run-id"])' <"$work/runs.json")"
flwr log "$run_id" fedfin --show >"$work/serverapp.log" 2>&1 || true
echo "run $run_id status: $status"

# --- Each bank: audit its own ledger (at the same time, as separate banks would) ------
audits=()
for bank in "${banks[@]}"; do
    fedfin audit "$work/state/$bank" --json "$work/audit-$bank.json" >"$work/audit-$bank.txt" 2>&1 &
    audits+=("$!")
done
for i in "${!banks[@]}"; do
    wait "${audits[$i]}" || { cat "$work/audit-${banks[$i]}.txt"; exit 1; }
    cat "$work/audit-${banks[$i]}.txt"
done
[ "$status" = "finished:completed" ]

if [ "$hold" = "--hold" ]; then
    touch "$work/ready"
    sleep 86400 &
    pids+=("$!")
    wait "$!"
fi
