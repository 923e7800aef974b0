"""Per-layer times of the exact-front + iid verified plans against SDPA (cuDNN), dense and the scan chain."""
import sys, torch, math
from vattn.bench import attn_core as core
from vattn.plan import compile as compile_plan
from vattn.metrics import density
from vattn.kernels.decode import dense_decode
hq, hkv, d = 32, 8, 128
def sets_for(B, N, peaked, copies, g):
    if peaked:
        return core.peaked_sets(B, hkv, N, copies, torch.bfloat16, g)
    out = []
    for _ in range(copies):
        q = torch.randn(B, hq, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, hkv, N, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, hkv, N, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v += 0.5 * torch.randn(B, hkv, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
        out.append((q, k, v))
    return out
def plan_time(spec, sets, ctx):
    plan = compile_plan(spec, "cuda", fused=True)
    for i, s in enumerate(sets):
        plan.append(i, s[1], s[2], ctx)
    us = core.graph_us([lambda s=s, i=i: plan.run(i, *s[:3], ctx) for i, s in enumerate(sets)])
    out, sel = plan.run(0, *sets[0][:3], ctx)
    ref = torch.nn.functional.scaled_dot_product_attention(sets[0][0].float(), sets[0][1].float(), sets[0][2].float(), enable_gqa=True)
    return plan.path, us, density(sel, ctx.starts, ctx.ends, hq), core.rel(out, ref)
g = torch.Generator(device="cuda").manual_seed(0)
print(f"{'B':>2} {'N':>6} {'data':>6} {'spec':<70} {'path':<15} {'us':>7} {'SDPA/x':>6} {'dens':>6} {'err':>7}")
for B, N in [(1, 32768), (1, 131072), (8, 32768), (8, 131072)]:
    copies = max(1, math.ceil(4 * 50e6 / (2 * B * N * hkv * d * 2)))
    for peaked in (False, True):
        sets = sets_for(B, N, peaked, copies, g)
        lengths = torch.full((B,), N, dtype=torch.int32, device="cuda")
        starts = torch.zeros(B, dtype=torch.long, device="cuda")
        ctx = compile_plan("dense", "cuda").context(starts, lengths.long()[:, None], d ** -0.5, zero_starts=True)
        fn = core.sdpa("CUDNN_ATTENTION")
        sd = core.graph_us([lambda s=s: fn(*s[:3]) for s in sets])
        de = core.graph_us([lambda s=s: dense_decode(*s[:3], lengths) for s in sets])
        tag = "peaked" if peaked else "vmean"
        print(f"{B:>2} {N:>6} {tag:>6} {'SDPA cudnn':<70} {'':<15} {sd:7.1f} {1:6.2f}")
        print(f"{B:>2} {N:>6} {tag:>6} {'dense kernel':<70} {'':<15} {de:7.1f} {sd/de:6.2f}")
        k = int(0.05 * N)
        ver = "verified(eps=0.05,delta=0.05,draws='iid',mode='{m}',min_pilot=128)"
        specs = [f"sink(128)+window(128)+topk({k})",
                 f"sink(128)+window(128)+topk({k})+" + ver.format(m="denominator"),
                 f"sink(128)+window(128)+topk({k})+" + ver.format(m="output"),
                 f"sink(128)+window(128)+quest({k},page=16)",
                 f"sink(128)+window(128)+quest({k},page=16)+" + ver.format(m="denominator"),
                 f"sink(128)+window(128)+quest({k},page=16)+" + ver.format(m="output"),
                 f"sink(128)+window(128)+hashtopk({k},bits=128,cut='sample')+" + ver.format(m="denominator")]
        for spec in specs:
            try:
                path, us, dens, err = plan_time(spec, sets, ctx)
                print(f"{B:>2} {N:>6} {tag:>6} {spec:<70.70} {path:<15} {us:7.1f} {sd/us:6.2f} {dens:6.3f} {err:7.1e}", flush=True)
            except Exception as e:
                print(f"{B:>2} {N:>6} {tag:>6} {spec:<70.70} ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
        del sets
        torch.cuda.empty_cache()
