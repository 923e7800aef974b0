"""Uniform sampling without replacement and the verified budget, on GPU, with no host sync.

    perm_sample(member [B,H,T,N] uint8, lo, hi int32 [B], cap, seed)
        -> idx int32 [B,H,T,cap], acc int8 [B,H,T,cap]
    Slot j holds lo + P(j), where P is a keyed pseudo-random permutation of [0, hi[b]-lo)
    (4-round Feistel with cycle walking; one key per row). Any prefix of P is a uniform
    sample without replacement, so the pilot is a prefix and the full sample extends it.
    acc = 0 marks slots outside the range or already chosen (member = 1, e.g. by top-k):
    the accepted slots of a prefix are a uniform sample of the residual.

    budget_emit(...): one kernel per selection row that compacts the accepted sample slots,
    sizes the extension with the verified budget (mode='denominator' of methods/sampling.py:
    two-sided z, finite-population correction, the pilot variance's upper confidence bound,
    var_conf as there) from the pilot's exact scores, and writes the whole Selection row.
    verified_ext_ref is its float64 torch twin.

weights (as methods/sampling.Verified): "pooled" (default) gives every sampled key, pilot
included, n_r / (m + ext) and sizes the whole sample over all n_r keys; "two-phase" gives
the pilot 1 and the extension (n_r - m) / ext, sized over the n_r - m keys outside the pilot.
"""
from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=64)  # called per layer and step: no torch op each time
def z_two_sided(delta: float) -> float:
    """Phi^-1(1 - delta/2), as the CPU reference (methods/sampling.py) uses."""
    if not 0 < delta < 1:
        raise VattnError(f"delta must be in (0, 1), got {delta}")
    return math.sqrt(2.0) * torch.special.erfinv(torch.tensor(1.0 - delta, dtype=torch.float64)).item()


@functools.lru_cache(maxsize=64)
def var_inflation(m0: int, delta: float, var_conf: float = -1.0) -> float:
    """Factor from the pilot's sample variance (m0 keys) to its normal-theory upper confidence
    bound, (m0 - 1) / chi2_{m0-1}^{-1}(1 - conf), conf = 1 - delta/2 (var_conf=-1) or var_conf;
    var_conf=0: 1 (plug-in). As methods/sampling.Verified._inflate. Host arithmetic only, cached:
    no device work, so calls stay graph-capturable."""
    if var_conf != -1.0 and not 0.0 <= var_conf < 1.0:
        raise VattnError(f"var_conf must be -1 (1 - delta/2), 0 (off) or in (0, 1), got {var_conf}")
    if not 0 < delta < 1:
        raise VattnError(f"delta must be in (0, 1), got {delta}")
    conf = 1.0 - delta / 2 if var_conf == -1.0 else var_conf
    if conf == 0.0:
        return 1.0
    from vattn.methods.sampling import chi2_quantile
    dof = torch.tensor([float(max(m0 - 1, 1))], dtype=torch.float64)
    return (dof / chi2_quantile(dof, 1.0 - conf)).item()


def check_weights(weights):
    if weights not in ("pooled", "two-phase"):
        raise VattnError(f"weights must be 'pooled' or 'two-phase', got {weights!r}")
    return weights == "pooled"


def verified_ext_ref(q, k, fixed_idx, pilot_idx, n_r, eps, delta, scale=None, weights="pooled", var_conf=-1.0,
                     m0=None):
    """Torch float64 twin of the fused budget (the CPU reference's mode='denominator').

    One shared selection row: q [G, D] (the group's heads), k [N, D]; fixed_idx, pilot_idx
    int64 [F], [m]; n_r the residual size (pilot included). With pop = n_r - m (two-phase) or
    n_r (pooled), b is the max over heads of the smallest b with b0 (pop - b) / (pop - 1) <= b,
    b0 = (z sigma pop / (eps D_hat))^2, and the raw extension is b (two-phase) or b - m
    (pooled: b is the whole sample, pilot first). sigma^2 is the pilot variance times
    var_inflation(m0, delta, var_conf), m0 the configured pilot size (default m); infinite when
    m < min(m0, n_r), as in the kernel. Returns (ext, raw): ext = raw clamped to
    [1 (two-phase) or 0 (pooled), n_r - m].
    """
    pooled = check_weights(weights)
    q, k = q.double(), k.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sf = q @ k[fixed_idx].T * scale
    sp = q @ k[pilot_idx].T * scale
    shift = torch.maximum(sf.amax(-1), sp.amax(-1))
    xf, xp = torch.exp(sf - shift[:, None]), torch.exp(sp - shift[:, None])
    m = len(pilot_idx)
    mean = xp.sum(-1) / max(m, 1)
    var = ((xp - mean[:, None]) ** 2).sum(-1) / max(m - 1, 1)
    m0 = m if m0 is None else m0
    var = var * (float("inf") if m < min(m0, n_r) else var_inflation(m0, delta, var_conf))
    d_hat = xf.sum(-1) + n_r * mean
    rest = n_r - m
    pop = n_r if pooled else rest
    z = z_two_sided(delta)
    b0 = (z * z * pop ** 2 * var / (eps ** 2 * d_hat ** 2)).nan_to_num(nan=float("inf"), posinf=float("inf"))
    b = torch.where(torch.isinf(b0), torch.tensor(float(pop), dtype=torch.float64),
                    torch.ceil(b0 * pop / (pop - 1 + b0).clamp(min=1e-30) - 1e-9))
    braw = b.max().item() - (m if pooled else 0)
    return int(min(max(braw, 0 if pooled else 1), rest)), braw


