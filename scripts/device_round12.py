"""Round 12 GPU run: the one-launch pipeline (vattention_scan_decode(fused=True)) against the
four launches: same choices and keys on GPU, per-layer times against SDPA (interleaved
repeats), and its timeline (scripts/trace_scan.py).
`dense`: the dense kernel with and without its early first tile, against SDPA.
`path`: the one launch's critical path (every stamp as us from the first start); `sweep`:
its block sizes and programs per row at B=1 128K.
Usage: python scripts/device_round12.py [eq,var,trace,dense,path,sweep]   (comma list)"""
import os
import sys
import torch
from vattn.bench.attn_core import graph_us, rel, scan_params
from vattn.kernels.decode import dense_decode
from vattn.kernels.scan import vattention_scan_decode
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_round11 import compare  # noqa: E402
from trace_scan import data, timeline  # noqa: E402

parts = (sys.argv[1] if len(sys.argv) > 1 else "eq,var,trace").split(",")


def fused_cfgs(B):
    if B == 1:
        return {"4 launches": {}, "fused 33": dict(fused=True, splits=(33, 33)),
                "fused 16 uncapped": dict(fused=True, splits=(16, 16), maxnreg=0)}
    return {"4 launches": {}, "fused 4 w8": dict(fused=True, splits=(4, 4), num_warps=8),
            "fused 4 w4": dict(fused=True, splits=(4, 4), num_warps=4, pre_draw=False)}


if "eq" in parts:
    for B, N, L, kw in ((1, 131072, [131072], dict(splits=(33, 33))), (1, 131072, [131072], dict(splits=(16, 16))),
                        (8, 131072, None, dict(splits=(4, 4), num_warps=8)), (2, 32768, [32768, 3000], {})):
        q, k, v, proj, ks = data(B, N, 5)
        L = torch.full((B,), N, dtype=torch.int32, device="cuda") if L is None else \
            torch.tensor(L, dtype=torch.int32, device="cuda")
        sp = scan_params(N)
        base, st = vattention_scan_decode(q, k, v, ks, proj, L, stats=True, **sp)
        try:
            out, s2 = vattention_scan_decode(q, k, v, ks, proj, L, stats=True, fused=True, **sp, **kw)
        except Exception as e:  # noqa: BLE001 (a report line, then the next shape)
            print(f"EQ B={B} N={N} {kw}: {type(e).__name__}: {e}")
            continue
        a, b = st["rows"].cpu(), s2["rows"].cpu()
        same_cut = torch.equal(a[:, [0, 2, 5, 6]], b[:, [0, 2, 5, 6]])
        dtot = (a[:, 1] - b[:, 1]).abs().max().item()
        keys = torch.equal(st["exact_keys"], s2["exact_keys"]) and torch.equal(st["sample_keys"], s2["sample_keys"])
        print(f"EQ B={B} N={N} {kw}: cut {'same' if same_cut else 'DIFFERS'}, totals {a[:, 1].min():.0f}.."
              f"{a[:, 1].max():.0f} max diff {dtot:.0f}, keys {'same' if keys else 'differ'}, "
              f"exact rows {int(b[:, 4].sum())}, rel to 4 launches {rel(out, base):.2e}")
    from vattn.kernels._common import _ZEROED
    print("EQ counters left zero:", {k: int(v.abs().sum()) for k, v in _ZEROED.items()})

if "var" in parts:
    compare("VAR", ((1, 131072), (1, 32768), (8, 131072), (8, 32768)), fused_cfgs)

if "trace" in parts:
    timeline(1, 131072)
    timeline(1, 131072, fused=True, splits=(33, 33))
    timeline(1, 131072, fused=True, splits=(16, 16))

if "dense" in parts:
    F = torch.nn.functional
    for B, N in ((1, 131072), (8, 131072), (1, 32768), (8, 32768)):
        sets = [data(B, N, i) for i in range(max(1, 4 // B))]
        L = torch.full((B,), N, dtype=torch.int32, device="cuda")
        a, b = dense_decode(*sets[0][:3], L), dense_decode(*sets[0][:3], L, early=True)
        fns = {"sdpa": lambda s: F.scaled_dot_product_attention(*s[:3], enable_gqa=True),
               "dense": lambda s: dense_decode(*s[:3], L), "early": lambda s: dense_decode(*s[:3], L, early=True)}
        res = {n: [] for n in fns}
        for rep in range(3):
            for n, fn in fns.items():
                res[n].append(graph_us([lambda s=s, fn=fn: fn(s) for s in sets]))
        sd = sum(res["sdpa"]) / 3
        print(f"DENSE B={B} N={N} early==plain {torch.equal(a, b)}: " + "; ".join(
            f"{n} {sum(v) / 3:.1f} us (SDPA/x {sd / (sum(v) / 3):.3f}) [{', '.join(f'{x:.1f}' for x in v)}]"
            for n, v in res.items()))
        del sets
        torch.cuda.empty_cache()

if "path" in parts:
    timeline(1, 131072)
    for S in (33,):
        tr, t0 = timeline(1, 131072, fused=True, splits=(S, S))
        marks = (("scan", 0, "start"), ("scan", 5, "past PDL wait"), ("scan", 6, "phase 0 done"),
                 ("scan", 1, "cut known"), ("scan", 2, "compacted"), ("scan", 4, "scan column written"),
                 ("sample", 1, "all scan columns in"), ("sample", 2, "budget"), ("sample", 4, "sample column written"),
                 ("sample", 5, "merge may start"), ("sample", 6, "merge written"))
        print(f"PATH fused S={S}: stamp, us from the first start: median / max over programs")
        for name, slot, what in marks:
            t = tr[name][:, slot].cpu()
            t = (t[t > 0] - t0).double() / 1e3
            print(f"  {what:24s} {t.median().item():6.1f} / {t.max().item():6.1f}  (n={t.numel()})")

if "sweep" in parts:
    base = dict(fused=True, splits=(33, 33))
    compare("SWEEP", ((1, 131072),), lambda B: {
        "4 launches": {}, "fused 33": base, "S 30": base | dict(splits=(30, 30)),
        "sample_bn 32": base | dict(sample_bn=32), "sample_bn 128": base | dict(sample_bn=128),
        "block_n 32": base | dict(block_n=32), "block_n 128": base | dict(block_n=128),
        "block_c 1024": base | dict(block_c=1024), "block_c 4096": base | dict(block_c=4096)})
