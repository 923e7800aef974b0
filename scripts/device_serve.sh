#!/usr/bin/env bash
# On the GPU machine: vattn bench serve's two comparisons (issue 19) on a random-weight
# Llama-3-8B shape. Needs fastapi/uvicorn/pydantic/httpx2 there: carry them as wheels in .whl
# (docs/serve.md) and install with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`.
# Usage (repo root): bash scripts/device_serve.sh [specs|admission ...] -> tables and JSON in $OUT
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0
OUT=${OUT:-out}
mkdir -p "$OUT"
for w in ${*:-specs admission}; do case $w in
  specs) timeout ${SPECS_S:-200} python3 -m vattn.cli bench serve --random llama3-8b \
           --specs dense,vattention-scan --admission vmem --budget-gb 80 --max-len 32768 --max-batch 16 \
           --concurrency 16 --num-requests 16 --prompt-len 16384:32768 --output-len 128:512 --warmup 1 \
           --json "$OUT/serve_specs.json" \
           > "$OUT/serve_specs.txt" 2>&1; tail -20 "$OUT/serve_specs.txt" ;;
  admission) timeout ${ADM_S:-260} python3 -m vattn.cli bench serve --random llama3-8b --specs dense --admission vmem,static \
           --kv-layout ${LAYOUT:-bnhd} \
           --budget-gb 40 --max-len 32768 --max-batch 32 --concurrency 32 --num-requests ${ADM_N:-48} \
           --prompt-len 4096:32768 --output-len 64:128 --warmup 1 --json "$OUT/serve_admission.json" \
           > "$OUT/serve_admission.txt" 2>&1; tail -20 "$OUT/serve_admission.txt" ;;
esac; done
