"""Per-kernel table from ncu --csv --page raw files (scripts/ncu_scan.sh)."""
import csv, sys, re
for fn in sys.argv[1:]:
    rows = [r for r in csv.reader(open(fn)) if r and not r[0].startswith("==")]
    hdr = rows[0]
    keys = ["Kernel Name", "gpu__time_duration.sum", "launch__registers_per_thread", "launch__grid_size",
            "sm__warps_active.avg.pct_of_peak_sustained_active", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
            "smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct",
            "smsp__warp_issue_stalled_barrier_per_warp_active.pct",
            "smsp__warp_issue_stalled_short_scoreboard_per_warp_active.pct",
            "smsp__issue_active.avg.pct_of_peak_sustained_active", "l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum"]
    ix = [hdr.index(k) for k in keys if k in hdr]
    print("==", fn)
    print("name | ns | regs | grid | warps% | dram% | long_sb | barrier | short_sb | issue% | local_st")
    for r in rows[2:]:
        print(" | ".join([r[ix[0]][:18]] + [r[i][:10] for i in ix[1:]]))
