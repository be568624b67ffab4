#!/usr/bin/env bash
# Set everything up (or reuse the environment), then lint, type-check and run the tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export PATH="$root/.venv/bin:$PATH"
ruff check .
mypy
pytest "$@"
