"""The verified sample behind any exact selection, on GPU: a Selection (sink, window, top-k or
Quest keys, weight 0) attended exactly, the rest of the middle estimated by iid draws.

    sampled_decode(q, k, v, sel, lengths, *, sink, window, m0, eps, delta, seed, mode, ...)
        -> out [B, Hq, 1, D] (and keys attended per selection row, or a stats dict)

The estimator is the scan chain's (kernels/scan.py, docs/guarantee.md): M draws, independent
and uniform over the middle [start + sink, L - window) (start: the row's first key); a drawn
key that the head's selection lists counts 0, so D_hat = D_F + (n_mid / M) sum_i exp(s_i)
[i not listed] is unbiased for a fixed M; M from a pilot of the first m0 draws, in denominator
or output mode, the largest over the group's heads; when M reaches n_mid - K (K: the fewest
middle keys a head's row lists), the unlisted middle is attended exactly instead. Only the
front differs: the selection is given (exact top-k or Quest pages, per query head or per KV
head), not cut from signatures.
Launches: member bits (a bit per listed middle key), the sparse kernel's split (the exact
part's partials), sample, merge. `sampled_decode_ref` is the float64 twin.
"""
from __future__ import annotations

import torch

from vattn.errors import VattnError
from vattn.kernels.common import (check_runnable, merge_partials, next_pow2, resolve_pdl, scratch_allocator,
                                  target_programs, use_ieee)
from vattn.kernels.scan import STAT_NAMES as SCAN_STATS
from vattn.kernels.scan import (row_keys, estimate_row_ref, mode_quantile, picked_selection,
                                var_inflation)
from vattn.kernels.sparse import check_sparse_inputs, plan_splits, sparse_partials
from vattn.selection import Selection

STAT_NAMES = SCAN_STATS[:5]  # the scan's, without its cut