def sample_log_weights_ref(n_r, m, ext, weights="pooled"):
    """(pilot, extension) log-weights of a row, as the kernels write them."""
    if check_weights(weights):
        w = math.log(n_r / max(m + ext, 1))
        return w, w
    return 0.0, math.log((n_r - m) / max(ext, 1))


def budget_emit(q, k, lengths, top_cnt, s_idx, s_acc, out, lw, *, sink, window, m0, eps, delta, scale=None,
                plse=None, s1=0, block_c=2048, weights="pooled", var_conf=-1.0):
    """Launch the fused budget + Selection assembly (see _sample_triton.budget_emit_kernel).

    q [B,Hq,1,D]; k [B,Hkv,N,D]; top_cnt int32 [B*Hkv]; s_idx/s_acc [B*Hkv, C] from perm_sample;
    out/lw [B*Hkv, KT] (top-k already at [sink+window, +top_cnt)). Returns (count int32 [B*Hkv],
    stats f32 [B*Hkv, 4]: pilot size m, extension ext, residual n_r, raw extension (max over heads)).
    plse (f32 [B,Hq,1,S_tot], log2 units) with s1 > 0: D_F is the exact mass of every key in
    [sink | window | top-k], read from the first s1 columns (split-KV partials of an attention
    pass over those slots, which also wrote the fixed slots); otherwise D_F = sinks + window only.
    A row is capped when the clamped raw extension > ext: the C slots held fewer accepted keys
    than the budget (see capped_rows). var_conf: the pilot variance's upper bound (var_inflation).
    """
    if not 0 < eps < 1:
        raise VattnError(f"eps must be in (0, 1), got {eps}")
    pooled = check_weights(weights)
    from vattn.kernels._common import next_pow2, use_ieee
    from vattn.kernels._sample_triton import budget_emit_kernel
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    rows, C = s_idx.shape[0] * s_idx.shape[1] * s_idx.shape[2], s_idx.shape[-1]
    KT = out.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    z = z_two_sided(delta)
    cnt = torch.empty((rows,), dtype=torch.int32, device=q.device)
    stats = torch.empty((rows, 4), dtype=torch.float32, device=q.device)
    part = plse is not None and s1 > 0
    st_tot = plse.shape[-1] if part else 1
    budget_emit_kernel[(rows,)](q, k, lengths, top_cnt, s_idx, s_acc, out, lw, cnt, stats,
                                plse if part else stats,
                                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                                Hkv, Hkv, T, KT, C, sink, window, m0, scale, z * z, eps * eps,
                                var_inflation(m0, delta, var_conf), s1, st_tot,
                                G=G, R=G, M=max(16, next_pow2(G)), D=D, CP=max(16, min(block_c, next_pow2(C))),
                                M0P=max(16, next_pow2(m0)), FP=max(16, next_pow2(sink + window)), BLK=1024,
                                IEEE=use_ieee(q.dtype), PART=part, SP=max(2, next_pow2(max(s1, 1))), POOLED=pooled,
                                num_warps=8)
    return cnt, stats


def capped_rows(stats, weights="pooled") -> torch.Tensor:
    """bool [rows]: rows whose extension is smaller than the verified budget (slots ran out)."""
    m, ext, n_r, raw = stats.unbind(-1)
    want = torch.minimum(raw.clamp(min=0 if check_weights(weights) else 1), n_r - m)
    return want > ext


