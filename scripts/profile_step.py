"""On a GPU: where one engine decode step's time goes (Llama-3-8B shape, random weights, bf16).

    PYTHONPATH=. python scripts/profile_step.py [B,ctx,spec ...]   (default 1,32768,dense)

spec "nogemv:SPEC": the layers' GEMMs through cuBLAS with the layer-op kernels around them, not
kernels/gemv.py.

Per row: the step as `vattn bench e2e` times it (host included), the captured graph replayed back
to back (GPU only), and a CUDA profile of replays: kernels per step by name, their summed time,
and the gap (replay time minus kernel time: launch latency between dependent kernels)."""
import sys
import time
from collections import defaultdict

import torch

from vattn.bench.e2e import decode_loop, model_config
from vattn.engine.model import Decoder
from vattn.engine.runner import Runner


def row(decoder, B, ctx, spec, steps=8):
    r = Runner(decoder, spec=spec, device="cuda", dtype=decoder.dtype, max_len=ctx + 64, max_batch=B)
    try:
        slots = [r.alloc() for _ in range(B)]
        for i, s in enumerate(slots):
            r.fill_random(s, ctx, seed=i)
        step = decode_loop(r, slots, steps)
        import cProfile
        import pstats
        prof_host = cProfile.Profile()
        prof_host.enable()
        decode_loop(r, slots, steps, warmup=1)
        prof_host.disable()
        (g,) = r._graphs.values()
        graph = g["graph"]
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
        replay = (time.perf_counter() - t) / steps
        from torch.profiler import ProfilerActivity, profile
        n = 3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                graph.replay()
            torch.cuda.synchronize()
        kern = defaultdict(lambda: [0, 0.0])
        timeline(prof, n)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                k = kern[e.name[:70]]
                k[0] += 1
                k[1] += e.device_time
        total = sum(v[1] for v in kern.values()) / n
        count = sum(v[0] for v in kern.values()) / n
        print(f"\n== B={B} ctx={ctx} spec={spec} ({'gemv' if 'gemv' in decoder.fused else 'cuBLAS'}): step {step * 1e3:.3f} ms (host incl.), replay {replay * 1e3:.3f} ms, "
              f"kernels {total / 1e3:.3f} ms in {count:.0f} launches, gap {replay * 1e3 - total / 1e3:.3f} ms",
              flush=True)
        for name, (c, us) in sorted(kern.items(), key=lambda kv: -kv[1][1])[:16]:
            print(f"  {us / n:9.1f} us  {c / n:5.0f}x  {name}")
        print("  host (cProfile of the same steps, cumulative per step; 'tolist' is the wait for the GPU):")
        st = pstats.Stats(prof_host)
        for (f, line, fn), (cc, nc, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][3])[:14]:
            print(f"  {ct / steps * 1e6:9.1f} us  {nc / steps:6.1f}x  {fn} ({f.split('/')[-1]}:{line})")
    finally:
        r.close()


def timeline(prof, replays, at=0.4):
    """One layer's kernels in the first replay, in start order: start (us from the layer's
    first kernel), duration, and the idle time before each (the dependency gaps). The layer is
    the shortest period of kernel names around `at` of the step."""
    ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                key=lambda e: e.time_range.start)
    ev = ev[:len(ev) // replays]
    names = [e.name for e in ev]
    a = int(len(ev) * at)
    per = next((p for p in range(1, len(ev) // 4) if names[a:a + p] == names[a + p:a + 2 * p]
                and names[a:a + p] == names[a + 2 * p:a + 3 * p]), None)
    if per is None:
        print("  (no repeating layer pattern found)")
        return
    t0, prev = ev[a].time_range.start, None
    print(f"  one layer ({per} kernels from kernel {a} of {len(ev)}; us: start, duration, idle before):")
    for e in ev[a:a + per + 1]:
        s, d = e.time_range.start, e.time_range.end - e.time_range.start
        idle = "" if prev is None else f"{s - prev:7.1f}"
        print(f"  {s - t0:8.1f} {d:7.1f} {idle:>7}  {e.name[:60]}")
        prev = e.time_range.end


def main():
    rows = sys.argv[1:] or ["1,32768,dense"]
    cfg = model_config(None, False)
    import transformers as tf
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    ctx_max = max(int(r.split(",")[1]) for r in rows)
    decoder = Decoder(cfg, model.state_dict(), torch.device("cuda"), torch.bfloat16, ctx_max + 64)
    del model
    print(torch.cuda.get_device_name(), torch.__version__, time.strftime("%Y-%m-%d"))
    ops = decoder.fused
    for spec_row in rows:
        B, ctx, spec = spec_row.split(",", 2)
        decoder.fused = ops - {"gemv"} if spec.startswith("nogemv:") else ops  # "nogemv:SPEC": cuBLAS GEMMs
        try:
            row(decoder, int(B), int(ctx), spec.removeprefix("nogemv:"))
        except Exception as e:  # the next rows still run; the error is the row's result
            print(f"\n== B={B} ctx={ctx} spec={spec}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)


if __name__ == "__main__":
    main()
