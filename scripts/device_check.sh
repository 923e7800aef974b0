#!/usr/bin/env bash
# On the GPU machine, one call: GPU tests of kernels/plans/engine, the per-layer bench through
# plans, and ms/token through transformers' generate (scripts/device_patch.py).
# Usage (repo root): bash scripts/device_check.sh [tests|engine|bench|e2e|verify|patch|patch-static|profile ...]  -> logs in $OUT
# (default ./out). E2E="--batch 4 --contexts 131072 --no-hf" replaces the e2e row set.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0
OUT=${OUT:-out}
mkdir -p "$OUT"
what=${*:-tests bench patch}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv 2>&1 | tee "$OUT/env.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT/env.txt"
for w in $what; do case $w in
  tests) timeout 260 python3 -m pytest -q -x -rs -p no:cacheprovider tests/test_kernels_scan.py tests/test_plan.py \
           tests/test_kernels.py tests/test_paged.py tests/test_kernels_select.py tests/test_kernels_gemv.py \
           > "$OUT/tests.log" 2>&1; tail -25 "$OUT/tests.log" ;;
  profile) timeout 200 python3 scripts/profile_step.py 1,32768,dense 1,32768,nogemv:dense 1,32768,vattention-scan \
           16,32768,streaming 2>&1 | grep -v -i warn > "$OUT/profile.txt"; grep -E "^==" "$OUT/profile.txt" ;;
  engine) timeout 200 python3 -m pytest -q -rs -p no:cacheprovider tests/test_engine_gpu.py \
            tests/test_kernels_layer_ops.py > "$OUT/engine_tests.log" 2>&1
          grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/engine_tests.log"
          grep -E "^E  " "$OUT/engine_tests.log" | head -20 ;;
  bench) timeout 220 python3 -m vattn.cli bench --batch 1,8 --lengths 32768,131072 --e2e-layers 0 \
           --json "$OUT/bench.json" 2>&1 | tail -30 | tee "$OUT/bench.txt" ;;
  e2e) timeout 420 python3 -m vattn.cli bench e2e ${E2E:---batch 1,16 --contexts 32768} --steps 8 \
           --json "$OUT/e2e.json" 2>&1 | tail -30 | tee -a "$OUT/e2e.txt" ;;
  verify) timeout 200 python3 -m vattn.cli verify --draws iid --device cuda --rows 512 --n 4096 \
           --json "$OUT/verify.json" 2>&1 | tail -20 | tee "$OUT/verify.txt" ;;
  patch) timeout 300 python3 scripts/device_patch.py 32768 32 dynamic 2>&1 | tail -20 | tee "$OUT/patch.txt" ;;
  patch-static) timeout 420 python3 scripts/device_patch.py 32768 32 static 2>&1 | grep -v -i warn | tail -20 \
           | tee "$OUT/patch_static.txt" ;;
esac; done
