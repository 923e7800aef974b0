"""Per-layer time of the scan pipeline (vattention_scan_decode) over launch variants, on GPU,
medians of CUDA-graph replays (vattn.bench.attn_core.graph_us), one input set per case.
Usage: python scripts/sweep_scan.py B,N,eps,topk [...]   (topk: a fraction of N)
SWEEP="name=json;..." replaces the variants, e.g. SWEEP='pre={"pre": true};w8={"num_warps": 8}';
"splits_delta": [a, b] moves the default (scan, sample) programs per row by a and b.
Prints us per call and the ratio to the default (the kernels' own launch rule)."""
import json
import os
import sys

import torch

from vattn.bench.attn_core import graph_us
from vattn.kernels.scan import sample_draws, scan_plan, vattention_scan_decode

sys.path.insert(0, os.path.dirname(__file__))
from trace_scan import data  # noqa: E402

VARIANTS = {"default": {}, "pre": {"pre": True}, "w8": {"num_warps": 8}, "pre, cb1024": {"pre": True, "block_c": 1024},
            "pre, cb4096": {"pre": True, "block_c": 4096}}


def variants():
    spec = os.environ.get("SWEEP")
    if not spec:
        return VARIANTS
    return {"default": {}} | {n: json.loads(j) for n, j in (v.split("=", 1) for v in spec.split(";"))}


def main():
    for case in sys.argv[1:] or ["16,32768,0.2,0.05"]:
        B, N, eps, topk = case.split(",")
        B, N, eps, topk = int(B), int(N), float(eps), float(topk)
        q, k, v, proj, ks = data(B, N)
        L = torch.full((B,), N, dtype=torch.int32, device="cuda")
        base = dict(sink=128, window=128, topk=topk, m0=128, eps=eps, delta=eps)
        rows = B * k.shape[1]
        plan = scan_plan(rows, q.device, 64, 8 if rows <= 16 else 4, sample_draws(eps, eps, "denominator", 128))
        print(f"\nB={B} N={N} eps=delta={eps} topk={topk}: default splits {plan}", flush=True)
        ref = None
        for name, kw in variants().items():
            if "splits_delta" in kw:  # the default splits, moved
                kw = dict(kw)
                kw["splits"] = tuple(max(2 - i, a + b) for i, (a, b) in enumerate(zip(plan, kw.pop("splits_delta"))))
            scratch = {}
            try:
                us = graph_us([lambda: vattention_scan_decode(q, k, v, ks, proj, L, scratch=scratch, **base, **kw)])
            except Exception as e:  # one variant's failure must not hide the others
                print(f"  {name:24s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            ref = ref or us
            print(f"  {name:24s} {us:8.1f} us  {ref / us:5.2f}x  {kw}", flush=True)


if __name__ == "__main__":
    main()
