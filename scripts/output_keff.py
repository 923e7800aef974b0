"""The scan twin's output mode with its chi-square(1) quantile (k = 1, what the kernels run)
against the Satterthwaite effective dimension from the pilot's Gram (methods.sampling's k_eff),
and denominator mode, on Llama-shaped rows (attn_core.peaked_sets; unit-normal with a value
mean): coverage of ||o_hat - o|| <= eps ||o|| and density, 128-bit front, top-k 10%. CPU.

    .venv/bin/python scripts/output_keff.py [N=16384] [seeds=6]"""
import math
import sys
import time

import torch
import vattn.kernels.scan as sc
from vattn.bench.attn_core import peaked_sets
from vattn.kernels.bits import sign_bits
from vattn.stats import chi2_quantile

orig = sc._output_b0_ref
DELTA = {}  # the running delta, and the k_eff seen


def keff_b0(xp, vp, num, dh, n_mid, m, zq, eps, infl):
    oh = (num + n_mid * (xp @ vp) / max(m, 1)) / dh[:, None]
    y = xp[:, :, None] * (vp[None] - oh[:, None, :])
    yc = y - y.mean(1, keepdim=True)
    gram = yc @ yc.transpose(1, 2)  # [G, m, m]
    tr = gram.diagonal(dim1=1, dim2=2).sum(1)
    k = (tr * tr / (gram * gram).sum((1, 2)).clamp(min=1e-300)).clamp(min=1.0)
    qk = chi2_quantile(k.float(), 1 - DELTA["d"] / 2).double() / k
    trs = tr / max(m - 1, 1) * infl
    sd = n_mid * torch.sqrt(trs / max(m, 1)) / dh
    olow = (oh.norm(dim=1) - math.sqrt(zq) * sd).clamp(min=0)
    DELTA.setdefault("k", []).append(k)
    return qk * n_mid ** 2 * trs / (eps ** 2 * dh ** 2 * olow ** 2)


def run(kind, N, eps, seeds, variant):
    sc._output_b0_ref = keff_b0 if variant == "keff" else orig
    DELTA["d"] = eps
    DELTA["k"] = []
    cov, dens = [], []
    for s in range(seeds):
        g = torch.Generator().manual_seed(100 + s)
        if kind == "peaked":
            (q, k, v), = peaked_sets(1, 8, N, 1, torch.float32, g, device="cpu")
        else:
            q = torch.randn(1, 32, 1, 128, generator=g); k = torch.randn(1, 8, N, 128, generator=g)
            v = torch.randn(1, 8, N, 128, generator=g) + 0.5 * torch.randn(1, 8, 1, 128, generator=g)
        proj = torch.randn(128, 128, generator=g)
        ks = sign_bits(k, proj)
        out, info = sc.scan_decode_ref(q, k, v, ks, proj, sink=128, window=128, topk=int(0.1 * N), m0=128,
                                       eps=eps, delta=eps, seed=s, mode="denominator" if variant == "den" else "output")
        ref = torch.softmax((q.double() @ k.double().repeat_interleave(4, 1).transpose(-1, -2)) / math.sqrt(128), -1) \
            @ v.double().repeat_interleave(4, 1)
        err = (out - ref).norm(dim=-1) / ref.norm(dim=-1)
        cov.append((err <= eps).float().flatten())
        dens.append(((info["exact_keys"] + info["sample_keys"]).double() / N).mean())
    kmed = f"{torch.cat(DELTA['k']).median().item():.1f}" if DELTA["k"] else "-"
    return torch.cat(cov).mean().item(), torch.stack(dens).mean().item(), kmed

N = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
for kind in ("peaked", "vmean"):
    for eps in (0.05, 0.1, 0.2):
        for variant in ("den", "k1", "keff"):
            t = time.time()
            c, d, kmed = run(kind, N, eps, seeds, variant)
            print(f"{kind:6s} N={N} eps=delta={eps}: {variant:4s} coverage {c:.3f} (target {1 - eps:.2f}) "
                  f"density {d:.3f} k_eff median {kmed}  ({time.time() - t:.0f}s)", flush=True)
