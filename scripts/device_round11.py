"""Round 11 GPU run: the sample kernel's early block (pre_draw) and the merge inside the sample
launch (fuse_merge, measured at commit 52a980c and removed), each on and off: same keys and
outputs on GPU, per-layer times against SDPA (interleaved repeats), the timeline
(scripts/trace_scan.py); `carve`: the shared-memory carveout and programs per row.
Usage: python scripts/device_round11.py [eq,var,trace,carve,cold]   (comma list)"""
import os
import sys
import torch
from vattn.bench.attn_core import graph_us, l2_flusher, rel, scan_params
from vattn.errors import VattnError
from vattn.kernels.scan import vattention_scan_decode
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace_scan import data, timeline  # noqa: E402

F = torch.nn.functional
parts = (sys.argv[1] if len(sys.argv) > 1 else "eq,var,trace").split(",") if __name__ == "__main__" else []
if parts:
    print(torch.cuda.get_device_name(), torch.__version__)
VARS = {"plain": dict(pre_draw=False), "pre": dict(pre_draw=True)}

if "eq" in parts:
    for B, N, L in ((1, 131072, [131072]), (8, 131072, None), (2, 32768, [32768, 3000])):
        q, k, v, proj, ks = data(B, N, 5)
        L = torch.full((B,), N, dtype=torch.int32, device="cuda") if L is None else \
            torch.tensor(L, dtype=torch.int32, device="cuda")
        sp = scan_params(N)
        base, st = vattention_scan_decode(q, k, v, ks, proj, L, stats=True, **sp, **VARS["plain"])
        row = []
        for name, kw in VARS.items():
            out, s2 = vattention_scan_decode(q, k, v, ks, proj, L, stats=True, **sp, **kw)
            same = torch.equal(s2["sample_keys"], st["sample_keys"]) and torch.equal(s2["rows"], st["rows"]) \
                and torch.equal(s2["exact_keys"], st["exact_keys"])
            row.append(f"{name}: keys {'same' if same else 'DIFFER'} rel {rel(out, base):.2e}")
        print(f"EQ B={B} N={N} totals {st['rows'][:, 1].min().item():.0f}..{st['rows'][:, 1].max().item():.0f}: "
              + "; ".join(row))

def compare(tag, shapes, cfgs):
    """Per-layer us of SDPA and each scan config (kwargs), two interleaved repeats per shape."""
    for B, N in shapes:
        sets = [data(B, N, i) for i in range(max(1, 4 // B))]
        L = torch.full((B,), N, dtype=torch.int32, device="cuda")
        sp = scan_params(N)
        c = cfgs(B)
        res = {n: [] for n in ["sdpa"] + list(c)}
        for rep in range(2):
            res["sdpa"].append(graph_us([lambda s=s: F.scaled_dot_product_attention(*s[:3], enable_gqa=True)
                                         for s in sets]))
            for name, kw in c.items():
                try:
                    res[name].append(graph_us([lambda s=s, i=i, kw=kw: vattention_scan_decode(
                        s[0], s[1], s[2], s[4], s[3], L, seed=i, **sp, **kw) for i, s in enumerate(sets)]))
                except VattnError as e:  # a variant this GPU cannot run: say so, time the others
                    print(f"{tag} B={B} N={N} {name}: {e}")
                    res[name].append(float("nan"))
        sd = sum(res["sdpa"]) / 2
        print(f"{tag} B={B} N={N}: " + "; ".join(f"{n} {sum(v) / 2:.1f} us ({sd / (sum(v) / 2):.2f}x) "
                                               f"[{', '.join(f'{x:.1f}' for x in v)}]" for n, v in res.items()))
        del sets
        torch.cuda.empty_cache()


if "var" in parts:
    compare("VAR", ((1, 131072), (8, 131072), (1, 32768), (8, 32768)), lambda B: VARS)

if "trace" in parts:
    for B, N in ((1, 131072), (8, 131072)):
        timeline(B, N)


def carve_cfgs(B):
    cfg = {"default": {}, "carve100": dict(carveout=100)}
    if B == 1:
        for spl in ((25, 41), (17, 49), (33, 48)):
            cfg[f"splits{spl}"] = dict(splits=spl)
            cfg[f"carve100 splits{spl}"] = dict(splits=spl, carveout=100)
    return cfg


if "carve" in parts:
    compare("CARVE", ((1, 131072), (1, 32768), (8, 131072)), carve_cfgs)
    timeline(1, 131072, carveout=100)

if "cold" in parts:  # each call after a 256 MiB read (cold L2, as in a decoder): flush time subtracted
    from vattn.kernels.decode import dense_decode
    fl = l2_flusher()
    for B, N in ((1, 131072), (8, 131072), (1, 32768), (8, 32768)):
        sets = [data(B, N, i) for i in range(max(1, 4 // B))]
        L = torch.full((B,), N, dtype=torch.int32, device="cuda")
        sp = scan_params(N)
        fns = {"sdpa": lambda s, i: F.scaled_dot_product_attention(*s[:3], enable_gqa=True),
               "dense": lambda s, i: dense_decode(*s[:3], L),
               **{f"scan {n}": (lambda s, i, kw=kw: vattention_scan_decode(s[0], s[1], s[2], s[4], s[3], L, seed=i,
                                                                          **sp, **kw)) for n, kw in VARS.items()}}
        row = []
        for name, fn in fns.items():
            calls = [lambda s=s, i=i, fn=fn: fn(s, i) for i, s in enumerate(sets)]
            row.append((name, graph_us(calls), graph_us(calls, flush=fl)))
        sd = row[0][1:]
        print(f"COLD B={B} N={N}: " + "; ".join(f"{n} hot {h:.1f} ({sd[0] / h:.2f}x) cold {c:.1f} ({sd[1] / c:.2f}x)"
                                                for n, h, c in row))
        del sets
        torch.cuda.empty_cache()
