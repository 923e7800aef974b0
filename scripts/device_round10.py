"""Round 10 GPU run: dense decode with programmatic dependent launch against SDPA (interleaved
repeats), the scan pipeline's timeline (scripts/trace_scan.py) and its per-layer time.
Usage: python scripts/device_round10.py [dense,trace,scan,split,fcheck,fused,ftrace]"""
import os
import sys
import torch
from vattn.bench.attn_core import graph_us, scan_params
from vattn.kernels.decode import dense_decode
from vattn.kernels.fused import vattention_fused_decode
from vattn.kernels.scan import scan_decode_ref as fused_decode_ref, scan_density, vattention_scan_decode
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
    for B, N in ((1, 131072), (8, 131072)):
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

if "fcheck" in parts:  # the one-launch kernel against its float64 twin (its own cut / sizes)
    for B, N, Ls, eps in ((2, 32768, (32768, 20000), 0.05), (2, 32768, (32768, 20000), 1e-4), (1, 131072, (131072,), 0.05)):
        qq, k, v, proj, ks = data(B, N, 7)
        L = torch.tensor(Ls, dtype=torch.int32, device="cuda")
        sp = scan_params(N) | dict(eps=eps)
        out0 = vattention_fused_decode(qq, k, v, ks, proj, L, seed=5, **sp)  # counters left at 0 for the next call?
        out, st = vattention_fused_decode(qq, k, v, ks, proj, L, stats=True, seed=5, **sp)
        _, rs = fused_decode_ref(qq, k, v, ks, proj, L, seed=5, **sp)
        r, w = st["rows"].cpu().double(), rs["rows"]
        ref, rs2 = fused_decode_ref(qq, k, v, ks, proj, L, seed=5, tau=r[:, 5].long(), thu=r[:, 6].long(),
                                    total=r[:, 1].long(), exact=r[:, 4] > 0, **sp)
        keys = torch.equal(st["exact_keys"].cpu(), rs2["exact_keys"]) and torch.equal(st["sample_keys"].cpu(),
                                                                                       rs2["sample_keys"])
        err = ((out.double().cpu() - ref.cpu()).norm() / ref.cpu().norm()).item()
        print(f"FCHECK B={B} N={N} eps={eps} fused={st['fused']} S={st['per_row']} tau_eq="
              f"{torch.equal(r[:, 5], w[:, 5])} thu_maxdiff={(r[:, 6] - w[:, 6]).abs().max().item():.0f} "
              f"total_maxdiff={(r[:, 1] - w[:, 1]).abs().max().item():.0f} exact_rows={int(r[:, 4].sum())} "
              f"keys_eq={keys} err_vs_twin={err:.2e} density={scan_density(st, L, 8):.3f} "
              f"repeat_equal={torch.equal(out0, out)}")

if "fused" in parts:
    for B, N in ((1, 131072), (8, 131072), (1, 32768), (8, 32768)):
        sets = [data(B, N, i) for i in range(max(1, 4 // B))]
        L = torch.full((B,), N, dtype=torch.int32, device="cuda")
        sp = scan_params(N)
        sd = graph_us([lambda s=s: F.scaled_dot_product_attention(*s[:3], enable_gqa=True) for s in sets])
        row = [f"sdpa {sd:.1f}"]
        for name, fn, kw in (("scan", vattention_scan_decode, {}), ("scan sb256", vattention_scan_decode,
                                                                       dict(sub_block=256)),
                             ("fused", vattention_fused_decode, {}),
                             ("fused sb256", vattention_fused_decode, dict(sub_block=256)),
                             ("fused w4 r168", vattention_fused_decode, dict(num_warps=4, max_regs=168)),
                             ("fused w4 r168 sb256", vattention_fused_decode, dict(num_warps=4, max_regs=168,
                                                                                   sub_block=256))):
            if B == 1 and "w4" in name:
                continue
            try:
                us = graph_us([lambda s=s, i=i: fn(s[0], s[1], s[2], s[4], s[3], L, seed=i, **sp, **kw)
                               for i, s in enumerate(sets)])
                _, st = fn(sets[0][0], sets[0][1], sets[0][2], sets[0][4], sets[0][3], L, stats=True, **sp, **kw)
                row.append(f"{name} {us:.1f} ({sd / us:.2f}x, dens {scan_density(st, L, 8):.3f}"
                           + (f", S={st['per_row']}" if "per_row" in st else "") + ")")
            except Exception as e:
                row.append(f"{name} FAILED {str(e)[:200]}")
        print(f"FUSED B={B} N={N}: " + "; ".join(row))
        del sets
        torch.cuda.empty_cache()

if "ftrace" in parts:
    for B, N in ((1, 131072), (8, 131072)):
        timeline(B, N, fn=vattention_fused_decode)

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