def sample_programs(rows: int, device) -> int:
    """Sample programs per KV row: as many as fit one wave of about two per SM (rounded down: one
    more a row spills a second wave), at most 16. Not fewer when few draws are expected: a row
    whose bound no sample meets attends its whole middle in this launch. H200, 2026-12-04, the
    `vattention` preset per layer, rounded down against up: B=4 32K 379.6 against 532.1 us on flat
    rows (every row exact) and 183.7 against 194.2 on peaked ones, B=8 706.3 / 929.6 and 314.1 /
    321.5, B=16 1338.6 / 1582.1 and 555.4 / 561.6, B=8 128K 2570.4 / 3461.3 and 1018.9 / 1026.5."""
    return max(1, min(16, target_programs(device) // rows))


def check_sampled_inputs(q, k, v, sel: Selection, lengths, sink, window, m0, starts=None):
    check_sparse_inputs(q, k, v, sel.indices, sel.log_weights, sel.count, sel.shared)
    B, Hq, T, D = q.shape
    if T != 1:
        raise VattnError(f"sampled_decode handles one query row (T=1), got T={T}")
    if min(sink, window) < 0 or m0 < 2:
        raise VattnError(f"need sink, window >= 0 and m0 >= 2, got {sink}, {window}, {m0}")
    for name, x in (("lengths", lengths), ("starts", starts)):
        if x is not None and (x.shape != (B,) or x.dtype != torch.int32):
            raise VattnError(f"{name} must be int32 [B={B}], got {x.dtype} {tuple(x.shape)}")


def sampled_decode(q, k, v, sel: Selection, lengths, *, sink, window, m0=128, eps=0.05, delta=0.05, seed=0,
                   scale=None, var_conf=-1.0, mode="denominator", count=False, stats=False, scratch=None,
                   pick=None, starts=None, block_n=64, splits=None, pdl=None):
    """See the module docstring. sel: the exact keys, weight 0 (log_weights are not read), rows
    [B, Hkv or Hq, 1, W]; its middle keys must be distinct. count=True also returns the keys
    attended per selection row, int32 [B * H] (listed + sampled; a key drawn twice counts
    twice); stats=True a dict with 'rows' f32 [B*Hkv, 5] (STAT_NAMES) and 'keys' (as count).
    scratch: a dict of work buffers reused across calls (a plan's). pick: as sparse_decode.
    starts (int32 [B], default 0): each row's first key (left padding); its sinks start there."""
    check_sampled_inputs(q, k, v, sel, lengths, sink, window, m0, starts)
    mode_quantile(mode, delta)
    if stats and scratch is not None:
        raise VattnError("stats=True returns the call's own tables: do not pass scratch with it")
    check_runnable(q, k, v, sel.indices, lengths)
    from vattn.kernels import _sampled_triton as kt
    B, Hq, _, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G, H, W = Hq // Hkv, sel.indices.shape[1], sel.indices.shape[3]
    RS = 1 if sel.shared else G
    scale = D ** -0.5 if scale is None else float(scale)
    q = q.contiguous()
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    idx, cnt = sel.indices.contiguous(), sel.count.contiguous()
    rows, srows, dev = B * Hkv, B * H, q.device
    s1 = plan_splits(srows, W, block_n, dev, splits and splits[0])
    s2 = splits[1] if splits else sample_programs(rows, dev)
    new = scratch_allocator(scratch, dev)
    if starts is None:
        starts = torch.zeros(B, dtype=torch.int32, device=dev)
    nw = -(-N // 32)
    bits = new("bits", (srows, nw), torch.int32)
    kmid = new("kmid", srows, torch.int32)
    tot = torch.empty(srows, dtype=torch.int32, device=dev)  # returned: the caller's, not scratch
    po = new("po", (B, Hq, 1, s1 + s2, D), torch.float32)
    plse = new("plse", (B, Hq, 1, s1 + s2), torch.float32)
    st = new("st", (rows, 8), torch.float32)
    kt.member_kernel[(srows,)](idx, cnt, starts, lengths, bits, kmid, tot, W, nw, H, sink, window, BW=1024, BK=1024,
                               CNT=int(count or stats))
    sparse_partials(q, k, v, idx, sel.log_weights.contiguous(), cnt, sel.shared, scale, po, plse, s1, block_n)
    pdl = resolve_pdl(pdl, dev)
    M0P = max(16, next_pow2(m0))
    kt.sample_kernel[(rows, s2)](q, k, v, starts, lengths, bits, kmid, po, plse, st, tot, q.stride(0), q.stride(1),
                                 k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                                 Hkv, nw, s1, s2, sink, window, m0, seed & 0xFFFFFFFF, scale * 1.4426950408889634,
                                 mode_quantile(mode, delta), eps * eps, var_inflation(m0, delta, var_conf),
                                 R=G, M=max(16, next_pow2(G)), RS=RS, D=D, BN=block_n, M0P=M0P,
                                 SP=max(2, next_pow2(s1)), IEEE=use_ieee(q.dtype), OUT=int(mode == "output"),
                                 CNT=int(count or stats), **(dict(PDL=1, launch_pdl=True) if pdl else {}))
    out = torch.empty((B if pick is None else pick.shape[0], Hq, 1, D), dtype=q.dtype, device=dev)
    merge_partials(po, plse, out, pdl=pdl, pick=pick)
    if stats:
        return out, dict(rows=st[:, :5], keys=tot)
    return (out, tot) if count else out


def sampled_decode_ref(q, k, v, sel: Selection, lengths, *, sink, window, m0=128, eps=0.05, delta=0.05, seed=0,
                       scale=None, var_conf=-1.0, mode="denominator", total=None, exact=None, starts=None):
    """Float64 twin of sampled_decode. total / exact (int / bool tensors [B*Hkv]) replace the
    sample size and exact flag it would compute. Returns (out [B, Hq, 1, D] float64, dict with
    'rows' [B*Hkv, 5] as the kernel's stats, 'keys' int32 [B*H] (as count=True), 'd_hat', 'd'
    [B, Hq] (estimated and true denominators, same shift) and 'selection': what it attended,
    per query head (a key drawn twice is listed twice))."""
    check_sampled_inputs(q, k, v, sel, lengths, sink, window, m0, starts)
    B, Hq, _, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    starts = torch.zeros(B, dtype=torch.int32) if starts is None else starts.cpu()
    zz, infl = mode_quantile(mode, delta), var_inflation(m0, delta, var_conf)
    lengths = lengths.cpu()
    idx, cnt = sel.indices.cpu().long(), sel.count.cpu().long()
    out = torch.zeros((B, Hq, 1, D), dtype=torch.float64)
    rows = torch.zeros((B * Hkv, 5), dtype=torch.float64)
    keys = torch.zeros(B * sel.indices.shape[1], dtype=torch.int32)
    d_hat, d_true = torch.zeros((B, Hq), dtype=torch.float64), torch.zeros((B, Hq), dtype=torch.float64)
    picked = []
    n = torch.arange(N)
    for row in range(B * Hkv):
        b, h = divmod(row, Hkv)
        L, s0 = int(lengths[b]), int(starts[b])
        lo, hi = s0 + sink, L - window
        if L <= s0:  # no keys: zeros, as attend gives
            picked.extend([(torch.zeros(0).long(), torch.zeros(0))] * G)
            continue
        srows = [h] * G if sel.shared else [h * G + g for g in range(G)]
        fixed = torch.zeros((G, N), dtype=torch.bool)
        for g, s in enumerate(srows):
            fixed[g, idx[b, s, 0, :cnt[b, s, 0]]] = True
        fixed &= (n < L) & (n >= s0)
        taken = fixed & (n >= lo) & (n < hi)
        kr = int(taken.sum(1).min())
        skey, _ = row_keys(seed, row, L)
        qq = q[b, h * G:(h + 1) * G, 0].double().cpu()
        logit = (qq @ k[b, h].double().cpu().T * scale).masked_fill(n < s0, float("-inf"))
        e = torch.exp(logit - logit[:, s0:L].amax(1, keepdim=True))  # 0 before the row's start
        est = estimate_row_ref(e, v[b, h].double().cpu(), L, lo, hi, fixed, taken, kr, skey, m0, zz, eps, infl,
                               mode, None if total is None else int(total[row]),
                               None if exact is None else bool(exact[row]))
        out[b, h * G:(h + 1) * G, 0] = est["out"]
        d_hat[b, h * G:(h + 1) * G], d_true[b, h * G:(h + 1) * G] = est["den"], e[:, :L].sum(1)
        rows[row] = torch.tensor(est["stats"], dtype=torch.float64)
        picked.extend(est["picked"])
        for g, s in enumerate(srows[:1] if sel.shared else srows):
            keys[b * sel.indices.shape[1] + s] = int(fixed[g].sum() + est["sampled"][g])
    return out.to(q.device), dict(rows=rows, keys=keys, d_hat=d_hat, d=d_true,
                                  selection=picked_selection(picked, B, Hq, q.device, shared=False))


__all__ = ["sampled_decode", "sampled_decode_ref", "STAT_NAMES"]

