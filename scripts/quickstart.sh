#!/usr/bin/env bash
# Set everything up (or reuse the environment), then run fedfin's main job on the built-in
# real data: pretrain the shared encoder on public Lending Club states, federate 5 banks
# with DP (ε = 1 each) for 5 rounds on Flower's simulation engine, and audit every ledger.
# Extra arguments go to `fedfin simulate` (e.g. --banks 8 --epsilon 3 --mode fedrep).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export FLWR_HOME="${FLWR_HOME:-$root/.flwr-home}"
out="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
"$root/.venv/bin/fedfin" simulate --data lending-club --banks 5 --rounds 5 --epsilon 1.0 \
    --out "$out" "$@"
