"""Round 10 GPU run: dense decode with programmatic dependent launch against SDPA (interleaved
repeats), the scan pipeline's timeline (scripts/trace_scan.py) and its per-layer time.
Usage: python scripts/device_round10.py [dense,trace,scan,split,dense2,fit,merge]   (comma list)
The one-launch variant with per-row spin barriers (kernels/fused.py, parts fcheck,fused,ftrace)
was measured at commit 9ea320d and removed (docs/kernel_notes.md, round 10)."""
import os
import sys
import torch
from vattn.bench.attn_core import graph_us, scan_params
from vattn.kernels.decode import dense_decode
from vattn.kernels.scan import vattention_scan_decode
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace_scan import data, timeline  # noqa: E402

F = torch.nn.functional
parts = (sys.argv[1] if len(sys.argv) > 1 else "dense,trace,scan").split(",")
print(torch.cuda.get_device_name(), torch.__version__)

if "dense" in parts:
    for B, N in ((1, 131072), (8, 131072), (1, 32768)):
        sets = [data(B, N, i)[:3] for i in range(max(1, 4 // B))]
        L = torch.full((B,), N, dtype=torch.int32, device="cuda")
        cfgs = {"sdpa": None, "dense": {}, "pdl": dict(pdl=True), "pdl w8": dict(pdl=True, num_warps=8),
                "pdl bn128 w8": dict(pdl=True, block_n=128, num_warps=8), "pdl st4": dict(pdl=True, num_stages=4)}
        res = {c: [] for c in cfgs}
        for rep in range(2):
            for c, kw in cfgs.items():
                f = (lambda s: F.scaled_dot_product_attention(*s, enable_gqa=True)) if kw is None else \
                    (lambda s, kw=kw: dense_decode(*s, L, **kw))
                res[c].append(graph_us([lambda s=s, f=f: f(s) for s in sets]))
        base = sum(res["sdpa"]) / 2
        print(f"\nDENSE B={B} N={N}: " + "; ".join(f"{c} {sum(v) / 2:.1f} us ({base / (sum(v) / 2):.3f})"
                                                 for c, v in res.items()))
        del sets
        torch.cuda.empty_cache()

if "trace" in parts:
    for B, N in ((1, 131072), (8, 131072)):
        timeline(B, N)

if "scan" in parts:
    for B, N in ((1, 131072), (8, 131072), (1, 32768), (8, 32768)):
        sets = [data(B, N, i) for i in range(max(1, 4 // B))]
        L = torch.full((B,), N, dtype=torch.int32, device="cuda")
        sp = scan_params(N)
        sd = graph_us([lambda s=s: F.scaled_dot_product_attention(*s[:3], enable_gqa=True) for s in sets])
        us = graph_us([lambda s=s, i=i: vattention_scan_decode(s[0], s[1], s[2], s[4], s[3], L, seed=i, **sp)
                       for i, s in enumerate(sets)])
        print(f"\nSCAN B={B} N={N}: sdpa {sd:.1f} scan {us:.1f} us ({sd / us:.2f}x)")
        del sets
        torch.cuda.empty_cache()

if "split" in parts:  # scan programs per row at B=8 128K (scan_plan gives 5 scan, 31 sample)
    B, N = 8, 131072
    sets = [data(B, N, i) for i in range(1)]
    L = torch.full((B,), N, dtype=torch.int32, device="cuda")
    sp = scan_params(N)
    for spl in ((5, 31), (8, 31), (11, 31), (16, 31), (8, 16), (8, 48)):
        us = graph_us([lambda s=s, i=i: vattention_scan_decode(s[0], s[1], s[2], s[4], s[3], L, seed=i, splits=spl,
                                                               **sp) for i, s in enumerate(sets)])
        print(f"SPLIT B={B} N={N} splits={spl}: {us:.1f} us")

if "dense2" in parts:  # splits and tiles at 128K with programmatic dependent launch
    for B in (1, 8):
        N = 131072
        sets = [data(B, N, i)[:3] for i in range(max(1, 4 // B))]
        L = torch.full((B,), N, dtype=torch.int32, device="cuda")
        base = max(1, 264 // (B * 8))
        cfgs = [None, dict(pdl=True)] + [dict(pdl=True, splits=m * base // 4) for m in (3, 5, 6, 8, 12)] + \
               [dict(pdl=True, block_n=32, num_stages=3), dict(pdl=True, block_n=32, num_stages=4),
                dict(pdl=True, num_stages=3), dict(pdl=True, num_warps=2), dict(pdl=True, block_n=128)]
        res = []
        for kw in cfgs:
            f = (lambda s: F.scaled_dot_product_attention(*s, enable_gqa=True)) if kw is None else \
                (lambda s, kw=kw: dense_decode(*s, L, **kw))
            res.append((str(kw), graph_us([lambda s=s, f=f: f(s) for s in sets])))
        sd = res[0][1]
        print(f"\nDENSE2 B={B} N={N}: " + "; ".join(f"{c} {u:.1f} ({sd / u:.3f})" for c, u in res))
        del sets
        torch.cuda.empty_cache()

if "fit" in parts:  # the cut kernel small enough that two scan programs start beside it
    for B, N in ((1, 131072), (8, 131072), (1, 32768), (8, 32768)):
        sets = [data(B, N, i) for i in range(max(1, 4 // B))]
        L = torch.full((B,), N, dtype=torch.int32, device="cuda")
        sp = scan_params(N)
        sd = graph_us([lambda s=s: F.scaled_dot_product_attention(*s[:3], enable_gqa=True) for s in sets])
        row = [f"sdpa {sd:.1f}"]
        for rep in range(2):
            for fit in (False, True):
                us = graph_us([lambda s=s, i=i: vattention_scan_decode(s[0], s[1], s[2], s[4], s[3], L, seed=i,
                                                                       cut_fit=fit, **sp) for i, s in enumerate(sets)])
                row.append(f"fit={fit} {us:.1f} ({sd / us:.2f}x)")
        print(f"FIT B={B} N={N}: " + "; ".join(row))
        del sets
        torch.cuda.empty_cache()
    timeline(1, 131072, cut_fit=True)

if "sbn" in parts:  # draws per sample block, and the scan's programs per row
    for B, N in ((1, 131072), (8, 131072)):
        sets = [data(B, N, i) for i in range(max(1, 4 // B))]
        L = torch.full((B,), N, dtype=torch.int32, device="cuda")
        sp = scan_params(N)
        row = []
        for kw in ({}, dict(sample_bn=128), dict(sample_bn=32)) + \
                  ((dict(splits=(34, 33)), dict(splits=(33, 50))) if B == 1 else (dict(splits=(5, 31)),)):
            us = graph_us([lambda s=s, i=i: vattention_scan_decode(s[0], s[1], s[2], s[4], s[3], L, seed=i, **sp, **kw)
                           for i, s in enumerate(sets)])
            row.append(f"{kw} {us:.1f}")
        print(f"SBN B={B} N={N}: " + "; ".join(row))
        del sets
        torch.cuda.empty_cache()

if "merge" in parts:  # the merge's share of the scan step, and its tile shapes on the scan's partials
    from vattn.kernels._common import merge_partials
    for B, N in ((1, 131072), (8, 131072)):
        sets = [data(B, N, i) for i in range(max(1, 4 // B))]
        L = torch.full((B,), N, dtype=torch.int32, device="cuda")
        sp = scan_params(N)
        row = []
        for upto in (3, 4):
            us = graph_us([lambda s=s, i=i: vattention_scan_decode(s[0], s[1], s[2], s[4], s[3], L, seed=i, upto=upto,
                                                                   **sp) for i, s in enumerate(sets)])
            row.append(f"upto={upto} {us:.1f}")
        S = 66 if B == 1 else 36
        po = torch.randn(B, 32, 1, S, 128, device="cuda")
        plse = torch.randn(B, 32, 1, S, device="cuda")
        out = torch.empty(B, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        for kw in ({}, dict(block_s=128), dict(block_d=16), dict(block_d=16, block_s=128), dict(block_d=64),
                   dict(num_warps=2), dict(block_d=128, block_s=128, num_warps=8)):
            us = graph_us([lambda kw=kw: merge_partials(po, plse, out, pdl=True, **kw)])
            row.append(f"merge {kw} {us:.2f}")
        print(f"MERGE B={B} N={N}: " + "; ".join(row))
        del sets
        torch.cuda.empty_cache()
