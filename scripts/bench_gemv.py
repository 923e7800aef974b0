"""On a GPU: the skinny-GEMM kernels (vattn/kernels/gemv.py) against cuBLAS at Llama-3-8B decode shapes, bf16.

    PYTHONPATH=. python scripts/bench_gemv.py [--m 1 4 16] [--shapes qkv o gate_up down] [--sweep 16]
                                              [--layers 32] [--no-chain]

Shapes (K -> N): qkv 4096 -> 6144 and gate_up 4096 -> 28672 after the residual add + RMSNorm, o 4096 -> 4096
plain, down 14336 -> 4096 after the GLU. Per (shape, M), each column one CUDA graph of calls that rotate
through copies of the weights (> 200 MB together, L2 is 50 MB: every call reads its weight from HBM),
median of triton.testing.do_bench over graph replays, divided by the calls:
  cuBLAS      F.linear alone (its input precomputed)
  op+cuBLAS   layer_ops.add_rms_norm then F.linear (qkv, gate_up), layer_ops.glu then F.linear (down): the
              engine's fused path today
  ours        the fused kernel (rms_linear / linear / glu_linear), default config, PDL where available
  nopdl       the same with pdl=False
  best        the fastest of a sweep of tuning configs (--sweep N: at most N of them; 0: none)
Chain "norm apart": the norms as layer_ops.add_rms_norm launches before our GEMMs (default configs).
--chain-sweep N: per op in turn, N configs timed in the chain itself (ops timed alone mislead: configs
faster alone made the B=1 step slower).
GB/s counts the bytes the fused op must move (weight + activations in and out) for every column.
Chain: one layer's GEMMs in order (rms+qkv, o, rms+gate_up, glu+down) for --layers layers of distinct
weights in one graph, ours (default and swept configs) against op+cuBLAS: us per layer and per step.
Outputs are checked against cuBLAS (max |diff| / max |ref|) before anything is timed.
"""
import argparse
import datetime
import itertools
import random
import sys

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (4096, 6144, "rms"), "o": (4096, 4096, None), "gate_up": (4096, 28672, "rms"),
          "down": (14336, 4096, "glu")}
EPS = 1e-5
ACT = "silu"
ROTATE_BYTES = 256 << 20  # weight copies per timed graph: at least this many bytes (L2: 50 MB)
MAX_REL = 2e-2  # ours against cuBLAS, max |diff| / max |ref|, bf16
DEV = "cuda"
HIQ = (4096, 14336, 6144)  # hidden, intermediate, qkv width


def need_cuda():
    if not torch.cuda.is_available():
        raise SystemExit("bench_gemv.py times CUDA kernels and found no CUDA GPU (torch.cuda.is_available() "
                         "is False): run it on the GPU machine")


def graph_us(fns):
    """us per call of fns (callables), captured back to back into one CUDA graph."""
    import triton.testing
    for f in fns:  # compile, allocate
        f()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    ms = triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median")
    del g
    return ms * 1e3 / len(fns)


def rand(*shape, scale=1.0, gen=None):
    return (torch.randn(*shape, device=DEV, generator=gen) * scale).to(torch.bfloat16)


