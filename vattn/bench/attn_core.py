"""Attention benchmark logic (no printing): per-layer latency of decode attention.

All numbers come from one run on one device: torch SDPA under each of its fused backends
(cuDNN, flash, memory-efficient; the fastest is the baseline, reported by name), our dense
kernel (kernels/decode.py), and the vAttention scan pipeline (kernels/scan.py), plus the
measured HBM ceiling.
"""
from __future__ import annotations

import datetime
import functools
import logging
import math

import torch

from vattn.errors import VattnError

log = logging.getLogger(__name__)

SHAPE = dict(hq=32, hkv=8, d=128)  # Llama-3-8B attention
PEAKED_BITS = 128  # the signature width of the peaked-score rows (the vattention-scan preset's)
SDPA_BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")  # torch's math backend is no rival


def require_cuda():
    if not torch.cuda.is_available():
        raise VattnError("vattn bench times GPU kernels and needs a CUDA GPU; none found. On CPU, check the "
                         "kernels in the Triton interpreter: `TRITON_INTERPRET=1 python -m pytest "
                         "tests/test_kernels.py tests/test_kernels_scan.py`")


def graph_us(fns, warmup=3, flush=None):
    """Median microseconds per call of fns (a list rotated through, so inputs beat the L2).
    flush (e.g. l2_flusher()): run before every call and its own time subtracted, so each call
    starts with a cold L2 as a layer does in a decoder (its weights pass through L2 between
    two attention calls). A replay holds at least 4 calls (fns repeated): the graph's own launch
    (~10 us on an H100) would otherwise count in full against each call."""
    fns = list(fns) * -(-4 // max(len(fns), 1))
    for _ in range(warmup):
        for f in fns:
            f()
    if flush is None:
        return _replay_ms(fns) * 1e3 / len(fns)
    both = _replay_ms([g for f in fns for g in (flush, f)])
    return (both - _replay_ms([flush] * len(fns))) * 1e3 / len(fns)


def _replay_ms(calls):
    """Median ms of one replay of a CUDA graph holding calls in order."""
    import triton
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            for f in calls:
                f()
    torch.cuda.current_stream().wait_stream(s)
    return triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median")


@functools.lru_cache(maxsize=4)  # one buffer per size and device for the whole run
def l2_flusher(mib=256, device="cuda"):
    """A call that reads `mib` MiB (several times the L2): what was cached before it is gone."""
    buf = torch.ones(mib * 2 ** 18, dtype=torch.float32, device=device)
    out = torch.empty((), dtype=torch.float32, device=device)
    return lambda: torch.sum(buf, dim=0, out=out)


def hbm_ceiling():
    """(copy GB/s counting read+write, read-only reduction GB/s) over 2 GiB buffers."""
    import triton
    x = torch.empty(2 ** 30, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    t_copy = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    t_sum = triton.testing.do_bench(lambda: x.sum(dtype=torch.float32), warmup=25, rep=200, return_mode="median")
    nbytes = x.numel() * 2
    return 2 * nbytes / t_copy / 1e6, nbytes / t_sum / 1e6


def sdpa(backend: str):
    """fn(q, k, v) -> torch SDPA restricted to one backend (a name of SDPBackend), GQA without copies."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = getattr(SDPBackend, backend)

    def call(q, k, v):
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return call


def sdpa_backends(q, k, v):
    """The SDPA_BACKENDS that take these inputs (one eager call each)."""
    ok = []
    for name in SDPA_BACKENDS:
        try:
            sdpa(name)(q, k, v)
            torch.cuda.synchronize()
            ok.append(name)
        except RuntimeError as e:
            log.info("SDPA backend %s does not take these inputs: %s", name, str(e).splitlines()[0])
    if not ok:
        raise VattnError(f"no fused SDPA backend of torch {torch.__version__} takes q {tuple(q.shape)} "
                         f"k {tuple(k.shape)} {q.dtype} with enable_gqa")
    return ok


def scan_params(n, density=0.10, sink=128, window=128, eps=0.05, delta=0.05, reserve=0.04, bits=32):
    """The vAttention spec at about `density`: sinks + window + approximate top-k from `bits`-bit
    signatures, the verified sample takes the rest. Its independent draws take ~4% of the keys at
    128K on random inputs: reserve that, so the measured density stays at or below `density`."""
    topk = max(64, int(density * n) - sink - window - int(reserve * n) - 256)
    return dict(sink=sink, window=window, topk=topk, m0=128, eps=eps, delta=delta, bits=bits)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_config(B, N, density=0.10, dtype=torch.bfloat16, seed=0, check=True):
    """One row: SDPA per backend (sdpa_us / sdpa_backend: the fastest), dense, the scan pipeline
    (whole step, cumulative stage times, density), warm and cold L2, and errors."""
    from vattn.kernels.bits import sign_bits
    from vattn.kernels.decode import dense_decode
    require_cuda()
    hq, hkv, d = SHAPE["hq"], SHAPE["hkv"], SHAPE["d"]
    g = torch.Generator(device="cuda").manual_seed(seed)
    nbytes = 2 * B * N * hkv * d * 2
    copies = max(1, math.ceil(4 * 50e6 / nbytes))  # rotate so the working set is >> L2
    sets = []
    proj = torch.randn(d, 32, device="cuda", generator=g)
    lengths = torch.full((B,), N, dtype=torch.int32, device="cuda")
    for i in range(copies):
        q = torch.randn(B, hq, 1, d, device="cuda", dtype=dtype, generator=g)
        k = torch.randn(B, hkv, N, d, device="cuda", dtype=dtype, generator=g)
        v = torch.randn(B, hkv, N, d, device="cuda", dtype=dtype, generator=g)
        sets.append((q, k, v, sign_bits(k, proj)))  # signatures are written at cache-fill time, not timed
    row = dict(B=B, N=N, copies=copies, bytes=nbytes)
    for name in sdpa_backends(*sets[0][:3]):
        fn = sdpa(name)
        try:
            row[f"sdpa_{name.lower()}_us"] = graph_us([lambda s=s, fn=fn: fn(*s[:3]) for s in sets])
        except RuntimeError as e:  # a backend that runs eagerly but not under graph capture
            log.warning("SDPA backend %s left out: %s", name, str(e).splitlines()[0])
    times = {k[5:-3]: v for k, v in row.items() if k.startswith("sdpa_")}
    best = min(times, key=times.get)
    row["sdpa_backend"], row["sdpa_us"] = best, times[best]
    row["dense_us"] = graph_us([lambda s=s: dense_decode(*s[:3], lengths) for s in sets])
    cold = l2_flusher()  # the same calls, each after a read that evicts the L2
    fn = sdpa(best.upper())
    row["sdpa_cold_us"] = graph_us([lambda s=s: fn(*s[:3]) for s in sets], flush=cold)
    row["dense_cold_us"] = graph_us([lambda s=s: dense_decode(*s[:3], lengths) for s in sets], flush=cold)
    sp = scan_params(N, density)
    scan_stages(row, sets, proj, lengths, sp, check)
    exact_fronts(row, sets, lengths, sp)
    if check:
        q, k, v = sets[0][:3]
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
        row["dense_err"] = rel(dense_decode(q, k, v, lengths), ref)
        row["sdpa_err"] = rel(fn(q, k, v), ref)
    return row


def scan_spec(sp, mode="denominator") -> str:
    """The spec whose plan runs the scan kernels with these arguments (what a user writes)."""
    return (f"sink({sp['sink']})+window({sp['window']})+hashtopk({sp['topk']},bits={sp['bits']},cut='sample')"
            f"+verified(eps={sp['eps']},delta={sp['delta']},draws='iid',mode='{mode}',min_pilot={sp['m0']})")


def scan_stages(row, sets, proj, lengths, sp, check=True):
    """The scan spec's plan (what vattn.patch and the engine run): whole step, warm and cold
    L2, and its measured density; the kernels' cumulative stage times (cut; + scan; + sample;
    + merge) on the plan's signatures; and (check) the kernels' distance to the float64 twin
    with their own cuts, and the twin's denominator error. `proj` is unused: the plan signs keys
    with the layer's own projection."""
    from vattn.kernels.scan import scan_decode_ref, scan_density, vattention_scan_decode
    from vattn.plan import compile as compile_plan
    spec = scan_spec(sp)
    plan = compile_plan(spec, "cuda", fused=True)
    ctx = step_context(lengths, sets[0][0].shape[-1])
    for i, s in enumerate(sets):  # set i plays layer i: its own signatures, signed at cache-fill time
        plan.append(i, s[1], s[2], ctx)
    row["scan_spec"] = spec
    row["scan_path"] = plan.path
    runs = [lambda s=s, i=i: plan.run(i, s[0], s[1], s[2], ctx) for i, s in enumerate(sets)]
    row["scan_us"] = graph_us(runs)
    row["scan_cold_us"] = graph_us(runs, flush=l2_flusher())
    both_modes(row, "scan", sets, sp, ctx, modes=("output",))  # verified's default mode; denominator: above
    # Values with a shared mean direction per head, as real models' are: unit-normal values
    # average to a tiny output, whose relative error no sample much smaller than the row bounds.
    g = torch.Generator(device="cuda").manual_seed(1)
    vm = [(s[0], s[1], s[2] + 0.5 * torch.randn(s[2].shape[:2] + (1, s[2].shape[3]), device="cuda", generator=g,
                                                dtype=s[2].dtype)) for s in sets]
    both_modes(row, "vmean", vm, sp, ctx)
    del vm
    # peaked scores behind the `vattention-scan` preset's 128-bit front: 32-bit signatures miss many
    # of the hot keys there (density 0.15-0.63 at these shapes, H200 2026-12-03), which the sample then pays for
    both_modes(row, "peaked", peaked_sets(*sets[0][1].shape[:3], len(sets), sets[0][0].dtype, g),
               dict(sp, bits=PEAKED_BITS), ctx)
    sig = [(plan.states[i]["sig"], plan.states[i]["proj"]) for i in range(len(sets))]
    kw = {n: x for n, x in sp.items() if n != "bits"}  # the kernels read the signatures' width from them
    for upto, name in ((1, "scan_cut_us"), (2, "scan_scan_us"), (3, "scan_sample_us"), (4, "scan_kernels_us")):
        row[name] = graph_us([lambda s=s, i=i: vattention_scan_decode(*s[:3], *sig[i], lengths, seed=i, upto=upto, **kw)
                              for i, s in enumerate(sets)])
    q, k, v, _ = sets[0]
    out, st = vattention_scan_decode(q, k, v, *sig[0], lengths, stats=True, **kw)
    row.update({f"scan_{n}": sp[n] for n in ("topk", "eps", "delta")})
    row["scan_density"] = scan_density(st, lengths, k.shape[1])
    r = st["rows"].cpu()
    row["scan_exact_rows"] = int(r[:, 4].sum())
    row["scan_draws_mean"] = r[:, 1].mean().item()
    if check and q.shape[0] * k.shape[2] <= 131072 * 8:  # the float64 twin on the host, with the kernel's cuts
        ref, rs = scan_decode_ref(q, k, v, *sig[0], lengths, tau=r[:, 5].long(), thu=r[:, 6].long(),
                                  total=r[:, 1].long(), exact=r[:, 4] > 0, **kw)
        row["scan_err_vs_twin"] = rel(out, ref)
        de = (rs["d_hat"] / rs["d"] - 1).abs()
        row["scan_denom_err_mean"] = de.mean().item()
        row["scan_denom_within_eps"] = (de <= sp["eps"]).float().mean().item()
    return row


def front_specs(sp) -> dict:
    """The fused plans with an exact front at the scan spec's sizes: top-k alone (on exact scores,
    and on 32-bit signatures: hashtopk, cut='exact'), Quest alone (per
    query head, and per KV head: share='kv'), and top-k and Quest each followed by the iid verified
    sample (kernels/sampled.py), denominator mode."""
    ver = (f"verified(eps={sp['eps']},delta={sp['delta']},draws='iid',mode='denominator',"
           f"min_pilot={sp['m0']})")
    front = f"sink({sp['sink']})+window({sp['window']})"
    quest = f"{front}+quest({sp['topk']},page=16"
    return {"topk": f"{front}+topk({sp['topk']})", "hashtopk": f"{front}+hashtopk({sp['topk']},bits=32)",
            "quest": quest + ")", "quest_kv": quest + ",share='kv')",
            "topk_verified": f"{front}+topk({sp['topk']})+{ver}", "quest_verified": f"{quest})+{ver}"}


def step_context(lengths, d: int):
    """A decode step's context for rows of `lengths` keys from key 0 (every plan here shares it)."""
    from vattn.plan import Plan
    starts = torch.zeros(lengths.shape[0], dtype=torch.long, device=lengths.device)
    return Plan.context(starts, lengths.long()[:, None], d ** -0.5, zero_starts=True)


def time_plan(row, name, spec, sets, ctx):
    """row[name_us], row[name_density], row[name_path]: the fused plan of `spec` on (q, k, v)
    sets, set i playing layer i (a fresh plan: its state is built from these keys)."""
    from vattn.metrics import density
    from vattn.plan import compile as compile_plan
    plan = compile_plan(spec, "cuda", fused=True)
    for i, s in enumerate(sets):
        plan.append(i, s[1], s[2], ctx)
    row[f"{name}_us"] = graph_us([lambda s=s, i=i: plan.run(i, *s[:3], ctx) for i, s in enumerate(sets)])
    row[f"{name}_density"] = density(plan.run(0, *sets[0][:3], ctx)[1], ctx.starts, ctx.ends, sets[0][0].shape[1])
    row[f"{name}_path"] = plan.path


def exact_fronts(row, sets, lengths, sp):
    """row[f"{name}_us"] / row[f"{name}_density"] / row[f"{name}_path"] of front_specs' plans."""
    ctx = step_context(lengths, sets[0][0].shape[-1])
    for name, spec in front_specs(sp).items():
        time_plan(row, name, spec, sets, ctx)


def both_modes(row, name, sets, sp, ctx, modes=("denominator", "output")):
    """The scan spec's plan in each of `modes` on (q, k, v) sets: row[name_mode_us],
    row[name_mode_density]."""
    for mode in modes:
        time_plan(row, f"{name}_{mode}", scan_spec(sp, mode), sets, ctx)


def peaked_sets(B, hkv, N, copies, dtype, g, device="cuda"):
    """(q, k, v) sets whose scaled scores follow `vattn verify`'s "peaked" family (unit-normal, ~1%
    of keys 6 above the rest: synthetic.scores) for every query head of a group, each head's own
    query noise adding ~0.3 to its scores; values share a mean direction per head. Closer to a
    trained model's attention than unit-normal q and k, whose flat rows are the sample's worst case."""
    hq, d = SHAPE["hq"], SHAPE["d"]
    out = []
    for _ in range(copies):
        u = torch.nn.functional.normalize(torch.randn(B, hkv, 1, d, device=device, generator=g), dim=-1)
        a = torch.randn(B, hkv, N, 1, device=device, generator=g)
        a += 6.0 * (torch.rand(B, hkv, N, 1, device=device, generator=g) < 0.01)
        k = torch.randn(B, hkv, N, d, device=device, generator=g)
        k -= (k @ u.transpose(-1, -2)) * u  # noise orthogonal to the group's query direction
        k = (k + a * u).to(dtype)
        del a
        q = d ** 0.5 * u.repeat_interleave(hq // hkv, dim=1)
        q = (q + 0.3 * torch.randn(q.shape, device=device, generator=g)).to(dtype)
        v = torch.randn(B, hkv, N, d, device=device, generator=g)
        v = (v + 0.5 * torch.randn(B, hkv, 1, d, device=device, generator=g)).to(dtype)
        out.append((q, k, v))
    return out


def device_info():
    p = torch.cuda.get_device_properties(0)
    return dict(device=p.name, sms=p.multi_processor_count, torch=torch.__version__,
                date=datetime.date.today().isoformat())
