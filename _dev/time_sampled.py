"""Per-layer times of the sampled plans (us, density) against SDPA cuDNN."""
import math, torch
from vattn.bench import attn_core as core
from vattn.plan import compile as compile_plan
from vattn.metrics import density
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
g = torch.Generator(device="cuda").manual_seed(0)
for B, N in [(1, 32768), (1, 131072), (8, 32768)]:
    copies = max(1, math.ceil(4 * 50e6 / (2 * B * N * hkv * d * 2)))
    for peaked in (False, True):
        sets = sets_for(B, N, peaked, copies, g)
        lengths = torch.full((B,), N, dtype=torch.int32, device="cuda")
        starts = torch.zeros(B, dtype=torch.long, device="cuda")
        ctx = compile_plan("dense", "cuda").context(starts, lengths.long()[:, None], d ** -0.5, zero_starts=True)
        fn = core.sdpa("CUDNN_ATTENTION")
        sd = core.graph_us([lambda s=s: fn(*s[:3]) for s in sets])
        k = int(0.05 * N)
        ver = "verified(eps=0.05,delta=0.05,draws='iid',mode='{m}',min_pilot=128)"
        row = []
        for spec in [f"sink(128)+window(128)+topk({k})+" + ver.format(m="denominator"),
                     f"sink(128)+window(128)+topk({k})+" + ver.format(m="output"),
                     f"sink(128)+window(128)+quest({k},page=16)+" + ver.format(m="denominator"),
                     "vattention"]:
            plan = compile_plan(spec, "cuda", fused=True)
            for i, s in enumerate(sets):
                plan.append(i, s[1], s[2], ctx)
            us = core.graph_us([lambda s=s, i=i: plan.run(i, *s[:3], ctx) for i, s in enumerate(sets)])
            de = density(plan.run(0, *sets[0][:3], ctx)[1], starts, ctx.ends, hq)
            row.append(f"{us:7.1f} ({de:.3f})")
        print(f"B={B} N={N} {'peaked' if peaked else 'vmean'} SDPA {sd:.1f}: topk+ver den | topk+ver out | quest+ver den | vattention preset: " + " | ".join(row), flush=True)
        del sets
        torch.cuda.empty_cache()
