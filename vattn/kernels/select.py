"""GPU selection pipeline for vAttention with a bit-signature (hash) top-k, no host sync.

    vattention_hash_select(q, k, ksig, proj, lengths, *, sink, window, topk, cap, m0, eps,
                           delta, seed) -> Selection (shared: H = Hkv)

Row layout (fixed shape, K = sink + window + topk + cap):
    [sink keys | window keys | hash top-k of the middle | verified sample of the residual]
The top-k reads only the key signatures (ksig [B,Hkv,N,W], written once per token when the
cache is filled); the sample is a keyed permutation prefix that skips top-k keys; the budget
comes from the pilot's exact scores (kernels.sample.verified_budget). Assumes every row has
length >= sink + window (shorter rows should use dense attention).
"""
from __future__ import annotations

import torch

from vattn.errors import VattnError
from vattn.kernels.bits import bit_topk, sign_bits
from vattn.kernels.sample import perm_sample, verified_budget
from vattn.selection import Selection


def fixed_indices(lengths, B, Hkv, T, sink, window):
    """int32 [B,Hkv,T,sink+window]: the first `sink` and the last `window` keys of each row."""
    dev = lengths.device
    s = torch.arange(sink, device=dev, dtype=torch.int32).view(1, sink).expand(B, sink)
    w = lengths.view(B, 1) - window + torch.arange(window, device=dev, dtype=torch.int32).view(1, window)
    idx = torch.cat([s, w.to(torch.int32)], 1)
    return idx.view(B, 1, 1, -1).expand(B, Hkv, T, sink + window)


def vattention_hash_select(q, k, ksig, proj, lengths, *, sink=128, window=128, topk=4096,
                           cap=4096, m0=128, eps=0.05, delta=0.05, seed=0, scale=None):
    B, Hq, T, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    if T != 1:
        raise VattnError(f"vattention_hash_select handles one query row (T=1), got T={T}")
    if lengths is None:
        lengths = torch.full((B,), N, dtype=torch.int32, device=q.device)
    hi = (lengths - window).to(torch.int32)
    qsig = sign_bits(q, proj)
    top, top_n, member = bit_topk(qsig, ksig, topk, sink, hi, shared=True)
    s_idx, s_acc = perm_sample(member, sink, hi, cap, seed)
    n_r = ((hi.long() - sink).view(B, 1, 1) - top_n).clamp(min=0)
    f_idx = fixed_indices(lengths, B, Hkv, T, sink, window)
    s_cnt, s_lw = verified_budget(q, k, f_idx, None, s_idx, s_acc, n_r, m0=m0, eps=eps, delta=delta,
                                  scale=scale)
    F = sink + window + topk
    idx = torch.cat([f_idx, top, s_idx], -1).contiguous()
    lw = torch.cat([torch.zeros(B, Hkv, T, F, device=q.device), s_lw], -1)
    # top-k slots beyond top_n hold -1 and are skipped by the kernel; the sample slots follow
    count = (F + s_cnt).to(torch.int32)
    return Selection(idx, lw, count, shared=True)


def attended(sel: Selection) -> torch.Tensor:
    """Keys actually attended per row (valid index and finite weight)."""
    ok = sel.valid() & (sel.indices >= 0) & torch.isfinite(sel.log_weights)
    return ok.sum(-1)
