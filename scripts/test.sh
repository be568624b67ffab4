#!/usr/bin/env bash
# Set everything up (or reuse the environment), then lint, type-check and run the tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# The deployment tests put Debian's nginx in front of the SuperLink (the coordinator's one
# public door, tests/test_deployment.py). Installing it needs root, as CI runs.
if ! command -v nginx >/dev/null; then
    echo "fedfin test: installing nginx (Debian package) for the deployment tests"
    apt-get install -y -qq nginx >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; }
fi
export PATH="$root/.venv/bin:$PATH"
ruff check .
mypy
pytest "$@"