class Case:
    """Inputs of one shape at M rows, and `copies` weights to rotate through."""

    def __init__(self, name, M, gen):
        from vattn.kernels.layer_ops import add_rms_norm, glu
        self.name, self.M = name, M
        K, N, self.pro = SHAPES[name]
        self.K, self.N = K, N
        self.copies = max(2, -(-ROTATE_BYTES // (N * K * 2)))
        self.w = [rand(N, K, scale=K ** -0.5, gen=gen) for _ in range(self.copies)]
        self.nw = [rand(K, scale=0.1, gen=gen) + 1 for _ in range(self.copies)]
        self.x = rand(M, K, scale=2.0, gen=gen)
        self.delta = rand(M, K, gen=gen)
        self.gu = rand(M, 2 * K, scale=2.0, gen=gen)
        if self.pro == "rms":
            self.a = [add_rms_norm(self.x, self.delta, nw, EPS)[0] for nw in self.nw]  # cuBLAS's input
        elif self.pro == "glu":
            self.a = [glu(self.gu, ACT)] * self.copies
        else:
            self.a = [self.x] * self.copies
        act_bytes = {"rms": 4 * M * K, "glu": 2 * M * K, None: M * K}[self.pro] * 2 + M * N * 2
        self.bytes = N * K * 2 + act_bytes

    def cublas(self, i):
        return F.linear(self.a[i], self.w[i])

    def split(self, i):
        from vattn.kernels.layer_ops import add_rms_norm, glu
        if self.pro == "rms":
            return F.linear(add_rms_norm(self.x, self.delta, self.nw[i], EPS)[0], self.w[i])
        if self.pro == "glu":
            return F.linear(glu(self.gu, ACT), self.w[i])
        return None

    def ours(self, i, **kw):
        from vattn.kernels.gemv import glu_linear, linear, rms_linear
        if self.pro == "rms":
            return rms_linear(self.x, self.delta, self.nw[i], self.w[i], EPS, **kw)[1]
        if self.pro == "glu":
            return glu_linear(self.gu, ACT, self.w[i], **kw)
        return linear(self.x, self.w[i], **kw)

    def time(self, f, **kw):
        return graph_us([lambda i=i: f(i, **kw) for i in range(self.copies)])


def max_rel(y, ref):
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


def sweep_configs(M, N, K):
    """Tuning configs to try for one shape (the default first)."""
    from vattn.kernels.gemv import default_config
    out = [default_config(M, N, K)]
    if M == 1:
        for bn, (nw, bk), ns, sk in itertools.product((4, 8, 16), ((4, 1024), (2, 512), (8, 2048)), (1, 3),
                                                      (1, 2) if N <= 8192 else (1,)):
            out.append(dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, split_k=sk, dot=False))
    else:  # the weight tile is the MMA's M dim: block_n 64 or 128 (wgmma), 32 (mma)
        for bn, bk, ns, sk in itertools.product((32, 64, 128), (64, 128, 256), (3, 4, 5),
                                                (1, 2, 3, 4, 6, 8) if N <= 8192 else (1, 2)):
            if K // sk >= 2 * bk:
                out.append(dict(block_n=bn, block_k=bk, num_warps=4, num_stages=ns, split_k=sk, dot=True))
    head, rest = out[0], out[1:]
    random.Random(0).shuffle(rest)  # the first --sweep of them spread over every knob
    seen, uniq = set(), []
    for c in [head] + rest:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            uniq.append(c)
    return uniq


def short(cfg):
    return (f"bn{cfg['block_n']} bk{cfg['block_k']} w{cfg['num_warps']} s{cfg['num_stages']} "
            f"k{cfg['split_k']}{' dot' if cfg['dot'] else ''}")


def shape_rows(names, ms, n_sweep, gen):
    best = {}
    print(f"\n{'shape':8} {'M':>3} | {'cuBLAS us':>9} {'GB/s':>5} | {'op+cuBLAS':>9} {'GB/s':>5} | {'ours us':>7} "
          f"{'GB/s':>5} {'nopdl':>6} | {'x cuBLAS':>8} {'x op+cB':>7} | {'best us':>7} {'GB/s':>5}  best config")
    for name in names:
        for M in ms:
            c = Case(name, M, gen)
            ref = c.cublas(0)
            for label, y in (("ours", c.ours(0)), ("ours nopdl", c.ours(0, pdl=False)), ("op+cuBLAS", c.split(0))):
                if y is not None and max_rel(y, ref) > MAX_REL:
                    raise SystemExit(f"{name} M={M}: {label} differs from cuBLAS by {max_rel(y, ref):.3g} "
                                     f"(max |diff| / max |ref| > {MAX_REL}): not timing a wrong kernel")
            nbytes = c.bytes

            def gbs(us):
                return nbytes / us / 1e3
            t_cb = c.time(c.cublas)
            t_sp = c.time(c.split) if c.pro else None
            t_us = c.time(c.ours)
            t_np = c.time(c.ours, pdl=False)
            t_best, cfg_best = t_us, None
            for cfg in sweep_configs(M, c.N, c.K)[1:n_sweep + 1] if n_sweep else []:
                try:
                    err = max_rel(c.ours(0, **cfg), ref)
                    if err > MAX_REL:
                        print(f"  {name} M={M} {short(cfg)}: wrong ({err:.3g}), skipped")
                        continue
                    t = c.time(c.ours, **cfg)
                except Exception as e:  # e.g. out of shared memory: that config does not run here
                    print(f"  {name} M={M} {short(cfg)}: {type(e).__name__}: {str(e)[:120]}")
                    continue
                if t < t_best:
                    t_best, cfg_best = t, cfg
            best[name, M] = cfg_best
            sp = f"{t_sp:9.2f} {gbs(t_sp):5.0f}" if t_sp else f"{'-':>9} {'-':>5}"
            ratio_sp = f"{t_sp / t_us:7.2f}" if t_sp else f"{'-':>7}"
            print(f"{name:8} {M:3d} | {t_cb:9.2f} {gbs(t_cb):5.0f} | {sp} | {t_us:7.2f} {gbs(t_us):5.0f} {t_np:6.2f} | "
                  f"{t_cb / t_us:8.2f} {ratio_sp} | {t_best:7.2f} {gbs(t_best):5.0f}  "
                  f"{short(cfg_best) if cfg_best else '(default)'}", flush=True)
            c = None
            torch.cuda.empty_cache()
    return best


def chain(ms, layers, best, gen, sweep=0):
    """One decoder layer's GEMMs in order, `layers` layers of distinct weights, in one graph.
    sweep > 0: then per op in turn, up to `sweep` configs timed in the chain (the ops chosen before
    kept), a config kept when the chain gets 0.5% faster; returns {M: {shape: config}}."""
    from vattn.kernels.gemv import glu_linear, linear, rms_linear
    from vattn.kernels.layer_ops import add_rms_norm, glu
    H, I, Q = HIQ
    Ls = [dict(wqkv=rand(Q, H, scale=H ** -0.5, gen=gen), wo=rand(H, H, scale=H ** -0.5, gen=gen),
               wgu=rand(2 * I, H, scale=H ** -0.5, gen=gen), wd=rand(H, I, scale=I ** -0.5, gen=gen),
               ln1=rand(H, scale=0.1, gen=gen) + 1, ln2=rand(H, scale=0.1, gen=gen) + 1) for _ in range(layers)]
    per_layer = (Q * H + H * H + 2 * I * H + H * I) * 2
    print(f"\nchain: {layers} layers x (rms+qkv, o, rms+gate_up, glu+down), {per_layer * layers / 2 ** 30:.1f} GiB "
          "of weights")
    print(f"{'M':>3} | {'op+cuBLAS us/layer':>18} | {'ours':>7} {'x':>5} | {'ours best':>9} {'x':>5} | "
          f"{'norm apart':>9} {'x':>5} | {'GB/s op+cB':>10} {'ours':>5} {'best':>5}")
    found = {}
    for M in ms:
        x0, d0 = rand(M, H, gen=gen), rand(M, H, gen=gen)
        attn = rand(M, H, gen=gen)  # attention's output, fixed: the chain times the GEMMs

        def ref_step():
            x, d = x0, d0
            for L in Ls:
                hn, x = add_rms_norm(x, d, L["ln1"], EPS)
                F.linear(hn, L["wqkv"])
                o = F.linear(attn, L["wo"])
                hn, x = add_rms_norm(x, o, L["ln2"], EPS)
                d = F.linear(glu(F.linear(hn, L["wgu"]), ACT), L["wd"])
            return x

        def our_step(cfg=lambda name: {}, apart=False):
            # apart: the norms as layer_ops.add_rms_norm launches, our GEMMs without the norm prologue
            x, d = x0, d0
            for L in Ls:
                if apart:
                    hn, x = add_rms_norm(x, d, L["ln1"], EPS)
                    linear(hn, L["wqkv"], **cfg("qkv"))
                else:
                    x, _ = rms_linear(x, d, L["ln1"], L["wqkv"], EPS, **cfg("qkv"))
                o = linear(attn, L["wo"], **cfg("o"))
                if apart:
                    hn, x = add_rms_norm(x, o, L["ln2"], EPS)
                    gu = linear(hn, L["wgu"], **cfg("gate_up"))
                else:
                    x, gu = rms_linear(x, o, L["ln2"], L["wgu"], EPS, **cfg("gate_up"))
                d = glu_linear(gu, ACT, L["wd"], **cfg("down"))
            return x

        tuned = lambda name: best.get((name, M)) or {}  # noqa: E731
        err = max(max_rel(our_step(), ref_step()), max_rel(our_step(tuned), ref_step()),
                  max_rel(our_step(apart=True), ref_step()))
        if err > 0.05:
            raise SystemExit(f"chain M={M}: ours differs from op+cuBLAS by {err:.3g} after {layers} layers")
        t_ref = graph_us([ref_step]) / layers
        t_our = graph_us([our_step]) / layers
        t_best = graph_us([lambda: our_step(tuned)]) / layers
        t_apart = graph_us([lambda: our_step(apart=True)]) / layers
        gbs = lambda us: per_layer / us / 1e3  # noqa: E731
        print(f"{M:3d} | {t_ref:18.2f} | {t_our:7.2f} {t_ref / t_our:5.2f} | {t_best:9.2f} {t_ref / t_best:5.2f} | "
              f"{t_apart:9.2f} {t_ref / t_apart:5.2f} | {gbs(t_ref):10.0f} {gbs(t_our):5.0f} {gbs(t_best):5.0f}",
              flush=True)
        chosen, cur = {}, t_our
        for name, (K, N, _) in SHAPES.items() if sweep else ():
            for c in sweep_configs(M, N, K)[1:sweep + 1]:
                trial = dict(chosen, **{name: c})
                step = lambda trial=trial: our_step(lambda n: trial.get(n, {}))  # noqa: E731
                try:
                    if max_rel(step(), ref_step()) > 0.05:
                        continue
                    t = graph_us([step]) / layers
                except Exception as e:  # e.g. out of shared memory
                    print(f"  chain M={M} {name} {short(c)}: {type(e).__name__}")
                    continue
                if t < cur * 0.995:
                    cur, chosen = t, trial
            print(f"  chain sweep M={M}, {name}: {cur:.2f} us/layer ({t_ref / cur:.2f}x op+cuBLAS) with "
                  f"{short(chosen[name]) if name in chosen else 'the default'}", flush=True)
        found[M] = chosen
    Ls.clear()
    torch.cuda.empty_cache()
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--sweep", type=int, default=16, help="tuning configs to try per (shape, M); 0: none")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--no-chain", action="store_true")
    ap.add_argument("--chain-sweep", type=int, default=0, help="configs per op to time in the chain; 0: none")
    ap.add_argument("--json", help="write the best configs found (per op alone, and in the chain) here")
    args = ap.parse_args()
    need_cuda()
    import triton
    from vattn.kernels.common import use_pdl
    dev = torch.device("cuda")
    print(f"bench_gemv {datetime.date.today()}: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"triton {triton.__version__}, bf16, PDL {'on' if use_pdl(dev) else 'off (needs sm_90+)'}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    best = shape_rows(args.shapes, args.m, args.sweep, gen)
    found = {} if args.no_chain else chain(args.m, args.layers, best, gen, args.chain_sweep)
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(dict(alone=[dict(shape=k[0], M=k[1], N=SHAPES[k[0]][1], K=SHAPES[k[0]][0], config=v)
                                  for k, v in best.items() if v],
                           chain=[dict(shape=n, M=M, N=SHAPES[n][1], K=SHAPES[n][0], config=c)
                                  for M, cs in found.items() for n, c in cs.items()]), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
