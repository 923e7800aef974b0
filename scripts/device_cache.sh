#!/usr/bin/env bash
# On the GPU machine: CUDA tests of the vmem cache + paged kernel, then `vattn bench cache`.
# Usage (repo root): bash scripts/device_cache.sh   -> logs and bench_cache.json in $OUT (default ./out)
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 | tee "$OUT/env.txt"
python3 -c "import torch, triton, transformers, cuda.bindings; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda-bindings', cuda.bindings.__version__)" 2>&1 | tee -a "$OUT/env.txt"
timeout 240 python3 -m pytest -q -rs tests/test_cache.py tests/test_cache_hf.py tests/test_paged.py 2>&1 | tee "$OUT/tests.log"
timeout 240 python3 -m vattn.cli bench cache --json "$OUT/bench_cache.json" 2>&1 | tee "$OUT/bench_cache.txt"
