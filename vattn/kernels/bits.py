"""Bit signatures (SimHash) of the scan pipeline, and their torch scoring.

    sign_bits(x [..., D], proj [D, 32*W]) -> int32 [..., W]   packed signs of x @ proj
    bit_scores_ref(qsig [B,Hq,T,W], ksig [B,Hkv,N,W], shared) -> int32 [B,H,T,N]
        agreement = sum over words of popcount(XNOR(q, k)); shared sums the G heads of a group
    hash_scores(q, sig, proj, lo, hi, bits) -> f32 [B,Hq,T,N]
        the agreement of each query head's signature (signed in the kernel) with each key's in
        [lo, hi), -inf elsewhere: the hashtopk-kernel path's scores (plan_select.py)

Scores are small integers (0..G*32*W): the scan kernels histogram them to cut an
approximate top-k, reading 4*W bytes per key, never K (kernels/scan.py).
"""
from __future__ import annotations

import functools

import torch

from vattn.errors import VattnError
from vattn.kernels.common import check_runnable, interpret, next_pow2


def sign_bits(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Pack the signs of x @ proj into int32 words (bit i of word w = sign of column 32*w + i)."""
    if proj.shape[-1] % 32 or proj.shape[0] != x.shape[-1]:
        raise VattnError(f"proj must be [D={x.shape[-1]}, 32*W], got {tuple(proj.shape)}")
    bits = (x.to(proj.dtype) @ proj) > 0
    W = proj.shape[-1] // 32
    bits = bits.view(*bits.shape[:-1], W, 32).to(torch.int64)
    word = (bits << torch.arange(32, device=x.device)).sum(-1)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


_M1, _M2, _M4 = 0x55555555, 0x33333333, 0x0F0F0F0F


def popcount(x: torch.Tensor) -> torch.Tensor:
    """Set bits of the low 32 bits of each int64 element (SWAR)."""
    x = x & 0xFFFFFFFF
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    x = x + (x >> 8)
    x = x + (x >> 16)
    return x & 0x3F


def bit_scores_ref(qsig, ksig, shared):
    B, Hq, T, W = qsig.shape
    Hkv = ksig.shape[1]
    G = Hq // Hkv
    x = qsig.view(B, Hkv, G, T, 1, W).long() ^ ksig.view(B, Hkv, 1, 1, -1, W).long()  # [B,Hkv,G,T,N,W]
    agree = (32 * W - popcount(x).sum(-1)).to(torch.int32)  # [B,Hkv,G,T,N]
    if shared:
        return agree.sum(2).to(torch.int32)
    return agree.reshape(B, Hq, T, -1)


def hash_scores(q, sig, proj, lo, hi, n: int, bits: int, *, shared: bool = False, sign=None, block_n: int = 512,
                num_warps: int = 4) -> torch.Tensor:
    """f32 [B, Hq, T, N]: for query head h and key n in [lo[b, t], hi[b, t]), the bits of the
    first `bits` on which the signs of q[b, h, t] @ proj and the key's signature agree
    (methods.hashing.agreement); -inf elsewhere. shared: [B, Hkv, T, N], the sum over each KV
    head's query heads. sign = (k [B, Hkv, N, D], lengths int32 [B]): also write the signature
    of each row's newest key (lengths - 1) into sig, so a decoder signs nothing per layer and
    step; that key must not be ranked in this call (it lies in the window: hi <= lengths - 1).
    q [B, Hq, T, D]; sig int32 [B, Hkv, >= N, W]
    (contiguous; its length >= n is the row stride: a plan's buffer with room to grow), N = n
    (a host number, the key buffer's length); lo, hi int [B, T]; proj f32 [D, 32 W]
    (columns past `bits` zero: their bits are 0 in both signatures and are taken off)."""
    if q.dim() != 4 or sig.dim() != 4 or sig.dtype != torch.int32 or not sig.is_contiguous():
        raise VattnError(f"q must be [B, Hq, T, D] and sig a contiguous int32 [B, Hkv, N, W], got "
                         f"{tuple(q.shape)} and {tuple(sig.shape)} {sig.dtype}")
    b, hq, t, d = q.shape
    hkv, cap, w = sig.shape[1:]
    if sig.shape[0] != b or hkv == 0 or hq % hkv or tuple(proj.shape) != (d, 32 * w) or not 0 < bits <= 32 * w \
            or cap < n:
        raise VattnError(f"sig {tuple(sig.shape)} / proj {tuple(proj.shape)} / bits {bits} do not match q "
                         f"{tuple(q.shape)}: want sig [B, Hkv, >= {n}, W], proj [D, 32 W], bits <= 32 W")
    if d & (d - 1) or q.stride(-1) != 1:
        raise VattnError(f"q needs a power-of-two head dim with stride 1, got {tuple(q.shape)} {q.stride()}")
    check_runnable(q, sig, proj)
    k, lengths = sign if sign is not None else (q, lo)
    if sign is not None and (k.shape[:2] != sig.shape[:2] or k.shape[3] != d or k.stride(-1) != 1
                             or tuple(lengths.shape) != (b,)):
        raise VattnError(f"sign needs k [B, Hkv, N, D] with stride 1 in D and lengths [B], got {tuple(k.shape)} "
                         f"and {tuple(lengths.shape)}")
    out = torch.empty((b, hkv if shared else hq, t, n), dtype=torch.float32, device=q.device)
    if out.numel():
        _kernel()[(b * hkv, t, -(-n // block_n))](
            q, sig, proj.contiguous().float(), out, lo.contiguous(), hi.contiguous(), q.stride(0), q.stride(1),
            q.stride(2), hq, hkv, t, n, cap, 32 * w - bits, k, k.stride(0), k.stride(1), k.stride(2), lengths,
            G=hq // hkv, W=w, WP=next_pow2(w), D=d, BN=block_n, SHARED=shared, UPD=sign is not None,
            HW=not interpret(), num_warps=num_warps)
    return out


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    from vattn.kernels import _bits_triton as bt
    # (jit bodies resolve the functions they call in the module's globals)
    globals().update(agreement=bt.agreement, key_sig=bt.key_sig, qwords=bt.qwords, sig_words=bt.sig_words)

    @triton.jit
    def scores(q, ks, proj, out, lo_p, hi_p, sqb, sqh, sqt, HQ, HKV, T, N, CAP, PAD, k, skb, skh, skn, len_p,
               G: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
               SHARED: tl.constexpr, UPD: tl.constexpr, HW: tl.constexpr):
        # program (b * HKV + kv head, query row t, block of BN keys): the block's signature words
        # once, each of the G query heads' signatures signed here (a few KB of proj from L2)
        row = tl.program_id(0)
        t = tl.program_id(1)
        b = row // HKV
        lo = tl.load(lo_p + b * T + t).to(tl.int32)
        hi = tl.load(hi_p + b * T + t).to(tl.int32)
        n = tl.program_id(2) * BN + tl.arange(0, BN)
        inr = (n >= lo) & (n < hi)
        kw = sig_words(ks, row, n, inr, CAP, W, WP)
        tot = tl.zeros([BN], tl.int32)
        for r in tl.static_range(G):
            hq = (row % HKV) * G + r
            qv = qwords(q + t * sqt, proj, b * HQ + hq, b, HQ, sqb, sqh, 1, W, D, WP)
            a = agreement(qv, kw, 1, W, WP, WP, HW) - PAD
            if SHARED:
                tot += a
            else:
                dst = out + ((b * HQ + hq) * T + t).to(tl.int64) * N
                tl.store(dst + n, tl.where(inr, a.to(tl.float32), float("-inf")), mask=n < N)
        if SHARED:
            dst = out + (row * T + t).to(tl.int64) * N
            tl.store(dst + n, tl.where(inr, tot.to(tl.float32), float("-inf")), mask=n < N)
        if UPD:
            if (tl.program_id(2) == 0) & (t == T - 1):
                ln = tl.load(len_p + b)
                if ln > 0:
                    key_sig(k, proj, ks, b, row % HKV, ln - 1, skb, skh, skn, HKV, CAP, W, D)

    return scores
