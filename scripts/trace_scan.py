"""Timeline of the four-launch scan pipeline on GPU, from the kernels' global-timer stamps
(vattention_scan_decode(trace=...)), replayed in a CUDA graph as the benchmark runs it.
Usage: python scripts/trace_scan.py [B,N[,eps,topk[,name=value ...]] ...]   (default 1,131072 8,131072)
eps and topk (a fraction of N) replace the benchmark's (scan_params: eps 0.05, top-k sized for 10%);
name=value pairs (values as JSON) go to the kernel call (e.g. pre=true), scan.NAME=value set a
constant of vattn.kernels.scan (e.g. scan.SUB_BLOCK=1024). COLD=1 in the
environment writes a 256 MB buffer before each call, so L2 holds none of its rows (as in a decode
step, where 31 other layers' weights and keys pass between two calls of a layer).
Prints per kernel: first start / last end (us from the cut's first start), program count,
SMs used, and per phase the median / p90 / max duration over programs."""
import json
import os
import sys

import torch
from vattn.bench.attn_core import scan_params
from vattn.kernels.bits import sign_bits
from vattn.kernels import scan
from vattn.kernels.scan import vattention_scan_decode

PHASES = {"cut": ("wait+hist", "atomic", "cut+pilot"),
          "scan": ("setup", "compact", "gather", "write"),
          "sample": ("setup", "budget", "draws", "write"),
          "merge": ("wait", "merge")}


def data(B, N, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, 32, 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, 8, N, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, 8, N, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    proj = torch.randn(128, 32, device="cuda", generator=g)
    return q, k, v, proj, sign_bits(k, proj)


def q(x, f):
    return x.quantile(f).item() if x.numel() else float("nan")


def timeline(B, N, fn=vattention_scan_decode, **kw):
    qq, k, v, proj, ks = data(B, N)
    L = torch.full((B,), N, dtype=torch.int32, device="cuda")
    sp = scan_params(N) | kw.pop("params", {})
    sp.pop("bits")  # the signatures are made here, 32-bit
    flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda") if os.environ.get("COLD") == "1" else None

    def run(tr=None):
        if flush is not None:
            flush.fill_(1)
        return fn(qq, k, v, ks, proj, L, trace=tr, **sp, **kw)
    tr, tr2 = {}, {}  # two calls in the graph, as the benchmark replays several: the second shows the gap
    for _ in range(3):  # also allocates the stamp tables: none is zeroed inside the graph
        run(tr)
        run(tr2)
    for t in (*tr.values(), *tr2.values()):
        t.zero_()  # stamps a phase skips stay 0, as the analysis expects
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        run(tr)
        run(tr2)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    t0 = min(t[t[:, 0] > 0, 0].min().item() for t in tr.values())  # tables may hold unused rows
    end1 = max(t[:, 1:7].max().item() for t in tr.values())
    start2 = min(t[t[:, 0] > 0, 0].min().item() for t in tr2.values())
    print(f"\nnext call (same graph): its first program starts {(start2 - t0) / 1e3:.1f} us after this call's, "
          f"{(start2 - end1) / 1e3:.1f} us after this call's last stamp (the merge's end)")
    print(f"\nB={B} N={N} {fn.__name__} {sp} {kw}: us from the first program's start")
    for name, ph in PHASES.items():
        if name not in tr:
            continue
        t = tr[name].cpu()
        ran = t[:, 0] > 0
        t = t[ran]
        last = t[:, 1:len(ph) + 1].max(1).values  # the cut's non-last programs skip slot 3
        start, end = (t[:, 0].min().item() - t0) / 1e3, (last.max().item() - t0) / 1e3
        dur, late = (last - t[:, 0]).float() / 1e3, (t[:, 0] - t0).float() / 1e3
        print(f"  {name:6s} {start:7.1f} .. {end:7.1f}  programs {len(t)} on {t[:, 7].unique().numel()} SMs; "
              f"program time median {q(dur, .5):.1f} max {dur.max():.1f}; starts after {q(late, .5):.1f} (median) "
              f"{late.max():.1f} (last)")
        for i, p in enumerate(ph):
            a, b = t[:, i], t[:, i + 1]
            ok = (a > 0) & (b > 0)  # a program that skips a phase leaves its stamps 0
            d = (b[ok] - a[ok]).float() / 1e3
            top = d.max().item() if d.numel() else 0
            print(f"      {p:10s} median {q(d, .5):6.2f}  p90 {q(d, .9):6.2f}  max {top:6.2f}  (n={int(ok.sum())})")


if __name__ == "__main__":
    cases = [a.split(",") for a in sys.argv[1:]] or [["1", "131072"], ["8", "131072"]]
    for c in cases:
        extra = dict(eps=float(c[2]), delta=float(c[2]), topk=float(c[3])) if len(c) > 2 else {}
        kw = {a.split("=")[0]: json.loads(a.split("=", 1)[1]) for a in c[4:]}
        for name in [n for n in kw if n.startswith("scan.")]:  # a module constant, e.g. scan.SUB_BLOCK=1024
            setattr(scan, name.split(".", 1)[1], kw.pop(name))
        timeline(int(c[0]), int(c[1]), params=extra, **kw)
