"""Round 12 GPU run. The one-launch pipeline measured this round (cut, scan and sample in one
kernel with per-row barriers) was removed after it; it ran from commit 3a7d46a to ea498d4
(docs/kernel_notes.md round 12). What stays:
`zero`: the scan pipeline's counters are left zero by its kernels (no memset per call): the
buffer is zero after calls and two calls give the same output; `var`: per-layer times against
SDPA; `trace`: the timeline; `dense`: the dense kernel's splits and stages against SDPA. The
merge inside the sample launch was measured by a `merge` part at commit 9b7a629 (removed).
The merge inside the dense kernel (the row's last program merges) was tried and removed:
round12_dense3.log (B=1 128K 181.8 -> 188.4 us at 16 splits).
Usage: python scripts/device_round12.py [zero,var,trace,dense,dense2,dense4,dense5,dense6]   (comma list)"""
import os
import sys
import torch
from vattn.bench.attn_core import graph_us, rel, scan_params
from vattn.kernels._common import _ZEROED
from vattn.kernels.decode import dense_decode
from vattn.kernels.scan import vattention_scan_decode
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_round11 import compare  # noqa: E402
from trace_scan import data, timeline  # noqa: E402

F = torch.nn.functional
parts = (sys.argv[1] if len(sys.argv) > 1 else "zero,var,trace").split(",")
print(torch.cuda.get_device_name(), torch.__version__)

if "zero" in parts:
    for B, N in ((1, 131072), (8, 32768)):
        q, k, v, proj, ks = data(B, N, 3)
        L = torch.full((B,), N, dtype=torch.int32, device="cuda")
        a, sa = vattention_scan_decode(q, k, v, ks, proj, L, stats=True, **scan_params(N))
        b, sb = vattention_scan_decode(q, k, v, ks, proj, L, stats=True, **scan_params(N))
        print(f"ZERO B={B} N={N}: second call equal {torch.equal(a, b) and torch.equal(sa['rows'], sb['rows'])}, "
              f"counters left zero {all(int(x.abs().sum()) == 0 for xs in _ZEROED.values() for x in xs)}")

if "var" in parts:
    compare("VAR", ((1, 131072), (8, 131072), (1, 32768), (8, 32768)), lambda B: {"scan": {}})

if "trace" in parts:
    timeline(1, 131072)

if "dense" in parts or "dense2" in parts or "dense4" in parts or "dense5" in parts or "dense6" in parts:
    if "dense6" in parts:  # one program per SM: warps and tile shapes
        cfgs = {1: {"default": {}, "8 warps": dict(num_warps=8), "bn32 st4": dict(block_n=32, num_stages=4),
                    "bn128 st2": dict(block_n=128, num_stages=2), "bn32 st6": dict(block_n=32, num_stages=6)},
                8: {"default": {}, "8 warps": dict(num_warps=8), "bn32 st4": dict(block_n=32, num_stages=4),
                    "bn128 st2": dict(block_n=128, num_stages=2)}}
    elif "dense5" in parts:  # measured with the KV rows end to end (commit a786dd9, removed after it)
        cfgs = {1: {"default": {}, "splits 16": dict(splits=16), "splits 33": dict(splits=33)},
                8: {"default": {}, "splits 2": dict(splits=2), "splits 5": dict(splits=5)}}
        from vattn.kernels.decode import dense_decode_ref
        for B, N, L in ((2, 32768, [32768, 20001]), (1, 131072, [131072]), (3, 8192, [8192, 77, 5000])):
            q, k, v = data(B, N, 11)[:3]
            L = torch.tensor(L, dtype=torch.int32, device="cuda")
            print(f"DENSE5 B={B} N={N} L={L.tolist()}: rel to float32 torch {rel(dense_decode(q, k, v, L), dense_decode_ref(q, k, v, L)):.1e}")
    elif "dense4" in parts:  # one program per SM with deeper pipelines
        cfgs = {1: {"default": {}, "splits 16": dict(splits=16), "splits 16 st4": dict(splits=16, num_stages=4)},
                8: {"default": {}, "splits 4": dict(splits=4), "splits 2 st3": dict(splits=2, num_stages=3),
                    "splits 2 st4": dict(splits=2, num_stages=4),
                    "splits 2 st4 bn32": dict(splits=2, num_stages=4, block_n=32)}}
    elif "dense2" in parts:  # second sweep, around the first one's best (round12_dense.log)
        cfgs = {1: {"default": {}, **{f"splits {s}": dict(splits=s) for s in (8, 12, 16, 20, 24)},
                    "splits 16 bn128": dict(splits=16, block_n=128)},
                8: {"default": {}, **{f"splits {s}": dict(splits=s) for s in (2, 3, 4)},
                    "splits 3 bn128": dict(splits=3, block_n=128)}}
    else:
        cfgs = {1: {"default": {}, "splits 16": dict(splits=16), "splits 49 st2": dict(splits=49, num_stages=2),
                    "splits 66": dict(splits=66), "splits 33 st4": dict(num_stages=4)},
                8: {"default": {}, "splits 4": dict(splits=4), "splits 6": dict(splits=6),
                    "splits 4 st3": dict(splits=4, num_stages=3), "splits 8": dict(splits=8),
                    "splits 12": dict(splits=12)}}
    for B, N in ((1, 131072), (8, 131072), (1, 32768), (8, 32768)):
        sets = [data(B, N, i) for i in range(max(1, 4 // B))]
        L = torch.full((B,), N, dtype=torch.int32, device="cuda")
        fns = {"sdpa": lambda s: F.scaled_dot_product_attention(*s[:3], enable_gqa=True),
               **{n: (lambda s, kw=kw: dense_decode(*s[:3], L, **kw)) for n, kw in cfgs[B].items()}}
        res = {n: [] for n in fns}
        for rep in range(3):
            for n, fn in fns.items():
                res[n].append(graph_us([lambda s=s, fn=fn: fn(s) for s in sets]))
        sd = sum(res["sdpa"]) / 3
        print(f"DENSE B={B} N={N}: " + "; ".join(
            f"{n} {sum(v) / 3:.1f} us (SDPA/x {sd / (sum(v) / 3):.3f}) [{', '.join(f'{x:.1f}' for x in v)}]"
            for n, v in res.items()))
        del sets
        torch.cuda.empty_cache()
