#!/usr/bin/env bash
# Create (or reuse) .venv and install fedfin with the locked, CPU-only dependencies.
# Re-running is cheap: the install is skipped while pyproject.toml and constraints.txt
# are unchanged since the last successful install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "fedfin setup: creating virtual environment in .venv"
    "$python" -m venv "$venv"
fi

stamp="$venv/.fedfin-install-stamp"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "fedfin setup: environment is up to date"
    exit 0
fi

echo "fedfin setup: installing fedfin and its locked dependencies (CPU-only torch)"
start=$(date +%s)
"$venv/bin/python" -m pip install --quiet --upgrade pip
# constraints.txt pins every dependency, torch==2.13.0 (CPU wheel) among them.
"$venv/bin/python" -m pip install --quiet -c constraints.txt -e ".[dev]"
if "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 1)"; then
    :
else
    echo "fedfin setup: a CUDA build of torch was installed; check constraints.txt" >&2
    exit 1
fi
echo "$want" > "$stamp"
echo "fedfin setup: done in $(( $(date +%s) - start )) s"
