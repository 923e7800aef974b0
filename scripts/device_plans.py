"""On a GPU: the fused streaming plan against the reference plan (same spec), per layer.

    PYTHONPATH=. python scripts/device_plans.py      # prints a table; Llama-3-8B attention shape, bf16
"""
import time

import torch

from vattn.plan import compile


def timed(fn, reps=50):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e6


def main():
    dev = "cuda"
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} {time.strftime('%Y-%m-%d')}")
    print("B N spec | err fused vs reference | us fused | us reference | us SDPA(default) | density")
    for b, n in ((1, 32768), (8, 32768), (1, 131072)):
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(b, 32, 1, 128, device=dev, dtype=torch.bfloat16, generator=g)
        k = torch.randn(b, 8, n, 128, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(b, 8, n, 128, device=dev, dtype=torch.bfloat16, generator=g)
        starts = torch.zeros(b, dtype=torch.long, device=dev)
        ends = torch.full((b, 1), n, dtype=torch.long, device=dev)
        for spec in ("sink(128)+window(1024)", "sink(0.02)+window(0.08)"):
            fused, ref = compile(spec, dev), compile(spec, dev, fused=False)
            assert fused.path == "streaming-kernel", fused.path
            a, sel = fused.run(0, q, k, v, starts, ends, 128 ** -0.5)
            r, _ = ref.run(0, q, k, v, starts, ends, 128 ** -0.5)
            err = float((a.float() - r.float()).norm() / r.float().norm())
            kk, vv = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
            sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, vv))
            tf = timed(lambda: fused.run(0, q, k, v, starts, ends, 128 ** -0.5))
            tr = timed(lambda: ref.run(0, q, k, v, starts, ends, 128 ** -0.5))
            dens = float(sel.count.float().mean()) / n
            print(f"{b} {n} {spec} | {err:.1e} | {tf:.1f} | {tr:.1f} | {sdpa:.1f} | {dens:.3f}")
            assert fused.path == "streaming-kernel"


if __name__ == "__main__":
    main()
