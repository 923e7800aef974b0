#!/bin/bash
# ncu per-kernel metrics of the scan pipeline (or the old one: WHICH=old) at B=1 and B=8, 128K.
export PYTHONPATH=$PWD OUT=${OUT:-/tmp/out}; mkdir -p $OUT
MET=gpu__time_duration.sum,launch__registers_per_thread,launch__grid_size,sm__warps_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct,smsp__warp_issue_stalled_barrier_per_warp_active.pct,smsp__warp_issue_stalled_short_scoreboard_per_warp_active.pct,smsp__issue_active.avg.pct_of_peak_sustained_active,l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum
for B in ${BS:-1 8}; do
  f=$OUT/ncu_${WHICH:-scan}_$B.csv
  ncu --clock-control none --kernel-name regex:"${KRE:-cut_kernel|scan_kernel|sample_kernel|merge|hist_kernel|emit_kernel|split|sample_}" --launch-skip ${SKIP:-8} --launch-count ${COUNT:-8} --metrics $MET --csv --page raw \
      python scripts/prof_scan.py $B ${N:-131072} 5 ${WHICH:-scan} 2>/dev/null | grep -v "^==PROF" > $f
  echo "== B=$B ${WHICH:-scan}"
  python3 scripts/ncu_table.py $f
done
