"""GPU selection pipeline for vAttention with a bit-signature (hash) top-k, no host sync.

    vattention_hash_select(q, k, ksig, proj, lengths, *, sink, window, topk, cap, m0, eps,
                           delta, seed) -> Selection (shared: H = Hkv)

Row layout (fixed width KT = sink + window + topk + cap; count is exact):
    [sink keys | window keys | hash top-k of the middle | verified sample of the residual | -1]
The top-k reads only the key signatures (ksig [B,Hkv,N,W], written once per token when the
cache is filled); the sample is a keyed permutation prefix that skips top-k keys; the budget
comes from the pilot's exact scores (kernels.sample.budget_emit; the exact set F in D_hat is
sink + window only: leaving the top-k mass out makes D_hat smaller and the budget larger). Assumes every row has
length >= sink + window (shorter rows should use dense attention).

    vattention_hash_decode(q, k, v, ksig, proj, lengths, ...) -> out [B,Hq,1,D] (selection + attention)

The same row, attended in two split-KV passes so that D_hat includes the exact mass of every
fixed key (sinks, window and top-k), as the CPU reference does, at no extra bytes: pass 1
attends [sink | window | top-k] (its partial log-sum-exps are D_F), the budget kernel reads
them (and draws the sample, uncapped, in the same kernel), pass 2 attends [pilot | extension],
one merge combines both. 7 device ops.

Both take weights="pooled" (default: every sample key n_r / (m + ext), the budget sizing the
whole sample) or "two-phase" (pilot 1, extension (n_r - m) / ext), and var_conf (default -1:
the pilot variance is raised to its upper confidence bound at 1 - delta/2; 0: plug-in), as
methods/sampling.Verified.
"""
from __future__ import annotations

import torch

from vattn.errors import VattnError
from vattn.kernels._common import check_runnable
from vattn.kernels.bits import check_sig_inputs, topk_launch
from vattn.kernels.sample import budget_emit, check_weights, perm_sample, sample_budget
from vattn.kernels.sparse import launch_split, plan_splits
from vattn.kernels._common import merge_partials
from vattn.selection import Selection


def fixed_indices(lengths, B, Hkv, T, sink, window):
    """int32 [B,Hkv,T,sink+window]: the first `sink` and the last `window` keys of each row."""
    dev = lengths.device
    s = torch.arange(sink, device=dev, dtype=torch.int32).view(1, sink).expand(B, sink)
    w = lengths.view(B, 1) - window + torch.arange(window, device=dev, dtype=torch.int32).view(1, window)
    idx = torch.cat([s, w.to(torch.int32)], 1)
    return idx.view(B, 1, 1, -1).expand(B, Hkv, T, sink + window)


def vattention_hash_select(q, k, ksig, proj, lengths, *, sink=128, window=128, topk=4096,
                           cap=4096, m0=128, eps=0.05, delta=0.05, seed=0, scale=None, stats=False,
                           block_n=1024, weights="pooled", var_conf=-1.0):
    """Selection (shared, exact count) in 5 device ops: zero fill, histogram pass (query
    signature fused), emit pass (threshold from the histogram, top-k written in place),
    permutation sample, budget + assembly. With stats=True also returns f32 [B*Hkv, 4]
    (pilot m, extension ext, residual n_r, raw extension)."""
    B, Hq, T, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    check_sig_inputs("vattention_hash_select", q, k, ksig, proj)
    check_weights(weights)
    if lengths is None:
        lengths = torch.full((B,), N, dtype=torch.int32, device=q.device)
    check_runnable(q, k, ksig, lengths)
    hi = (lengths - window).to(torch.int32)
    rows = B * Hkv
    KT = sink + window + topk + cap
    idx = torch.empty((B, Hkv, T, KT), dtype=torch.int32, device=q.device)
    lw = torch.empty((B, Hkv, T, KT), dtype=torch.float32, device=q.device)
    top_n, member, thr = topk_launch(q, None, proj.float().contiguous(), ksig.contiguous(), hi, topk, sink,
                                     idx, sink + window, KT, shared=True, block_n=block_n, lw=lw)
    member = (member > thr.view(-1, 1)).to(torch.uint8)  # 0/1 for perm_sample
    s_idx, s_acc = perm_sample(member.view(B, Hkv, T, N), sink, hi, cap, seed)
    count, st = budget_emit(q, k, lengths, top_n, s_idx, s_acc, idx, lw, sink=sink, window=window,
                            m0=m0, eps=eps, delta=delta, scale=scale, weights=weights, var_conf=var_conf)
    sel = Selection(idx, lw, count.view(B, Hkv, T), shared=True)
    return (sel, st) if stats else sel


