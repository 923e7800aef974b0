"""Bit-signature (SimHash) scoring and an exact top-k by histogram threshold.

    sign_bits(x [..., D], proj [D, 32*W]) -> int32 [..., W]   packed signs of x @ proj
    bit_scores_ref(qsig [B,Hq,T,W], ksig [B,Hkv,N,W], shared) -> int32 [B,H,T,N]
        agreement = sum over words of popcount(XNOR(q, k)); shared sums the G heads of a group
    bit_topk(qsig, ksig, k, lo, hi, shared) -> (indices int32 [B,H,T,k], count int32 [B,H,T],
                                               member uint8 [B,H,T,N])
        the k keys in [lo, hi[b]) with the largest agreement; -1 padding when fewer exist.

Scores are small integers (0..R*32*W), so top-k is a histogram + threshold: one pass builds
per-row histograms, a few tiny torch ops find the threshold bin, a second pass writes the
winners (block prefix sums + one atomic per block). It reads 4*W bytes per key, never K.
Ties at the threshold are taken in arbitrary order; no host synchronisation anywhere.
"""
from __future__ import annotations

import torch

from vattn.errors import VattnError
from vattn.kernels._common import check_runnable, next_pow2


def sign_bits(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Pack the signs of x @ proj into int32 words (bit i of word w = sign of column 32*w + i)."""
    if proj.shape[-1] % 32 or proj.shape[0] != x.shape[-1]:
        raise VattnError(f"proj must be [D={x.shape[-1]}, 32*W], got {tuple(proj.shape)}")
    bits = (x.to(proj.dtype) @ proj) > 0
    W = proj.shape[-1] // 32
    bits = bits.view(*bits.shape[:-1], W, 32).to(torch.int64)
    word = (bits << torch.arange(32, device=x.device)).sum(-1)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def bit_scores_ref(qsig, ksig, shared):
    B, Hq, T, W = qsig.shape
    Hkv = ksig.shape[1]
    G = Hq // Hkv
    x = qsig.view(B, Hkv, G, T, 1, W) ^ ksig.view(B, Hkv, 1, 1, -1, W)  # [B,Hkv,G,T,N,W]
    x = x.to(torch.int64) & 0xFFFFFFFF
    pc = torch.zeros_like(x)
    for i in range(32):
        pc += (x >> i) & 1
    agree = (32 * W - pc.sum(-1)).to(torch.int32)  # [B,Hkv,G,T,N]
    if shared:
        return agree.sum(2).to(torch.int32)
    return agree.reshape(B, Hq, T, -1)


def bit_topk_ref(qsig, ksig, k, lo, hi, shared):
    """Reference: scores, then torch.topk over [lo, hi[b]). Returns (indices, count)."""
    s = bit_scores_ref(qsig, ksig, shared).float()
    N = s.shape[-1]
    n = torch.arange(N, device=s.device)
    inr = (n >= lo) & (n.view(1, -1) < hi.view(-1, 1).long())  # [B, N]
    s = s.masked_fill(~inr[:, None, None], float("-inf"))
    val, idx = torch.topk(s, min(k, N), dim=-1)
    idx = torch.where(val > float("-inf"), idx, -1).to(torch.int32)
    return idx, (idx >= 0).sum(-1).to(torch.int32)


def _kernels():
    from vattn.kernels import _bits_triton as kt  # triton imported only here (GPU / interpreter)
    return kt.hist_kernel, kt.compact_kernel


def _check(qsig, ksig, k, hi, shared):
    if qsig.dim() != 4 or ksig.dim() != 4 or qsig.shape[-1] != ksig.shape[-1] or qsig.shape[0] != ksig.shape[0]:
        raise VattnError(f"qsig must be [B,Hq,T,W] and ksig [B,Hkv,N,W] with the same B and W, "
                         f"got {tuple(qsig.shape)} and {tuple(ksig.shape)}")
    if qsig.dtype != torch.int32 or ksig.dtype != torch.int32:
        raise VattnError(f"signatures must be int32 (use sign_bits), got {qsig.dtype} and {ksig.dtype}")
    if qsig.shape[1] % ksig.shape[1]:
        raise VattnError(f"query heads {qsig.shape[1]} must be a multiple of KV heads {ksig.shape[1]}")
    if hi.dtype != torch.int32 or hi.shape != (qsig.shape[0],):
        raise VattnError(f"hi must be int32 [B={qsig.shape[0]}], got {hi.dtype} {tuple(hi.shape)}")
    if k < 1:
        raise VattnError(f"k must be >= 1, got {k}")


def bit_topk(qsig, ksig, k: int, lo: int, hi: torch.Tensor, shared: bool, *, block_n=1024):
    """Top-k keys by bit agreement in [lo, hi[b]) (see module docstring)."""
    _check(qsig, ksig, k, hi, shared)
    check_runnable(qsig, ksig, hi)
    hist_kernel, compact_kernel = _kernels()
    qsig, ksig = qsig.contiguous(), ksig.contiguous()
    B, Hq, T, W = qsig.shape
    Hkv, N = ksig.shape[1], ksig.shape[2]
    G = Hq // Hkv
    H, R = (Hkv, G) if shared else (Hq, 1)
    rows = B * H * T
    NB = next_pow2(R * 32 * W + 1)
    dev = qsig.device
    grid = (rows, triton_cdiv(N, block_n))
    hist = torch.zeros((rows, NB), dtype=torch.int32, device=dev)
    hist_kernel[grid](qsig, ksig, hi, hist, lo, H, Hkv, T, N, G=G, R=R, W=W, NB=NB, BN=block_n)
    # ge[v] = #keys with score >= v; threshold = largest v with ge[v] >= k (0 if too few keys)
    ge = hist.flip(-1).cumsum(-1).flip(-1)
    thr = ((ge >= k).sum(-1) - 1).clamp(min=0).to(torch.int32)
    ngt = torch.cat([ge[:, 1:], torch.zeros_like(ge[:, :1])], -1).gather(1, thr.long()[:, None])[:, 0]
    need = (k - ngt).to(torch.int32)
    ngt = ngt.to(torch.int32)
    ctr = torch.zeros((rows, 2), dtype=torch.int32, device=dev)
    out = torch.full((rows, k), -1, dtype=torch.int32, device=dev)
    member = torch.empty((rows, N), dtype=torch.uint8, device=dev)
    compact_kernel[grid](qsig, ksig, hi, thr, ngt, need, ctr, out, member, lo, H, Hkv, T, N, k,
                         G=G, R=R, W=W, BN=block_n)
    count = torch.minimum(ge[:, 0], torch.full_like(ge[:, 0], k)).to(torch.int32)
    return out.view(B, H, T, k), count.view(B, H, T), member.view(B, H, T, N)


def triton_cdiv(a, b):
    return (a + b - 1) // b
