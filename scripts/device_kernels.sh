#!/usr/bin/env bash
# On the GPU machine: the kernel tests on the GPU (TRITON_INTERPRET=0), then `vattn bench`.
# Usage (repo root): bash scripts/device_kernels.sh [quick]   -> logs and bench.json in $OUT (default ./out)
# quick: `vattn bench --quick` (B=1 32K, 4-layer e2e) instead of the full table.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv 2>&1 | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$OUT/env.txt"
timeout 240 python3 -m pytest -q -rs tests/test_kernels.py tests/test_kernels_scan.py tests/test_paged.py 2>&1 \
    | tee "$OUT/tests.log"
timeout 330 python3 -m vattn.cli bench ${1:+--$1} --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
