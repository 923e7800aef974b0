"""Paged decode attention (the PagedAttention baseline the vmem cache is compared with).

    q            [B, Hq, D]                 one decode query per batch row
    k_pages      [num_blocks, Hkv, BS, D]   pool of blocks; a block holds BS tokens of one head contiguously
    v_pages      [num_blocks, Hkv, BS, D]
    block_table  int32 [B, max_blocks]      block ids of each row, in token order
    lengths      int32 [B]                  valid tokens per row
    returns      [B, Hq, D] in q.dtype; softmax accumulated in float32

Grid (B * Hkv, splits): one program per (batch row, KV head, split) walks its slice of the
block table, holds the G query heads of the GQA group in the M dim of tl.dot, and writes a
partial output + log-sum-exp; `merge_partials` combines the splits.
"""
from __future__ import annotations

import functools
import math

import torch

from vattn.errors import VattnError
from vattn.kernels.common import (load_online, LOG2E, check_dtype, check_runnable, merge_partials, next_pow2,
                                  target_programs, use_ieee)


def paged_decode_ref(q, k_pages, v_pages, block_table, lengths, scale=None):
    """Torch reference: gather the blocks into [B, Hkv, max_blocks*BS, D], then masked softmax in float32."""
    B, Hq, D = q.shape
    Hkv, BS = k_pages.shape[1], k_pages.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    bt = block_table.long()
    k = k_pages[bt].permute(0, 2, 1, 3, 4).reshape(B, Hkv, -1, D).float().repeat_interleave(G, 1)
    v = v_pages[bt].permute(0, 2, 1, 3, 4).reshape(B, Hkv, -1, D).float().repeat_interleave(G, 1)
    s = torch.einsum("bhd,bhnd->bhn", q.float(), k) * scale
    n = torch.arange(k.shape[2], device=q.device)
    s = s.masked_fill(n[None, None] >= lengths.view(B, 1, 1).long(), float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhn,bhnd->bhd", p, v).to(q.dtype)


def to_paged(k, v, lengths, block_size=16, num_blocks=None, generator=None):
    """Copy contiguous k, v [B, Hkv, N, D] into a shuffled block pool (for tests and benchmarks).

    Returns k_pages, v_pages [num_blocks, Hkv, BS, D] and block_table int32 [B, ceil(N / BS)]
    (entries past a row's length point at block 0 and are never read).
    """
    B, H, N, D = k.shape
    nb = -(-N // block_size)
    need = [-(-int(n) // block_size) for n in lengths.tolist()]
    total = num_blocks or max(1, sum(need))
    if total < sum(need):
        raise VattnError(f"num_blocks={total} is fewer than the {sum(need)} blocks the lengths need")
    perm = torch.randperm(total, generator=generator).to(k.device)
    kp = k.new_zeros((total, H, block_size, D))
    vp = v.new_zeros((total, H, block_size, D))
    table = torch.zeros((B, nb), dtype=torch.int32, device=k.device)
    used = 0
    for b in range(B):
        ids = perm[used:used + need[b]]
        used += need[b]
        table[b, :need[b]] = ids.int()
        pad = need[b] * block_size
        kb = torch.zeros((H, pad, D), dtype=k.dtype, device=k.device)
        vb = torch.zeros_like(kb)
        n = int(lengths[b])
        kb[:, :n], vb[:, :n] = k[b, :, :n], v[b, :, :n]
        kp[ids] = kb.view(H, need[b], block_size, D).transpose(0, 1)
        vp[ids] = vb.view(H, need[b], block_size, D).transpose(0, 1)
    return kp, vp, table


@functools.lru_cache(maxsize=None)
def _paged_kernel():
    import triton
    import triton.language as tl

    load_online(globals())

    @triton.jit
    def paged(q, kp, vp, table, lens, po, plse,
              sqb, sqh, skb, skh, skt, svb, svh, svt, stb,
              HKV, S, chunk, scale_log2,
              G: tl.constexpr, M: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
              BN: tl.constexpr, IEEE: tl.constexpr):
        pid = tl.program_id(0)
        sp = tl.program_id(1)
        b = pid // HKV
        j = pid % HKV
        rows = tl.arange(0, M)
        row_ok = rows < G
        d = tl.arange(0, D)
        b64 = b.to(tl.int64)
        qq = tl.load(q + b64 * sqb + (j * G + rows)[:, None].to(tl.int64) * sqh + d[None, :],
                     mask=row_ok[:, None], other=0.0)
        L = tl.load(lens + b)
        start = sp * chunk
        end = tl.minimum(start + chunk, L)
        m_i, l_i, acc = online_init(M, D)
        for n0 in range(start, end, BN):
            n = n0 + tl.arange(0, BN)
            nm = n < end
            # Indirection: token n lives in block table[b, n // BS] at row n % BS.
            blk = tl.load(table + b64 * stb + n // BS, mask=nm, other=0).to(tl.int64)
            t = (n % BS).to(tl.int64)
            kk = tl.load(kp + (blk * skb + j * skh + t * skt)[:, None] + d[None, :], mask=nm[:, None], other=0.0)
            vv = tl.load(vp + (blk * svb + j * svh + t * svt)[:, None] + d[None, :], mask=nm[:, None], other=0.0)
            s = dot_qk(qq, kk, IEEE)
            s = tl.where(nm[None, :], s * scale_log2, float("-inf"))
            m_i, l_i, acc = online_step(s, vv, m_i, l_i, acc, IEEE)
        o, lse = finish(acc, m_i, l_i)
        r = b64 * HKV * G + j * G + rows  # partials [B, Hq, S, D]
        tl.store(po + (r[:, None] * S + sp) * D + d[None, :], o, mask=row_ok[:, None])
        tl.store(plse + r * S + sp, lse, mask=row_ok)

    return paged


def _check(q, k_pages, v_pages, block_table, lengths):
    if q.dim() != 3 or k_pages.dim() != 4 or k_pages.shape != v_pages.shape:
        raise VattnError(f"want q [B, Hq, D] and k/v pages [blocks, Hkv, BS, D] of one shape; got "
                         f"{tuple(q.shape)}, {tuple(k_pages.shape)}, {tuple(v_pages.shape)}")
    for name, t in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        check_dtype(name, t, (torch.float16, torch.bfloat16, torch.float32))
        if t.stride(-1) != 1:
            raise VattnError(f"{name} needs last-dim stride 1; call .contiguous()")
    B, Hq, D = q.shape
    if q.dtype != k_pages.dtype or k_pages.dtype != v_pages.dtype:
        raise VattnError(f"q, k_pages, v_pages must share a dtype, got {q.dtype}, {k_pages.dtype}, {v_pages.dtype}")
    if k_pages.shape[3] != D or Hq % k_pages.shape[1]:
        raise VattnError(f"pages {tuple(k_pages.shape)} do not fit q {tuple(q.shape)} (head dim, GQA group)")
    if D not in (16, 32, 64, 128, 256):
        raise VattnError(f"head dim must be a power of two in 16..256, got {D}")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B:
        raise VattnError(f"block_table must be int32 [B={B}, max_blocks], got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    if lengths.dtype != torch.int32 or lengths.shape != (B,):
        raise VattnError(f"lengths must be int32 [B={B}], got {lengths.dtype} {tuple(lengths.shape)}")


def paged_decode(q, k_pages, v_pages, block_table, lengths, scale=None, *, block_n=64, num_warps=4,
                 num_stages=3, splits=None):
    """Paged decode attention (see module docstring). Returns [B, Hq, D] in q.dtype."""
    _check(q, k_pages, v_pages, block_table, lengths)
    check_runnable(q, k_pages, v_pages, block_table, lengths)
    B, Hq, D = q.shape
    Hkv, BS = k_pages.shape[1], k_pages.shape[2]
    if block_n % BS:
        block_n = BS * max(1, block_n // BS)
    G = Hq // Hkv
    N = block_table.shape[1] * BS  # longest row the table can describe
    scale = D ** -0.5 if scale is None else float(scale)
    if splits is None:
        splits = max(1, min(math.ceil(target_programs(q.device) / (B * Hkv)), math.ceil(N / block_n)))
    chunk = math.ceil(math.ceil(N / splits) / block_n) * block_n
    S = math.ceil(N / chunk)
    po = torch.empty((B, Hq, S, D), dtype=torch.float32, device=q.device)
    plse = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
    _paged_kernel()[(B * Hkv, S)](
        q, k_pages, v_pages, block_table, lengths, po, plse,
        q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2), block_table.stride(0),
        Hkv, S, chunk, scale * LOG2E,
        G=G, M=max(16, next_pow2(G)), D=D, BS=BS, BN=block_n, IEEE=use_ieee(q.dtype),
        num_warps=num_warps, num_stages=num_stages)
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    return merge_partials(po, plse, out)
