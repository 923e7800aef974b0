"""On a GPU: A/B of kernel-launch variants end to end, in one process (Llama-3-8B shape, random
weights, bf16), each variant's engine step timed twice, interleaved, beside the dense step.

    PYTHONPATH=. python scripts/ab_e2e.py B,ctx [B,ctx ...]

VARIANTS (environment): 'name:target=python-expr,,...;...' patches applied for that variant
(e.g. 'sub2k:vattn.kernels.scan.vattention_scan_decode.__kwdefaults__=dict(scan.vattention_scan_decode.__kwdefaults__,
sub=2048)'); SPEC: the sparse spec
(default: the scan chain at the vattention preset's error target)."""
import importlib
import os
import sys

import torch

from vattn.bench.e2e import engine, model_config

S2 = ("sink(128)+window(128)+hashtopk(0.05,bits=32,cut='sample')+verified(eps=0.2,delta=0.2,draws='iid',"
      "mode='denominator',min_pilot=128)")


def gemv_cfg(shapes, **knobs):
    """A gemv default_config with knobs set for single-row products of the (N, K) in shapes, e.g.
    'qkv2:vattn.kernels.gemv.default_config=gemv_cfg({(6144, 4096)}, num_warps=2, block_k=512)'."""
    import vattn.kernels.gemv as gemv
    base = gemv.default_config

    def config(M, N, K, dtype=torch.bfloat16, programs=264):
        c = base(M, N, K, dtype, programs)
        return {**c, **knobs} if M == 1 and (N, K) in shapes else c
    return config


def patches(text):
    """'target=expr,,target=expr': target a dotted path (module, then attributes), expr evaluated
    with `scan` (vattn.kernels.scan), `dec` (vattn.kernels.decode) and gemv_cfg in scope."""
    import vattn.kernels.decode as dec
    import vattn.kernels.scan as scan
    out = []
    for part in filter(None, text.split(",,")):
        target, expr = part.split("=", 1)
        names = target.split(".")
        for i in range(len(names), 0, -1):  # the longest importable prefix
            try:
                obj = importlib.import_module(".".join(names[:i]))
                break
            except ModuleNotFoundError:
                continue
        for a in names[i:-1]:
            obj = getattr(obj, a)
        out.append((obj, names[-1], eval(expr, {"scan": scan, "dec": dec, "gemv_cfg": gemv_cfg})))  # noqa: S307 (the caller's code)
    return out


def main():
    from vattn.engine.model import Decoder
    import transformers as tf
    spec = os.environ.get("SPEC", S2)
    variants = [("default", [])] + [(v.split(":", 1)[0], patches(v.split(":", 1)[1]))
                                    for v in filter(None, os.environ.get("VARIANTS", "").split(";"))]
    cases = [tuple(int(x) for x in a.split(",")) for a in sys.argv[1:]]
    cfg = model_config(None, False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    dec = Decoder(cfg, model.state_dict(), torch.device("cuda"), torch.bfloat16, max(c for _, c in cases) + 64)
    del model
    dev = torch.device("cuda")
    for b, ctx in cases:
        dense = engine(dec, "dense", b, ctx, 16, dev)["seconds"]
        res = {n: [] for n, _ in variants}
        for _ in range(2):
            for name, ps in variants:
                old = [(m, a, getattr(m, a)) for m, a, _ in ps]
                for m, a, val in ps:
                    setattr(m, a, val)
                try:
                    e = engine(dec, spec, b, ctx, 16, dev)
                    res[name].append((e["seconds"], e["density"]))
                finally:
                    for m, a, val in old:
                        setattr(m, a, val)
        for name, rs in res.items():
            ms = " / ".join(f"{s * 1e3:.3f}" for s, _ in rs)
            xs = " / ".join(f"{dense / s:.3f}x" for s, _ in rs)
            print(f"B={b} ctx={ctx} dense {dense * 1e3:.3f} ms | {name:10s} {ms} ms  {xs}  density {rs[0][1]:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