def attended(sel: Selection) -> torch.Tensor:
    """Keys actually attended per row (valid index and finite weight)."""
    ok = sel.valid() & (sel.indices >= 0) & torch.isfinite(sel.log_weights)
    return ok.sum(-1)


def decode_plan(rows, device=None):
    """Programs per row of the two attention passes: about two per SM in all for pass 1 and
    sixteen for pass 2, at most 132 per row (its ~3K random keys per row need many loads in
    flight: 74 -> 50 us at B=8 128K); each program takes an equal share of its row's live slots
    (chunks computed in-kernel)."""
    from vattn.kernels._common import target_programs
    tp = target_programs(device or torch.device("cuda"))
    return max(1, -(-tp // rows)), max(1, min(-(-8 * tp // rows), tp // 2))


def vattention_hash_decode(q, k, v, ksig, proj, lengths, *, sink=128, window=128, topk=4096, m0=128,
                           eps=0.05, delta=0.05, seed=0, scale=None, stats=False, selection=False,
                           block_n=1024, attn_block=64, cap=None, sample_kw=None, fuse_merge=False, weights="pooled",
                           var_conf=-1.0):
    """Selection + sparse attention (see module docstring). Returns out [B,Hq,1,D]; with
    selection=True also the Selection (rows padded with -1 to sink + window + topk + N - sink),
    with stats=True also f32 [B*Hkv, 4] (pilot m, extension ext, residual n_r, raw extension).
    The sample has no slot cap (cap is accepted and ignored): ext equals the verified budget."""
    B, Hq, T, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    check_sig_inputs("vattention_hash_decode", q, k, ksig, proj)
    check_weights(weights)
    if v.shape != k.shape or v.dtype != k.dtype or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise VattnError(f"k and v must match with last-dim stride 1, got {tuple(k.shape)} {tuple(v.shape)}")
    if lengths is None:
        lengths = torch.full((B,), N, dtype=torch.int32, device=q.device)
    check_runnable(q, k, v, ksig, lengths)
    hi = (lengths - window).to(torch.int32)
    rows = B * Hkv
    F0 = sink + window
    KT = F0 + topk + max(N - sink, 1)
    scale = D ** -0.5 if scale is None else float(scale)
    idx = torch.empty((B, Hkv, T, KT), dtype=torch.int32, device=q.device)
    lw = torch.empty((B, Hkv, T, KT), dtype=torch.float32, device=q.device)
    top_n, member, thr = topk_launch(q, None, proj.float().contiguous(), ksig.contiguous(), hi, topk, sink,
                                     idx, F0, KT, shared=True, block_n=block_n, fixed=True)
    if selection:  # pass 1 does not read the exact slots' weights; a returned Selection holds them
        lw[..., :F0 + topk] = 0.0
    s1, s2 = decode_plan(rows, q.device)
    po = torch.empty((B, Hq, T, s1 + s2, D), dtype=torch.float32, device=q.device)
    plse = torch.empty((B, Hq, T, s1 + s2), dtype=torch.float32, device=q.device)
    launch_split(q, k, v, idx, lw, top_n, po, plse, True, scale, 0, s1, mode=1, tcnt=top_n, off=F0,
                 block_n=attn_block, dyn=True)
    count, st = sample_budget(q, k, lengths, top_n, member, idx, lw, plse, s1, sink=sink, window=window, m0=m0,
                              eps=eps, delta=delta, seed=seed, scale=scale, pad=selection, thr=thr,
                              weights=weights, var_conf=var_conf, **(sample_kw or {}))
    out = torch.empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    if fuse_merge:  # the last pass-2 program of each row merges pass-1 and pass-2 partials
        launch_split(q, k, v, idx, lw, count, po, plse, True, scale, 0, s2, mode=2, tcnt=top_n, off=F0,
                     s_off=s1, block_n=attn_block, dyn=True, out=out)
    else:
        launch_split(q, k, v, idx, lw, count, po, plse, True, scale, 0, s2, mode=2, tcnt=top_n, off=F0,
                     s_off=s1, block_n=attn_block, dyn=True)
        merge_partials(po, plse, out)
    res = (out,)
    if selection:
        res += (Selection(idx, lw, count.view(B, Hkv, T), shared=True),)
    if stats:
        res += (st,)
    return res if len(res) > 1 else out
