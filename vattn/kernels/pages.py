"""Quest page bounds: per-page key min/max and the query's upper bound on q.k per page.

    page_bounds(k [B,Hkv,N,D], lengths, page) -> (pmin, pmax) f32 [B,Hkv,P,D], P = ceil(N/page)
        (keys at or beyond lengths[b] are left out; an empty page gets min=max=0)
    quest_scores(q [B,Hq,T,D], pmin, pmax) -> f32 [B,Hq,T,P]
        U[p] = sum_i max(q_i*min_i, q_i*max_i) >= q.k for every key k of page p
Select pages before tokens: top-k over P = N/page scores is far cheaper than over N.
The bounds are built when the cache is written (torch); the scoring reads 2*P*D values.
"""
from __future__ import annotations

import torch

from vattn.errors import VattnError
from vattn.kernels._common import check_runnable, next_pow2


def page_bounds(k, lengths, page):
    B, Hkv, N, D = k.shape
    P = (N + page - 1) // page
    pad = P * page - N
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, pad))
    n = torch.arange(P * page, device=k.device)
    if lengths is None:
        lengths = torch.full((B,), N, device=k.device, dtype=torch.int32)
    ok = (n.view(1, -1) < lengths.view(-1, 1)).view(B, 1, P, page, 1)
    kf = kf.view(B, Hkv, P, page, D)
    pmin = kf.masked_fill(~ok, float("inf")).amin(3)
    pmax = kf.masked_fill(~ok, float("-inf")).amax(3)
    empty = ~ok.any(3)
    return pmin.masked_fill(empty, 0.0).contiguous(), pmax.masked_fill(empty, 0.0).contiguous()


def quest_scores_ref(q, pmin, pmax):
    G = q.shape[1] // pmin.shape[1]
    lo = pmin.repeat_interleave(G, 1)[:, :, None]  # [B,Hq,1,P,D]
    hi = pmax.repeat_interleave(G, 1)[:, :, None]
    qf = q.float()[:, :, :, None]
    return torch.maximum(qf * lo, qf * hi).sum(-1)


def quest_scores(q, pmin, pmax, *, block_p=64):
    if q.dim() != 4 or pmin.dim() != 4 or pmin.shape != pmax.shape:
        raise VattnError(f"q must be [B,Hq,T,D] and pmin/pmax [B,Hkv,P,D] alike, got {tuple(q.shape)}, "
                         f"{tuple(pmin.shape)}, {tuple(pmax.shape)}")
    B, Hq, T, D = q.shape
    if pmin.shape[0] != B or pmin.shape[3] != D or Hq % pmin.shape[1]:
        raise VattnError(f"pmin {tuple(pmin.shape)} does not match q {tuple(q.shape)}")
    if pmin.dtype != torch.float32 or pmax.dtype != torch.float32:
        raise VattnError("pmin/pmax must be float32 (use page_bounds)")
    if q.stride(-1) != 1 or D not in (16, 32, 64, 128, 256):
        raise VattnError(f"q needs last-dim stride 1 and a power-of-two head dim in 16..256, got D={D}")
    check_runnable(q, pmin, pmax)
    from vattn.kernels._pages_triton import quest_kernel
    Hkv, P = pmin.shape[1], pmin.shape[2]
    G = Hq // Hkv
    pmin, pmax = pmin.contiguous(), pmax.contiguous()
    out = torch.empty((B, Hq, T, P), dtype=torch.float32, device=q.device)
    grid = (B * Hkv, (P + block_p - 1) // block_p)
    quest_kernel[grid](q, pmin, pmax, out, Hkv, P, q.stride(0), q.stride(1), q.stride(2),
                       G=G, T=T, M=max(16, next_pow2(G * T)), D=D, BP=block_p)
    return out
