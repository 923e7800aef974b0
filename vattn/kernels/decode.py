"""Dense decode attention: split-KV Triton kernel + torch reference.

    q        [B, Hq, T, D]   T <= 8 query rows (T > 1 is causal: row t sees keys < L - T + 1 + t)
    k, v     [B, Hkv, N, D]  any strides with last-dim stride 1 (views into a bigger cache work)
    lengths  int32 [B]       valid keys per batch row (None = N)
    returns  [B, Hq, T, D]   in q.dtype; softmax accumulated in float32

Design (RESEARCH.md section 4): grid (B * Hkv, splits). One program holds the G query heads
of a GQA group times the T rows in the M dim of tl.dot, walks its slice of keys with an
online softmax, and writes a partial output plus its log-sum-exp; a second kernel merges.
"""
from __future__ import annotations

import functools
import math

import torch

from vattn.errors import VattnError
from vattn.kernels.common import (check_4d, load_online, LOG2E, check_runnable, merge_partials,
                                  next_pow2, use_ieee, resolve_pdl, sm_count)

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def dense_decode_ref(q, k, v, lengths=None, scale=None):
    """Torch reference (float32 math), same contract as dense_decode."""
    B, Hq, T, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    if lengths is None:
        lengths = torch.full((B,), N, dtype=torch.int32, device=q.device)
    kf = k.float().repeat_interleave(G, dim=1)
    vf = v.float().repeat_interleave(G, dim=1)
    s = torch.einsum("bhtd,bhnd->bhtn", q.float(), kf) * scale
    n = torch.arange(N, device=q.device)
    lim = lengths.view(B, 1, 1).long() - T + 1 + torch.arange(T, device=q.device).view(1, T, 1)
    mask = n.view(1, 1, N) < lim  # [B, T, N]
    s = s.masked_fill(~mask[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhtn,bhnd->bhtd", p, vf).to(q.dtype)


@functools.lru_cache(maxsize=None)
def _split_kernel():
    import triton
    import triton.language as tl

    load_online(globals())

    @triton.jit
    def split(q, k, v, lens, po, plse,
              sqb, sqh, sqt, skb, skh, skn, svb, svh, svn,
              HKV, S, chunk, scale_log2,
              G: tl.constexpr, T: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
              BN: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = 0):
        pdl_wait(PDL)  # q may come from the previous launch; the merge may start scheduling now
        pid = tl.program_id(0)
        sp = tl.program_id(1)
        b = pid // HKV
        j = pid % HKV
        rows = tl.arange(0, M)
        g = rows // T
        t = rows % T
        row_ok = rows < G * T
        d = tl.arange(0, D)
        b64 = b.to(tl.int64)
        qp = q + b64 * sqb + (j * G + g)[:, None].to(tl.int64) * sqh + t[:, None] * sqt + d[None, :]
        qq = tl.load(qp, mask=row_ok[:, None], other=0.0)
        L = tl.load(lens + b)
        lim = L - T + 1 + t  # causal limit per row
        start = sp * chunk
        end = tl.minimum(start + chunk, L)
        kb = k + b64 * skb + j.to(tl.int64) * skh
        vb = v + b64 * svb + j.to(tl.int64) * svh
        m_i, l_i, acc = online_init(M, D)
        for n0 in range(start, end, BN):
            n = n0 + tl.arange(0, BN)
            nm = n < end
            kk = tl.load(kb + n[:, None].to(tl.int64) * skn + d[None, :], mask=nm[:, None], other=0.0)
            vv = tl.load(vb + n[:, None].to(tl.int64) * svn + d[None, :], mask=nm[:, None], other=0.0)
            s = dot_qk(qq, kk, IEEE)
            s = tl.where(n[None, :] < lim[:, None], s * scale_log2, float("-inf"))
            m_i, l_i, acc = online_step(s, vv, m_i, l_i, acc, IEEE)
        o, lse = finish(acc, m_i, l_i)
        # partial layout [B, Hq, T, S, D]: row (b, h = j*G + g, t)
        r = (b64 * HKV * G + j * G + g) * T + t
        tl.store(po + (r[:, None] * S + sp) * D + d[None, :], o, mask=row_ok[:, None])
        tl.store(plse + r * S + sp, lse, mask=row_ok)

    return split


def _check(q, k, v, lengths):
    check_4d({"q": q, "k": k, "v": v}, FLOATS)
    B, Hq, T, D = q.shape
    if k.shape != v.shape:
        raise VattnError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise VattnError(f"k [B, Hkv, N, D] = {tuple(k.shape)} does not match q [B, Hq, T, D] = {tuple(q.shape)}")
    if Hq % k.shape[1]:
        raise VattnError(f"query heads ({Hq}) must be a multiple of KV heads ({k.shape[1]})")
    if not 1 <= T <= 8:
        raise VattnError(f"dense_decode takes 1 to 8 query rows, got T={T}; use prefill attention for more")
    if D not in (16, 32, 64, 128, 256):
        raise VattnError(f"head dim must be a power of two in 16..256, got {D}")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise VattnError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if lengths is not None:
        if lengths.shape != (B,) or lengths.dtype != torch.int32:
            raise VattnError(f"lengths must be int32 [B={B}], got {lengths.dtype} {tuple(lengths.shape)}")
        if lengths.device != q.device:
            raise VattnError(f"lengths is on {lengths.device}, q on {q.device}: put them on one device")


def plan_splits(programs: int, n: int, bn: int, device) -> tuple[int, int]:
    """(splits, chunk): one program per SM in all (as many splits as fit), each chunk a multiple
    of bn. H100 128K, round 12: B=1 16 splits 182.5 us against 183.3 at 33 (two per SM), B=8 2
    splits 1382.5 against 1404.2 at 5; fewer programs than SMs, or uneven ones, cost more."""
    slots = sm_count(device.index or 0) if device.type == "cuda" else 8
    want = max(1, min(slots // max(programs, 1), math.ceil(n / bn)))
    chunk = math.ceil(math.ceil(n / want) / bn) * bn
    return math.ceil(n / chunk), chunk


def dense_decode(q, k, v, lengths=None, scale=None, *, block_n=64, num_warps=4, num_stages=3, splits=None,
                 pdl=None, pick=None):
    """Dense GQA decode attention on GPU (see module docstring). Returns [B, Hq, T, D] in q.dtype.
    num_stages 3: one program per SM keeps three tiles of K and V in flight (H100 B=8 128K at 2
    splits: 1382.5 us, 4 stages 1407.6; round 12). pdl (default: on Hopper, common.use_pdl): the
    split and merge kernels launch as programmatic dependents (H100 B=1 128K: 0.995 -> 0.997-0.999 of
    SDPA; B=1 32K 1.006 -> 1.028). pick (int64 [b], rows of q): returns [b, Hq, T, D], row i the
    attention of q's row pick[i] (the merge gathers: a decoder's batch order without a copy)."""
    _check(q, k, v, lengths)
    check_runnable(q, k, v)
    B, Hq, T, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    if lengths is None:
        lengths = torch.full((B,), N, dtype=torch.int32, device=q.device)
    if splits is None:
        S, chunk = plan_splits(B * Hkv, N, block_n, q.device)
    else:
        chunk = math.ceil(math.ceil(N / splits) / block_n) * block_n
        S = math.ceil(N / chunk)
    po = torch.empty((B, Hq, T, S, D), dtype=torch.float32, device=q.device)
    plse = torch.empty((B, Hq, T, S), dtype=torch.float32, device=q.device)
    M = max(16, next_pow2(G * T))
    pdl = resolve_pdl(pdl, q.device)
    _split_kernel()[(B * Hkv, S)](
        q, k, v, lengths, po, plse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        Hkv, S, chunk, scale * LOG2E,
        G=G, T=T, M=M, D=D, BN=block_n, IEEE=use_ieee(q.dtype),
        num_warps=num_warps, num_stages=num_stages, **(dict(PDL=1, launch_pdl=True) if pdl else {}))
    out = torch.empty((B if pick is None else pick.shape[0], Hq, T, D), dtype=q.dtype, device=q.device)
    return merge_partials(po, plse, out, pdl=pdl, pick=pick)
