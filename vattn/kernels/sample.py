"""Uniform sampling without replacement and the verified budget, on GPU, with no host sync.

    perm_sample(member [B,H,T,N] uint8, lo, hi int32 [B], cap, seed)
        -> idx int32 [B,H,T,cap], acc int8 [B,H,T,cap]
    Slot j holds lo + P(j), where P is a keyed pseudo-random permutation of [0, hi[b]-lo)
    (4-round Feistel with cycle walking; one key per row). Any prefix of P is a uniform
    sample without replacement, so the pilot is a prefix and the full sample extends it.
    acc = 0 marks slots outside the range or already chosen (member = 1, e.g. by top-k):
    the accepted slots of a prefix are a uniform sample of the residual.

    verified_budget(...) -> (count, log_weights) for the sample slots: the denominator-mode
    budget b = clamp((z * sigma_hat * n_r / (eps * D_hat))^2, m0, n_r), per selection row,
    from the pilot's exact scores (see docs in the function).
"""
from __future__ import annotations

import math

import torch

from vattn.errors import VattnError
from vattn.kernels._common import check_runnable

M32 = 0xFFFFFFFF


def _mix_ref(x, key):
    x = ((x ^ key) * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & M32
    return x ^ (x >> 13)


def _feistel_ref(x, hb, mask, key):
    lft, rgt = x >> hb, x & mask
    for i in range(4):
        lft, rgt = rgt, lft ^ (_mix_ref(rgt, (key + i * 0x3C6EF372) & M32) & mask)
    return (lft << hb) | rgt


def perm_sample_ref(member, lo, hi, cap, seed, walk=24):
    """Torch twin of perm_sample (bit-exact)."""
    B, H, T, N = member.shape
    rows = B * H * T
    r = torch.arange(rows, device=member.device)
    n_mid = (hi.long().repeat_interleave(H * T) - lo).clamp(min=0)
    bits = torch.zeros_like(n_mid)
    for i in range(31):
        bits += ((n_mid - 1) >> i) > 0
    hb = ((bits + 1) // 2)[:, None]
    mask = (1 << hb) - 1
    key = ((seed ^ ((r * 0x1B873593) & M32)) & M32)[:, None]
    j = torch.arange(cap, device=member.device)[None, :].expand(rows, cap)
    y = _feistel_ref(j, hb, mask, key)
    for _ in range(walk):
        y = torch.where(y >= n_mid[:, None], _feistel_ref(y, hb, mask, key), y)
    ok = (j < n_mid[:, None]) & (y < n_mid[:, None])
    pos = lo + y
    mem = member.view(rows, N).gather(1, torch.where(ok, pos, 0)).bool()
    idx = torch.where(ok, pos, -1).to(torch.int32)
    return idx.view(B, H, T, cap), (ok & ~mem).to(torch.int8).view(B, H, T, cap)


def perm_sample(member, lo: int, hi, cap: int, seed: int, *, block=256, walk=24):
    if member.dim() != 4 or member.dtype != torch.uint8:
        raise VattnError(f"member must be uint8 [B,H,T,N], got {member.dtype} {tuple(member.shape)}")
    if hi.dtype != torch.int32 or hi.shape != (member.shape[0],):
        raise VattnError(f"hi must be int32 [B={member.shape[0]}], got {hi.dtype} {tuple(hi.shape)}")
    if cap < 1:
        raise VattnError(f"cap must be >= 1, got {cap}")
    check_runnable(member, hi)
    from vattn.kernels._sample_triton import perm_sample_kernel
    B, H, T, N = member.shape
    member = member.contiguous()
    idx = torch.empty((B, H, T, cap), dtype=torch.int32, device=member.device)
    acc = torch.empty((B, H, T, cap), dtype=torch.int8, device=member.device)
    grid = (B * H * T, (cap + block - 1) // block)
    perm_sample_kernel[grid](hi, member, idx, acc, lo, seed & 0x7FFFFFFF, H, T, N, cap, BC=block, WALK=walk)
    return idx, acc


def z_of(delta: float) -> float:
    """One-sided normal quantile Phi^-1(1 - delta)."""
    if not 0 < delta < 1:
        raise VattnError(f"delta must be in (0, 1), got {delta}")
    return math.sqrt(2) * torch.erfinv(torch.tensor(1 - 2 * delta)).item()


def verified_budget(q, k, f_idx, f_count, s_idx, s_acc, n_r, *, m0, eps, delta, scale=None):
    """Size the sample and weight it, all on GPU (shared selections: one row per KV head).

    q [B,Hq,T,D]; k [B,Hkv,N,D]; f_idx int32 [B,Hkv,T,F] exact keys (sink/window; -1 ignored);
    s_idx/s_acc [B,Hkv,T,C] from perm_sample; n_r int [B,Hkv,T] residual size.
    Pilot = the first m0 accepted slots. sigma_hat = std of e^s over the pilot,
    D_hat = sum_F e^s + n_r * mean_pilot e^s (F = the given exact keys only: leaving the top-k
    mass out makes D_hat smaller and the budget larger, i.e. conservative). b is the max over the
    G heads of a group, clamped to [m0, min(n_r, accepted)]. Returns (count int32 [B,Hkv,T]:
    slots to attend, the prefix holding b accepted; log_weights f32 [B,Hkv,T,C]: log(n_r/b) on
    accepted slots of that prefix, -inf elsewhere).
    """
    if not 0 < eps < 1:
        raise VattnError(f"eps must be in (0, 1), got {eps}")
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    z = z_of(delta)
    acc = s_acc.bool()
    rank = acc.int().cumsum(-1)  # accepted slots up to and including j
    C = s_idx.shape[-1]
    P = min(C, 2 * m0)  # the pilot lives in a short prefix (a few slots are rejected)
    pilot = acc[..., :P] & (rank[..., :P] <= m0)
    bb = torch.arange(B, device=q.device).view(B, 1, 1, 1)
    hh = torch.arange(Hkv, device=q.device).view(1, Hkv, 1, 1)
    qg = q.float().view(B, Hkv, G, T, D)

    def scores(idx):
        kk = k[bb, hh, idx.clamp(min=0).long()].float()  # [B,Hkv,T,n,D]
        return torch.einsum("bhgtd,bhtnd->bhgtn", qg, kk) * scale

    sp = scores(s_idx[..., :P])
    sf = scores(f_idx).masked_fill(~(f_idx >= 0)[:, :, None], float("-inf"))
    pm = pilot[:, :, None]
    shift = torch.maximum(sp.masked_fill(~pm, float("-inf")).amax(-1), sf.amax(-1)).clamp(min=-1e30)
    ep = torch.exp(sp - shift[..., None]) * pm
    m = pm.sum(-1).clamp(min=1)
    mean = ep.sum(-1) / m
    var = ((ep - mean[..., None]) ** 2 * pm).sum(-1) / (m - 1).clamp(min=1)
    nr = n_r.float()[:, :, None]
    d_hat = torch.exp(sf - shift[..., None]).sum(-1) + nr * mean
    b = (z * var.sqrt() * nr / (eps * d_hat).clamp(min=1e-30)) ** 2  # [B,Hkv,G,T]
    b = b.amax(2).ceil()
    avail = rank[..., -1].float()
    b = torch.minimum(torch.maximum(b, torch.full_like(b, m0)), torch.minimum(n_r.float(), avail))
    take = acc & (rank <= b[..., None])
    count = (rank < b[..., None]).sum(-1) + 1  # slots until the b-th accepted one
    count = torch.minimum(count, torch.full_like(count, C)).to(torch.int32)
    count = torch.where(b > 0, count, 0)
    lw = torch.log(n_r.float() / b.clamp(min=1))[..., None].expand_as(take)
    lw = torch.where(take, lw, torch.full_like(lw, float("-inf")))
    return count, lw.contiguous()
