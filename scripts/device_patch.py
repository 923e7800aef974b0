"""On a GPU: ms per decoded token through transformers' generate, as a user runs it: the model
unpatched (HF SDPA), and vattn.patch with each spec (prefill dense, decode sparse).

    PYTHONPATH=. python scripts/device_patch.py [context] [layers] [cache]   # default 32768 32 dynamic

cache "static": transformers' StaticCache, and generate compiles the decode forward itself
(torch.compile, mode reduce-overhead) on CUDA. PATCH_SPECS="a;b" replaces the spec list.
PROFILE=1: also the GPU kernels of a decoded token per spec (a CUDA profile of generate(1 + n)
minus that of generate(1)), the busiest first, and their sum against the token's time.

Llama-3-8B shape, random weights, bf16, B=1. Per spec: (t(generate 1 + n tokens) - t(generate 1)) / n,
so the prefill cancels, n = NEW (default 64) tokens, REPEAT (default 3) times: the median and the
range (the prefill's spread over n is what a single short run reads as a difference between
specs); density from the patch's summary.
"""
import json
import os
import sys
import time

import torch

import vattn

SPECS = ["dense", "streaming", "vattention-scan",
         "sink(128)+window(128)+hashtopk(0.05,bits=128,cut='sample')"
         "+verified(eps=0.1,delta=0.1,draws='iid',mode='denominator',min_pilot=128)",
         "oracle-topk", "sink(128)+window(128)+quest(0.1,page=16)"]
NEW = int(os.environ.get("NEW", 64))
REPEAT = int(os.environ.get("REPEAT", 3))


def main():
    import transformers as tf
    n_ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    cache = sys.argv[3] if len(sys.argv) > 3 else "dynamic"
    cfg = tf.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = tf.LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    # ids from 1: generate masks out every pad_token_id (0) it meets in a prompt, and the patch
    # refuses a mask with holes (not "left padding + causal")
    ids = torch.randint(1, 128000, (1, n_ctx), device="cuda")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} transformers {tf.__version__} "
          f"{time.strftime('%Y-%m-%d')}; Llama-3-8B shape, {layers} layers, bf16, B=1, context {n_ctx}, "
          f"cache {cache}", flush=True)

    if cache == "static":
        torch._dynamo.config.cache_size_limit = 64  # a recompile per spec must not fall back to eager
        st = tf.StaticCache(config=cfg, max_cache_len=n_ctx + NEW + 8)

    def gen(new):
        kw = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
        if cache == "static":  # one cache of one length, so the compiled graphs are reused
            st.reset()
            kw["past_key_values"] = st
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    def per_token(new):
        gen(2)  # warm-up (kernels compiled, caches allocated)
        runs = sorted((gen(1 + new) - gen(1)) / new * 1e3 for _ in range(REPEAT))
        ms = runs[len(runs) // 2]
        if os.environ.get("PROFILE"):
            kernels(new, ms)
        return ms, runs[0], runs[-1]

    def kernels(new, ms):
        from collections import Counter
        from torch.profiler import ProfilerActivity, profile
        runs = []
        for n in (1, 1 + new):
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                gen(n)
            c, t = Counter(), Counter()
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    c[e.name[:80]] += 1
                    t[e.name[:80]] += e.device_time
            runs.append((c, t))
        (c1, t1), (c2, t2) = runs
        per = {k: ((c2[k] - c1[k]) / new, (t2[k] - t1[k]) / new) for k in t2}
        busy = sum(us for _, us in per.values())
        print(f"    kernels of a token: {sum(c for c, _ in per.values()):.0f} launches, {busy / 1e3:.2f} ms busy "
              f"of {ms:.2f} ms", flush=True)
        for k, (c, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:14]:
            print(f"    {us:9.1f} us {c:6.1f}x  {k}", flush=True)

    def compiled():  # what torch.compile did since the last call (static cache only)
        if cache != "static":
            return ""
        from torch._dynamo.utils import counters
        c = dict(graphs=counters["stats"]["unique_graphs"], breaks=sum(counters["graph_break"].values()),
                 cudagraph_skips=counters["inductor"]["cudagraph_skips"])
        top = sorted(counters["graph_break"].items(), key=lambda kv: -kv[1])[:2]
        counters.clear()
        return f"  compile {c} {[k[:120] for k, _ in top]}"

    ms, lo, hi = per_token(NEW)
    rows = [dict(spec="HF SDPA (unpatched)", ms=ms, lo=lo, hi=hi, density=1.0, path="sdpa")]
    print(f"{rows[0]['spec']:<70} {ms:8.2f} ms/token ({lo:.2f}-{hi:.2f}){compiled()}", flush=True)
    specs = os.environ["PATCH_SPECS"].split(";") if os.environ.get("PATCH_SPECS") else SPECS
    for spec in specs:
        try:
            with vattn.patch(model, spec, sparse_from=n_ctx) as p:
                ms, lo, hi = per_token(NEW)
                s = p.summary()
            rows.append(dict(spec=spec, ms=ms, lo=lo, hi=hi, density=s["density"], path=s["path"]))
            print(f"{spec:<70} {ms:8.2f} ms/token ({lo:.2f}-{hi:.2f})  density {s['density']:.3f}  path {s['path']}"
                  f"{compiled()}", flush=True)
        except Exception as e:  # one spec's failure must not hide the others' numbers
            import traceback
            print(f"{spec:<70} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc(limit=-6)
            rows.append(dict(spec=spec, error=str(e)[:300]))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"patch_{n_ctx}_{cache}.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