def _common(q, k, out, scale):
    B, Hq, T, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    return dict(rows=B * Hkv * T, G=Hq // Hkv, D=D, Hkv=Hkv, T=T, N=N, KT=out.shape[-1],
                scale=D ** -0.5 if scale is None else float(scale))


def sample_budget(q, k, lengths, top_cnt, member, out, lw, plse, s1, *, sink, window, m0, eps, delta, seed,
                  scale=None, pad=False, block_c=2048, par=True, block_p=None, margin=1.15, extra=2, programs=16,
                  thr=None, weights="pooled", var_conf=-1.0):
    """Permutation sample + verified budget + assembly, after attention pass 1.

    member uint8 [B*Hkv, N] and thr int32 [rows] from the emit pass (top-k keys: member > thr;
    thr None: member is 0/1); out/lw [B*Hkv, KT] with the
    fixed keys and top-k already written; plse [B,Hq,1,S_tot] holding attention pass 1 in
    columns [0, s1). No slot cap: KT >= sink + window + topk + (hi - sink) lets the sample reach
    the whole residual. par=False: one serial kernel per row (sample_budget_kernel). par=True:
    the same kernel draws the pilot and sizes the budget, then block counts and a prefix scatter
    draw the rest with `programs` programs per row, each over every programs-th block (the same
    sample). weights: "pooled" or "two-phase" (module docstring); var_conf: the pilot variance's
    upper bound (var_inflation). Returns (count int32 [rows],
    stats f32 [rows, 4]: m, ext, n_r, raw extension).
    """
    if not 0 < eps < 1:
        raise VattnError(f"eps must be in (0, 1), got {eps}")
    pooled = check_weights(weights)
    from vattn.kernels._common import next_pow2, use_ieee
    from vattn.kernels import _sample_triton as ks
    c = _common(q, k, out, scale)
    rows, N = c["rows"], c["N"]
    cnt = torch.empty((rows,), dtype=torch.int32, device=q.device)
    stats = torch.empty((rows, 4), dtype=torch.float32, device=q.device)
    ctl = torch.empty((rows, 2), dtype=torch.int32, device=q.device)
    if thr is None:
        thr = torch.zeros((rows,), dtype=torch.int32, device=q.device)
    ks.sample_budget_kernel[(rows,)](q, k, lengths, top_cnt, member, thr, out, lw, cnt, stats, plse, ctl,
                                     q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                                     c["Hkv"], c["T"], N, c["KT"], seed & 0x7FFFFFFF, sink, window, m0, c["scale"],
                                     z_two_sided(delta) ** 2, eps * eps, var_inflation(m0, delta, var_conf),
                                     s1, plse.shape[-1],
                                     G=c["G"], R=c["G"], M=max(16, next_pow2(c["G"])), D=c["D"], CB=block_c,
                                     M0P=max(16, next_pow2(m0)), SP=max(2, next_pow2(s1)), BLK=1024,
                                     IEEE=use_ieee(q.dtype), PAD=pad, PAR=par, POOLED=pooled, num_warps=8)
    if not par:
        return cnt, stats
    # the rest of the sample: several programs per row (count blocks, then scatter by prefix)
    cbp = block_p or (1024 if rows <= 16 else 2048)
    n_mid = max(N - sink - window, 1)
    hb = ((n_mid - 1).bit_length() + 1) // 2
    nb = max(1, -(-(1 << (2 * hb)) // cbp))
    bcnt = torch.empty((rows, nb), dtype=torch.int32, device=q.device)
    member = member.reshape(rows, N)
    P = max(1, min(nb, programs))  # programs per row: the grid no longer grows with the domain
    ks.sample_count_kernel[(rows, P)](lengths, top_cnt, member, thr, stats, ctl, bcnt, c["Hkv"], c["T"], N,
                                       seed & 0x7FFFFFFF, sink, window, nb, float(margin), int(extra), CB=cbp,
                                       num_warps=4)
    ks.sample_scatter_kernel[(rows, P)](lengths, top_cnt, member, thr, stats, ctl, bcnt, out, lw, c["Hkv"], c["T"],
                                         N, c["KT"], seed & 0x7FFFFFFF, sink, window, nb, float(margin), int(extra),
                                         CB=cbp, NBP=max(2, next_pow2(nb)), POOLED=pooled, num_warps=4)
    return cnt, stats
