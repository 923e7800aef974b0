"""Sparse decode attention over a Selection: Triton gather kernel + torch reference.

    q            [B, Hq, T, D]
    k, v         [B, Hkv, N, D]   last-dim stride 1
    indices      int32 [B, H, T, K]  key positions, -1 padding (H = Hkv if shared else Hq)
    log_weights  f32   [B, H, T, K]
    count        int32 [B, H, T]     valid entries per row (valid entries come first)
    returns      [B, Hq, T, D] in q.dtype:
                 sum_i exp(s_i*scale + lw_i) v_i / sum_i exp(s_i*scale + lw_i)  (float32 math)

Shared selections put the G query heads of a group into the M dim of tl.dot, so one gather
of K/V rows serves G heads. Per-head selections use one row per program (M padded to 16).
Grid (rows, splits) over the K entries; partials merged by log-sum-exp like dense_decode.
"""
from __future__ import annotations

import functools
import math

import torch

from vattn.errors import VattnError
from vattn.kernels.common import (check_4d, load_online, LOG2E, check_dtype, check_runnable, merge_partials,
                                  next_pow2, target_programs, use_ieee)
from vattn.kernels.decode import FLOATS


def sparse_decode_ref(q, k, v, indices, log_weights, count, shared, scale=None, pick=None):
    """Torch reference (float32 math), same contract as sparse_decode."""
    if pick is not None:
        return sparse_decode_ref(q, k, v, indices, log_weights, count, shared, scale)[pick]
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    if shared:
        indices = indices.repeat_interleave(G, 1)
        log_weights = log_weights.repeat_interleave(G, 1)
        count = count.repeat_interleave(G, 1)
    K = indices.shape[-1]
    valid = (torch.arange(K, device=q.device) < count.unsqueeze(-1)) & (indices >= 0)
    idx = indices.clamp(min=0).long()
    kv_head = (torch.arange(Hq, device=q.device) // G).view(1, Hq, 1, 1)
    bb = torch.arange(B, device=q.device).view(B, 1, 1, 1)
    kg = k.float()[bb, kv_head, idx]  # [B, Hq, T, K, D]
    vg = v.float()[bb, kv_head, idx]
    s = torch.einsum("bhtd,bhtkd->bhtk", q.float(), kg) * scale + log_weights.float()
    s = s.masked_fill(~valid, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhtk,bhtkd->bhtd", p, vg).to(q.dtype)


@functools.lru_cache(maxsize=None)
def _split_kernel():
    import triton
    import triton.language as tl

    load_online(globals())

    @triton.jit
    def split(q, k, v, idx, lw, cnt, po, plse,
              sqb, sqh, sqt, skb, skh, skn, svb, svh, svn,
              H, HKV, T, S, ST, K, scale_log2,
              G: tl.constexpr, R: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
              BN: tl.constexpr, IEEE: tl.constexpr):
        # Program (row, sp) attends its share of slots [0, cnt[row]) of one selection row (the
        # row's count split evenly over the S programs) and writes partial column sp of ST.
        # R query heads share this program's selection row: R = G if shared else 1.
        row = tl.program_id(0)  # (b, h, t) of the selection
        sp = tl.program_id(1)
        t = row % T
        bh = row // T
        h = bh % H
        b = bh // H
        b64 = b.to(tl.int64)
        hq0 = h * R  # first query head served
        j = hq0 // G  # its KV head
        m = tl.arange(0, M)
        m_ok = m < R
        d = tl.arange(0, D)
        qq = tl.load(q + b64 * sqb + (hq0 + m)[:, None].to(tl.int64) * sqh + t * sqt + d[None, :],
                     mask=m_ok[:, None], other=0.0)
        c = tl.load(cnt + row)
        chunk = tl.cdiv(tl.cdiv(c, S), BN) * BN
        start = sp * chunk
        end = tl.minimum(start + chunk, c)
        kb = k + b64 * skb + j.to(tl.int64) * skh
        vb = v + b64 * svb + j.to(tl.int64) * svh
        sel = row.to(tl.int64) * K
        m_i, l_i, acc = online_init(M, D)
        n = start + tl.arange(0, BN)
        ix_nx = tl.load(idx + sel + n, mask=n < end, other=-1)
        w_nx = tl.load(lw + sel + n, mask=n < end, other=0.0)
        for n0 in range(start, end, BN):
            # this block's indices and weights were loaded one iteration ahead: the gathers below
            # wait for one memory round trip, not two
            n = n0 + BN + tl.arange(0, BN)
            ix, w = ix_nx, w_nx * 1.4426950408889634
            ix_nx = tl.load(idx + sel + n, mask=n < end, other=-1)
            w_nx = tl.load(lw + sel + n, mask=n < end, other=0.0)
            ok = ix >= 0
            ix64 = tl.where(ok, ix, 0).to(tl.int64)
            kk = tl.load(kb + ix64[:, None] * skn + d[None, :], mask=ok[:, None], other=0.0)
            vv = tl.load(vb + ix64[:, None] * svn + d[None, :], mask=ok[:, None], other=0.0)
            s = dot_qk(qq, kk, IEEE)
            s = tl.where(ok[None, :], s * scale_log2 + w[None, :], float("-inf"))
            m_i, l_i, acc = online_step(s, vv, m_i, l_i, acc, IEEE)
        o, lse = finish(acc, m_i, l_i)
        r = ((b64 * H + h) * R + m) * T + t  # output row (b, hq, t), partials [B, Hq, T, ST, D]
        # a program that saw no key writes only lse = -inf (the merge never reads its po)
        tl.store(po + (r[:, None] * ST + sp) * D + d[None, :], o, mask=(m_ok & (l_i > 0))[:, None])
        tl.store(plse + r * ST + sp, lse, mask=m_ok)

    return split


def check_sparse_inputs(q, k, v, indices, log_weights, count, shared):
    check_4d({"q": q, "k": k, "v": v}, FLOATS)
    B, Hq, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or Hq % k.shape[1]:
        raise VattnError(f"k/v [B, Hkv, N, D] = {tuple(k.shape)}/{tuple(v.shape)} do not match q {tuple(q.shape)}")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise VattnError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if D not in (16, 32, 64, 128, 256):
        raise VattnError(f"head dim must be a power of two in 16..256, got {D}")
    H = k.shape[1] if shared else Hq
    if indices.dim() != 4 or tuple(indices.shape[:3]) != (B, H, T):
        raise VattnError(f"indices must be [B, H, T, K] with H={H} ({'KV heads, shared' if shared else 'query heads'}), "
                         f"got {tuple(indices.shape)}")
    check_dtype("indices", indices, (torch.int32,))
    check_dtype("log_weights", log_weights, (torch.float32,))
    check_dtype("count", count, (torch.int32,))
    if log_weights.shape != indices.shape or tuple(count.shape) != (B, H, T):
        raise VattnError(f"log_weights {tuple(log_weights.shape)} / count {tuple(count.shape)} must be "
                         f"{tuple(indices.shape)} / {(B, H, T)}")


def plan_splits(rows, K, block_n, device, splits=None):
    """Programs per row S: about two waves over the SMs in all (splits overrides), each over a
    whole number of block_n slots of a full row."""
    want = splits or math.ceil(target_programs(device) / rows)
    want = max(1, min(want, math.ceil(max(K, 1) / block_n)))
    chunk = math.ceil(math.ceil(max(K, 1) / want) / block_n) * block_n
    return math.ceil(max(K, 1) / chunk)


def sparse_decode(q, k, v, indices, log_weights, count, shared, scale=None, *,
                  block_n=64, num_warps=4, num_stages=3, splits=None, pick=None):
    """Sparse decode attention on GPU (see module docstring). Returns [B, Hq, T, D] in q.dtype, or
    with pick (int64 [b]) [b, Hq, T, D]: row i is q's row pick[i] (the merge gathers)."""
    check_sparse_inputs(q, k, v, indices, log_weights, count, shared)
    check_runnable(q, k, v, indices)
    B, Hq, T, D = q.shape
    H, K = indices.shape[1], indices.shape[3]
    scale = D ** -0.5 if scale is None else float(scale)
    indices, log_weights, count = indices.contiguous(), log_weights.contiguous(), count.contiguous()
    S = plan_splits(B * H * T, K, block_n, q.device, splits)
    po = torch.empty((B, Hq, T, S, D), dtype=torch.float32, device=q.device)
    plse = torch.empty((B, Hq, T, S), dtype=torch.float32, device=q.device)
    sparse_partials(q, k, v, indices, log_weights, count, shared, scale, po, plse, S, block_n, num_warps, num_stages)
    out = torch.empty((B if pick is None else pick.shape[0], Hq, T, D), dtype=q.dtype, device=q.device)
    return merge_partials(po, plse, out, pick=pick)


def sparse_partials(q, k, v, indices, log_weights, count, shared, scale, po, plse, S, block_n=64, num_warps=4,
                    num_stages=3):
    """The split launch alone: S programs per selection row write partial columns [0, S) of po
    [B, Hq, T, ST, D] / plse [B, Hq, T, ST] (ST >= S: later columns are the caller's), checked
    inputs, scale a float."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    H, K = indices.shape[1], indices.shape[3]
    R = G if shared else 1
    # programs split each row's count evenly (chunks in-kernel), so wide rows with a short count
    # (a Selection padded to its full width) keep every program busy
    _split_kernel()[(B * H * T, S)](
        q, k, v, indices, log_weights, count, po, plse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        H, Hkv, T, S, po.shape[3], K, scale * LOG2E,
        G=G, R=R, M=max(16, next_pow2(R)), D=D, BN=block_n, IEEE=use_ieee(q.dtype),
        num_warps=num_warps, num_stages=num_stages)
