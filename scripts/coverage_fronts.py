"""Coverage of verified(eps, delta) behind different fronts, on Q/K/V of the embedded model.

For every front (the parts before verified) and e in --eps, both modes, the spec
`FRONT+verified(eps=e,delta=e,mode=...)` runs on every captured layer and prompt with
--seeds sampling seeds. The error of each row is measured against a float64 reference
computed here (exact softmax attention in float64, independent of vattn.attend):

    output:      ||o_hat - o|| / ||o||
    denominator: |D_hat - D| / D   (D_hat from the selection's keys and log-weights)

Coverage is the fraction of rows with error <= eps; the target is 1 - delta. Density
is attended (query, key) pairs / allowed pairs. Also printed: the coverage of rows
where one residual key (a key outside the front) holds more than 1% of the mass.

    .venv/bin/python scripts/coverage_fronts.py                     # full: 34,560 rows a setting
    .venv/bin/python scripts/coverage_fronts.py --layers 0,5,10 --seeds 1   # quick

Captured Q/K/V are cached in --cache (a torch file) so reruns skip the model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vattn.attend import attend, row_bounds  # noqa: E402
from vattn.spec import select  # noqa: E402

FRONTS = {
    "none": "sink(16)+window(16)",
    "topk": "sink(16)+window(16)+topk(0.05)",
    "hashtopk": "sink(16)+window(16)+hashtopk(0.05)",
    "quest": "sink(16)+window(16)+quest(0.05,page=16)",
}


def load_groups(cache: str, tokens: int, n_queries: int):
    from vattn.verify import Inputs, model_groups
    if cache and os.path.exists(cache):
        data = torch.load(cache, weights_only=False)
    else:
        gs = model_groups(tokens=tokens, n_queries=n_queries)
        data = [(g.name, g.q, g.k, g.v, g.scale, g.lengths, g.starts) for g in gs]
        if cache:
            torch.save(data, cache)
    return [Inputs(*d) for d in data]


def reference(g):
    """float64 exact attention: (o [B,Hq,T,D], D [B,Hq,T], shift [B,Hq,T], s [B,Hq,T,N])."""
    q, k, v = g.q.double(), g.k.double(), g.v.double()
    b, hq, t, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    rep = hq // hkv
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ kk.transpose(-1, -2)) * g.scale
    starts, ends = row_bounds(b, t, n, g.lengths, g.starts, q.device)
    pos = torch.arange(n)
    allowed = (pos >= starts[:, None, None]) & (pos < ends[:, :, None])
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    shift = s.amax(-1)
    x = torch.exp(s - shift[..., None])
    den = x.sum(-1)
    o = (x @ vv) / den[..., None]
    return o, den, shift, s, allowed, starts, ends


def row_errors(g, ref, sel):
    o_ref, den, shift, s, allowed, starts, ends = ref
    hq = g.q.shape[1]
    rep = hq // sel.indices.shape[1]
    idx, lw, ok = sel.indices.long(), sel.log_weights.double(), sel.valid()
    if rep > 1:
        idx, lw, ok = (x.repeat_interleave(rep, 1) for x in (idx, lw, ok))
    s_sel = torch.gather(s, -1, idx.clamp(min=0)) + lw
    d_hat = (torch.exp(s_sel - shift[..., None]) * ok).sum(-1)
    den_err = (d_hat - den).abs() / den
    out = attend(g.q, g.k, g.v, sel, scale=g.scale).double()
    out_err = (out - o_ref).norm(dim=-1) / o_ref.norm(dim=-1)
    attended = float(sel.count.sum()) * rep
    allowed_pairs = float((ends - starts[:, None]).clamp(min=0).sum()) * hq
    return out_err.reshape(-1), den_err.reshape(-1), attended, allowed_pairs


def heavy_rows(g, ref, front: str):
    """bool per row: a key outside the front holds > 1% of the row's mass."""
    o_ref, den, shift, s, allowed, starts, ends = ref
    sel = select(front, g.q, g.k, g.v, lengths=g.lengths, starts=g.starts, scale=g.scale, seed=0)
    hq = g.q.shape[1]
    rep = hq // sel.indices.shape[1]
    idx, ok = sel.indices.long(), sel.valid()
    if rep > 1:
        idx, ok = idx.repeat_interleave(rep, 1), ok.repeat_interleave(rep, 1)
    p = torch.exp(s - shift[..., None]) / den[..., None]
    chosen = torch.zeros_like(allowed[:, None].expand_as(p))
    chosen = chosen.scatter(-1, idx.clamp(min=0), ok)
    return (p.masked_fill(chosen, 0.0).amax(-1) > 0.01).reshape(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fronts", default="none,topk,hashtopk,quest")
    ap.add_argument("--eps", default="0.05,0.1,0.2")
    ap.add_argument("--modes", default="output,denominator")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--layers", default="", help="comma-separated layer indices (default: all)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--share", default="none")
    ap.add_argument("--extra", default="", help="extra verified(...) arguments, e.g. min_pilot=32")
    ap.add_argument("--cache", default="/tmp/vattn_coverage_fronts_qkv.pt")
    ap.add_argument("--json", default="")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    groups = load_groups(args.cache, args.tokens, args.queries)
    if args.layers:
        keep = {f"layer {int(x):02d}" for x in args.layers.split(",")}
        groups = [g for g in groups if g.name in keep]
    refs = [reference(g) for g in groups]
    table = []
    t0 = time.time()
    for fname in args.fronts.split(","):
        front = FRONTS.get(fname, fname)
        heavy = torch.cat([heavy_rows(g, r, front) for g, r in zip(groups, refs)])
        for mode in args.modes.split(","):
            for e in (float(x) for x in args.eps.split(",")):
                extra = f",{args.extra}" if args.extra else ""
                spec = f"{front}+verified(eps={e},delta={e},mode='{mode}',share='{args.share}'{extra})"
                errs, att, alw, hv = [], 0.0, 0.0, []
                for seed in range(args.seeds):
                    for g, r in zip(groups, refs):
                        sel = select(spec, g.q, g.k, g.v, lengths=g.lengths, starts=g.starts,
                                     scale=g.scale, seed=seed, layer=int(g.name.split()[-1]))
                        oe, de, a, al = row_errors(g, r, sel)
                        errs.append(oe if mode == "output" else de)
                        att += a
                        alw += al
                    hv.append(heavy)
                err = torch.cat(errs)
                hv = torch.cat(hv)
                ok = err <= e
                row = {"front": fname, "mode": mode, "eps": e, "delta": e, "rows": err.numel(),
                       "coverage": float(ok.double().mean()), "target": 1 - e,
                       "density": att / alw, "heavy_rows": int(hv.sum()),
                       "heavy_coverage": float(ok[hv].double().mean()) if hv.any() else float("nan"),
                       "mean_error": float(err.mean()), "spec": spec}
                table.append(row)
                print(f"{fname:9s} {mode:11s} eps=delta={e:<5g} coverage {row['coverage']:.3f} "
                      f"(target {row['target']:.2f})  density {row['density']:.3f}  "
                      f"heavy rows {row['heavy_rows']} cov {row['heavy_coverage']:.3f}  "
                      f"rows {row['rows']}  [{time.time() - t0:.0f}s]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
