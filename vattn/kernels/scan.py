"""vAttention decode on GPU in four launches: cut, scan, sample, merge.

    vattention_scan_decode(q, k, v, ksig, proj, lengths, *, sink, window, topk, m0, eps, delta,
                           seed, stats=False) -> out [B,Hq,1,D] (and a stats dict)

No index list crosses launches:
 1. cut: per KV-head row, programs histogram the bit-agreement scores of a subsample of
    the middle keys; the last one to finish turns the histogram into a cut (a bin tau and a
    tie probability, so that about `topk` middle keys are taken: an approximate top-k whose
    count varies with the subsample) and scores the pilot (the first m0 draws).
 2. scan: one program per row attends the sinks and window (they need no cut, so it does
    not wait for it); the others score their own span of the middle from the signatures,
    compact the taken keys and attend them. No index list crosses programs.
 3. sample: every program of a row sizes the same sample from D_F (the scan's partials) and
    the pilot scores, then attends its blocks of the draws.
 4. merge of the partials (log-sum-exp).
The sample: M draws, independent and uniform over the whole middle [sink, L - window); a
drawn top-k key counts as 0, so D_hat = D_F + (n_mid / M) sum_i exp(s_i) [i not taken] is
unbiased for a fixed M and needs no list of the residual. M = max over the group's heads of
ceil(z^2 n_mid^2 var / (eps D_hat)^2), var the pilot's variance (members as 0) raised to its
upper confidence bound (var_inflation), D_hat = D_F + n_mid * pilot mean, D_F the
exact mass of sinks, window and taken keys. M >= m0; when M reaches the residual's size
(n_mid - topk) the residual is attended exactly instead.
mode='output' sizes M from the pilot's spread of x (v - o_hat) instead (_output_b0_ref,
docs/guarantee.md). Positions and ties come from keyed hashes of the key position (seed,
row), so `scan_decode_ref` reproduces every choice in float64.
"""
from __future__ import annotations

import functools
import math

import torch

from vattn import stats
from vattn.errors import VattnError
from vattn.kernels.common import (check_runnable, interpret, merge_partials, merge_programs, next_pow2,
                                  scratch_allocator, sm_count, target_programs, use_ieee, resolve_pdl,
                                  zeroed_counters)
from vattn.kernels.bits import bit_scores_ref, sign_bits
from vattn.selection import Selection

M32 = 0xFFFFFFFF
TIE_SALT = 0x68E31DA4
STAT_NAMES = ("pilot", "total", "n_mid", "need", "exact", "tau", "thu")


def _mix_ref(x, key):
    """uint32 keyed hash (ints or int64 tensors), as _scan_triton._mix."""
    x = ((x ^ key) * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & M32
    return x ^ (x >> 13)


def row_keys(seed, row, length):
    key = _mix_ref((row * 0x1B873593) & M32, _mix_ref(length & M32, seed & M32))
    return key, _mix_ref(key, TIE_SALT)


SUB_BLOCK = 512  # subsample keys per cut program (H100 B=1 128K: 512 of 4096 beat 1024 of 8192, round 13)


def cut_block(rows: int) -> int:
    """Subsample keys per cut program: SUB_BLOCK up to 16 KV rows, else 2048, so many rows do not
    launch waves of small cut programs (H200, eps 0.2: B=16 32K 114.5 -> 110.1 us, B=4 128K
    93.3 -> 89.8; B=1 128K is best at 512: 53.4 against 55.2). The twin follows the same rule."""
    return SUB_BLOCK if rows <= 16 else 2048


def bins(top: int, nh: int = 128):
    """(NH, SH): score bins min(score >> SH, NH - 1), SH the smallest shift with top >> SH <= NH."""
    sh = 0
    while top >> sh > nh:
        sh += 1
    return nh, sh


def subsample_stride(n_mid_max: int, sub: int, run: int = 32) -> int:
    """Runs of `run` keys, one every run * stride keys: about `sub` keys of the middle."""
    return max(1, n_mid_max // max(sub, run))


@functools.lru_cache(maxsize=64)  # called per layer and step: no torch op each time
def z_two_sided(delta: float) -> float:
    """Phi^-1(1 - delta/2) (stats.z_two_sided), checked and cached."""
    if not 0 < delta < 1:
        raise VattnError(f"delta must be in (0, 1), got {delta}")
    return stats.z_two_sided(delta)


@functools.lru_cache(maxsize=64)
def var_inflation(m0: int, delta: float, var_conf: float = -1.0) -> float:
    """Factor from the pilot's sample variance (m0 keys) to its normal-theory upper confidence
    bound (stats.var_inflation) at conf = 1 - delta/2 (var_conf=-1) or var_conf; var_conf=0: 1
    (plug-in). Host arithmetic only, cached: no device work, so calls stay graph-capturable."""
    if var_conf != -1.0 and not 0.0 <= var_conf < 1.0:
        raise VattnError(f"var_conf must be -1 (1 - delta/2), 0 (off) or in (0, 1), got {var_conf}")
    if not 0 < delta < 1:
        raise VattnError(f"delta must be in (0, 1), got {delta}")
    conf = 1.0 - delta / 2 if var_conf == -1.0 else var_conf
    return 1.0 if conf == 0.0 else float(stats.var_inflation(torch.tensor([float(m0)]), conf).item())


def check_scan_inputs(q, k, v, ksig, proj, lengths, sink, window, topk, m0):
    B, Hq, T, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    if T != 1:
        raise VattnError(f"vattention_scan_decode handles one query row (T=1), got T={T}")
    if (ksig.shape[:2] != (B, Hkv) or ksig.shape[2] < N or ksig.dtype != torch.int32
            or proj.shape != (D, 32 * ksig.shape[-1])):
        raise VattnError(f"ksig must be int32 [B,Hkv,>=N,W] = {(B, Hkv, N)}+(W,) and proj f32 [D, 32*W], got "
                         f"{tuple(ksig.shape)} {ksig.dtype} and {tuple(proj.shape)}")
    if v.shape != k.shape or v.dtype != k.dtype or q.dtype != k.dtype or Hq % Hkv:
        raise VattnError(f"q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} "
                         f"{v.dtype}: k and v must match, share q's dtype, and Hkv must divide Hq")
    if D not in (16, 32, 64, 128, 256):
        raise VattnError(f"head dim must be a power of two in 16..256, got {D}")
    bad_k = topk <= 0 or topk > 1 if isinstance(topk, float) else topk < 1
    if min(sink, window) < 0 or bad_k or m0 < 2:
        raise VattnError(f"need sink, window >= 0, topk a count >= 1 or a fraction in (0, 1], and m0 >= 2, "
                         f"got {sink}, {window}, {topk}, {m0}")
    if lengths is not None and (lengths.shape != (B,) or lengths.dtype != torch.int32):
        raise VattnError(f"lengths must be int32 [B={B}], got {lengths.dtype} {tuple(lengths.shape)}")


def topk_args(topk) -> tuple[int, float]:
    """(K, KF) of the kernels: a count, or a fraction of each row's length (resolve_size)."""
    return (0, float(topk)) if isinstance(topk, float) else (int(topk), 0.0)


def row_topk(topk, length: int) -> int:
    """A row's top-k count, with the kernels' float32 arithmetic (_scan_triton._row_k)."""
    kc, kf = topk_args(topk)
    frac = torch.ceil(torch.tensor(kf, dtype=torch.float32) * torch.tensor(float(length), dtype=torch.float32))
    return min(kc + int(frac), length)


SCAN_SMEM = 72 * 1024  # a scan program's shared memory (4 warps, head dim 128: 71680 B) and 1 KB an SM keeps


@functools.lru_cache(maxsize=None)
def scan_resident(index: int) -> int:
    """Scan programs an SM of CUDA device `index` holds at once, by shared memory: 3 on an H100
    or H200 (228 KB an SM), 2 on an A100 (164 KB). Smaller head dims fit more; this counts 128."""
    props = torch.cuda.get_device_properties(index)
    return max(1, getattr(props, "shared_memory_per_multiprocessor", 3 * SCAN_SMEM) // SCAN_SMEM)


def scan_plan(rows, device, block_n=64, num_warps=4, draws=3072):
    """Programs per row: scan, one for the sinks and window plus spans for about two per SM in
    all (with 8 warps two programs fill an SM: the sinks-and-window program takes a span's
    place, so every program starts at once); at 4 warps on a GPU, as many spans as the SMs
    hold at once (scan_resident each; the sinks-and-window programs end early and free their
    place). H200, eps 0.2, us a layer: B=4 128K 82.2 -> 74.7 (12 spans, not 9; 13 made a second
    wave: 84.6), B=8 128K and 32K 5-6% faster with 6 spans, not 5; B=16 32K stays at 3 (4:
    89.0 against 79.2). Sample, about two per SM, more (up to 16) when the expected draws
    (sample_draws) fill more blocks of block_n. Programs past the draws still wait for the scan
    and write an empty partial: at B=16 32K on an H200, 16 per row (2048 programs, 3 waves)
    took the pipeline 106 -> 88 us at 4 (sample 30 us after the scan)."""
    tp = target_programs(device)
    spans = max(1, -(-tp // rows))
    sample = max(spans, min(16, -(-draws // block_n)))
    if num_warps != 8 and device.type == "cuda":
        idx = device.index or 0
        spans = max(spans, scan_resident(idx) * sm_count(idx) // rows)
    return max(2, spans + (num_warps != 8)), sample


def sample_draws(eps, delta, mode, m0) -> int:
    """A guess of a row's draws, only to size the sample launch: z^2 cv^2 / eps^2 with a squared
    coefficient of variation cv^2 = 2 (unit-normal scores; the real size is the kernel's)."""
    return max(m0, math.ceil(2 * mode_quantile(mode, delta) / eps ** 2))


def vattention_scan_decode(q, k, v, ksig, proj, lengths=None, *, sink=128, window=128, topk=4096, m0=128,
                           eps=0.05, delta=0.05, seed=0, scale=None, var_conf=-1.0, stats=False, sub=4096,
                           sub_block=None, block_c=2048, block_n=64, sample_bn=64, splits=None, num_warps=None,
                           upto=4, pdl=None, trace=None, update_sig=False, count=False, scratch=None,
                           mode="denominator", pick=None, pre=None):
    """See the module docstring. scratch: a dict the call keeps its work buffers in and reuses
    on the next call with the same shapes (not with stats=True, whose tables it returns).
    pick (int64 [b]): out is [b, Hq, 1, D], row i that of batch row pick[i] (the merge gathers).
    count=True also returns the keys attended per row, int32 [B*Hkv] (what a plan needs for
    density; cheaper than stats). mode: "denominator" or "output" (the budget the sample is
    sized by; _output_b0_ref). stats=True also returns a dict: 'rows' f32 [B*Hkv, 7] with
    columns STAT_NAMES, 'exact_keys' / 'sample_keys' int32 [B*Hkv] (keys attended by the scan
    and by the sample; a key drawn twice counts twice). upto < 4 stops after that many launches
    and returns None (the benchmark's stage times: 1 cut, 2 + scan, 3 + sample, 4 + merge).
    pdl (default: on Hopper and later) launches each kernel as a programmatic dependent of the
    previous one: it starts while that one drains and waits in-kernel for its outputs.
    sub: keys in the cut's subsample (runs of 32 spread over the middle); sub_block: subsample
    keys per cut program (None: cut_block).
    block_c: keys per compaction block; block_n: keys per gather tile in the scan; sample_bn:
    draws per block in the sample (H100 B=1 128K: 64 beat 32 and 128, 56.1 vs 60.3 / 61.4 us).
    update_sig: the cut kernel also writes the signature of each row's newest key (position
    length - 1) into ksig, in place (ksig contiguous, window >= 1: that key is exact this step),
    so a decoder need not call sign_bits per layer and step.
    num_warps (default 8 up to 16 KV rows, else 4): with 8 warps on CUDA the cut kernel gets 4
    warps x 64 registers and the scan 112 registers, so two scan programs fit beside a cut
    program on one SM and start early; and each sample program attends its first block of
    draws before waiting for the scan (positions do not depend on the budget; dropped and redone
    when the budget ends inside it), holding that block's state across the wait in 128
    registers (255 at 4 warps, so not with 4 warps by default; pre=True/False overrides).
    trace (a dict, GPU only): filled with 'cut', 'scan', 'sample', 'merge' int64 [programs, 8],
    each program's global-timer stamps in ns at its phase ends (slot 7: SM id; see
    scripts/trace_scan.py); tables already there are reused, so no memset joins a captured graph."""
    check_scan_inputs(q, k, v, ksig, proj, lengths, sink, window, topk, m0)
    mode_quantile(mode, delta)  # checks mode and delta
    if stats and scratch is not None:
        raise VattnError("stats=True returns the call's own tables: do not pass scratch with it")
    from vattn.kernels import _scan_triton as kt
    B, Hq, _, D = q.shape
    Hkv, N, W = k.shape[1], k.shape[2], ksig.shape[-1]
    G = Hq // Hkv
    if lengths is None:
        lengths = torch.full((B,), N, dtype=torch.int32, device=q.device)
    if update_sig and (window < 1 or not ksig.is_contiguous()):
        raise VattnError(f"update_sig writes ksig in place for the newest key, which must lie in the window: it "
                         f"needs window >= 1 (got {window}) and a contiguous ksig (strides {tuple(ksig.stride())})")
    sub_block = cut_block(B * k.shape[1]) if sub_block is None else sub_block
    if sub_block < 32 or sub_block & (sub_block - 1):
        raise VattnError(f"sub_block={sub_block}: the cut's programs histogram runs of 32 keys; "
                         "give a power of two >= 32")
    if trace is not None and (q.device.type != "cuda" or interpret()):
        raise VattnError("trace= reads the GPU's global timer: it needs CUDA tensors, not the interpreter")
    # K/V are read through their strides (a view of a larger cache is not copied); ksig may
    # have room for more keys than N (a plan's buffer): its length is the kernels' row stride.
    q, ksig = q.contiguous(), ksig.contiguous()
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    NS = ksig.shape[2]
    proj = proj.float().contiguous()
    check_runnable(q, k, v, ksig, lengths)
    rows = B * Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    if num_warps is None:  # H100 128K: 8 warps 65.2 -> 63.4 us at B=1, 4 warps 283 -> 262 us at B=8
        num_warps = 8 if rows <= 16 else 4
    s1, s2 = splits or scan_plan(rows, q.device, sample_bn, num_warps, sample_draws(eps, delta, mode, m0))
    if s1 < 2:
        raise VattnError(f"splits[0] = {s1}: the scan needs a program for the sinks and window and at least one span")
    dev = q.device
    new = scratch_allocator(scratch, dev)  # scratch: the caller's buffers, reused (a plan's: no allocation per step)
    cnt = new("cnt", (rows, s1 + s2), torch.int32)  # keys attended: scan, then sample
    scr = new("scr", (rows, NS), torch.int32)
    po = new("po", (B, Hq, 1, s1 + s2, D), torch.float32)
    plse = new("plse", (B, Hq, 1, s1 + s2), torch.float32)
    st = new("st", (rows, 8), torch.float32)
    R, M = G, max(16, next_pow2(G))
    NH, SH = bins(G * 32 * W)
    pdl = resolve_pdl(pdl, q.device)
    meta = dict(R=R, M=M, W=W, WP=max(2, next_pow2(W)), D=D, RWP=max(2, next_pow2(R * W)), NH=NH, SH=SH,
                HW=not interpret(), IEEE=use_ieee(q.dtype), num_warps=num_warps,
                **(dict(PDL=1, launch_pdl=True) if pdl else {}))
    pre_draw = num_warps == 8 if pre is None else bool(pre)
    fit = num_warps == 8 and not interpret()  # register caps: two scan programs beside a cut one, 2 sample per SM
    fit_cut, fit_scan, fit_sample = (dict(num_warps=4, maxnreg=64), dict(maxnreg=112), dict(maxnreg=128)) if fit \
        else ({}, {}, {})
    sq = (q.stride(0), q.stride(1))
    skv = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    n_mid = max(N - sink - window, 1)
    stride = subsample_stride(n_mid, sub)
    P = -(-n_mid // (sub_block * stride))
    hist = new("hist", rows * P * NH, torch.int32)
    ctr = zeroed_counters(rows, dev)  # cut programs done per row; left zero
    cut = new("cut", rows * 2, torch.int32)
    M0P = max(16, next_pow2(m0))
    pil = new("pil", rows * R * M0P, torch.float32)
    pbin = new("pbin", rows * M0P, torch.int32)  # the pilot draws' score bins
    qs = new("qs", rows * R * W, torch.int32)  # query signatures [B, Hq, 1, W]
    log2s = scale * 1.4426950408889634
    tr = {}
    if trace is not None:  # tables already in trace are reused: no memset inside a captured graph
        for n, progs in (("cut", rows * P), ("scan", rows * s1), ("sample", rows * s2),
                         ("merge", merge_programs(B * Hq, D))):
            if n not in trace or trace[n].shape != (progs, 8):
                trace[n] = torch.zeros((progs, 8), dtype=torch.int64, device=dev)
            tr[n] = trace[n]
        meta["TR"] = 1
    tot = torch.empty(rows, dtype=torch.int32, device=dev) if count else cnt  # keys attended per row (count)
    kt.cut_kernel[(rows, P)](q, proj, ksig, k, lengths, hist, ctr, cut, pil, pbin, qs, tot, tr.get("cut", ctr), *sq,
                             *skv[:3], Hkv, NS, sink, window, *topk_args(topk), stride, seed & M32, m0, log2s,
                             PP=max(2, next_pow2(P)), M0P=M0P, PC=max(16, next_pow2(-(-M0P // P))),
                             BN=sub_block, CL=32, UPD=int(update_sig), CNT=int(count), **(meta | fit_cut))
    if upto < 2:
        return None
    kt.scan_kernel[(rows, s1)](q, proj, qs, ksig, k, v, lengths, cut, scr, cnt, po, plse, tr.get("scan", cnt),
                               *sq, *skv, Hkv, NS, s1, s1 + s2, sink, window, seed & M32, log2s, CB=block_c,
                               BN=block_n, **(meta | fit_scan))
    if upto < 3:
        return None
    kt.sample_kernel[(rows, s2)](q, qs, ksig, k, v, lengths, cut, pil, pbin, cnt, po, plse, st, tot,
                                 tr.get("sample", cnt), *sq, *skv, Hkv, NS, s1, s2, sink, window, *topk_args(topk), m0,
                                 seed & M32, log2s, mode_quantile(mode, delta), eps * eps,
                                 var_inflation(m0, delta, var_conf), BN=sample_bn, M0P=M0P,
                                 SP=max(2, next_pow2(s1)), PRE=int(pre_draw), OUT=int(mode == "output"), CNT=int(count),
                                 **(meta | fit_sample))
    if upto < 4:
        return None
    out = torch.empty((B if pick is None else pick.shape[0], Hq, 1, D), dtype=q.dtype, device=dev)
    merge_partials(po, plse, out, pdl=pdl, trace=tr.get("merge"), pick=pick)
    if count:  # keys attended per row, scan and sample (a key drawn twice counts twice), summed in-kernel
        return out, tot
    if not stats:
        return out
    return out, dict(rows=st[:, :7], exact_keys=cnt[:, :s1].sum(1, dtype=torch.int32),
                     sample_keys=cnt[:, s1:].sum(1, dtype=torch.int32))


def mode_quantile(mode: str, delta: float) -> float:
    """The budget's quantile: z^2 at delta (denominator), or the chi-square(1) quantile at
    1 - delta/2 = z^2 at delta/2 (output: delta/2 on the pilot's bound of ||o||, delta/2 on the
    sample; one degree of freedom is the conservative end of methods.sampling's k_eff)."""
    if mode not in ("denominator", "output"):
        raise VattnError(f"mode must be 'denominator' or 'output', got {mode!r}")
    return z_two_sided(delta if mode == "denominator" else delta / 2) ** 2


def _output_b0_ref(xp, vp, num, dh, n_mid, m, zq, eps, infl):
    """Output mode's b0 per head, float64 (the kernels' _output_b0): xp [G, m] pilot exp-scores
    (top-k members 0), vp [m, D] their values, num [G, D] N_F, dh [G] D_hat."""
    oh = (num + n_mid * (xp @ vp) / max(m, 1)) / dh[:, None]
    y = xp[:, :, None] * (vp[None] - oh[:, None, :])  # x_j (v_j - o_hat)
    ss = ((y - y.mean(1, keepdim=True)) ** 2).sum((1, 2))
    trs = ss / max(m - 1, 1) * infl
    sd = n_mid * torch.sqrt(trs / max(m, 1)) / dh
    olow = (oh.norm(dim=1) - math.sqrt(zq) * sd).clamp(min=0)
    return zq * n_mid ** 2 * trs / (eps ** 2 * dh ** 2 * olow ** 2)


def estimate_row_ref(e, vv, L, lo, hi, fixed, taken, kr, skey, m0, zz, eps, infl, mode, total=None, exact=None):
    """One KV row of the iid verified estimate, float64 (the twins of kernels/scan.py and
    kernels/sampled.py): e [G, N] exp-scores on one shift, vv [N, D] values, fixed / taken
    [G, N] bool per head (keys attended exactly / those of them in the middle [lo, hi)), kr
    the row's top-k count (the exact fallback's limit), skey the row's sample key. total /
    exact replace the sample size and exact flag. Returns dict: out [G, D], den [G], stats
    (pilot, total, n_mid, need, exact), picked (per head: positions, log weights), sampled
    (per head: sample keys attended, a key drawn twice counted twice)."""
    G, N = e.shape
    n = torch.arange(N)
    n_mid = max(hi - lo, 0)
    mid = (n >= lo) & (n < hi)
    ef = e * fixed
    dfix, num = ef.sum(1), ef @ vv
    i = torch.arange(m0 if n_mid > 0 else 0)
    x = lo + ((_mix_ref(i, skey) * n_mid) >> 32)
    xp = e[:, x] * ~taken[:, x]  # [G, m]: a drawn exact key counts as 0
    m = len(i)
    mean = xp.sum(1) / max(m, 1)
    var = ((xp - mean[:, None]) ** 2).sum(1) / max(m - 1, 1) * infl
    dh = dfix + n_mid * mean
    if mode == "output":
        b0 = _output_b0_ref(xp, vv[x], num, dh, n_mid, m, zz, eps, infl)
    else:
        b0 = zz * n_mid ** 2 * var / (eps ** 2 * dh ** 2)
    b0 = b0.nan_to_num(nan=float("inf"))
    need = float(torch.ceil(b0 - 1e-6).max()) if n_mid > 0 else 0.0
    ex = n_mid > 0 and need >= max(n_mid - kr, m)
    ex = ex if exact is None else exact
    tot_m = (n_mid if ex else int(max(need, m))) if n_mid > 0 else 0
    tot_m = tot_m if total is None else total
    if ex:  # the residual in position order, weight 1
        idx = n[mid & (n < L)]
        w = (~taken[:, idx]).double()
    else:
        idx = lo + ((_mix_ref(torch.arange(tot_m), skey) * n_mid) >> 32) if tot_m else torch.zeros(0).long()
        w = (~taken[:, idx]).double() * (n_mid / max(tot_m, 1))
    es = e[:, idx] * w
    den = dfix + es.sum(1)
    picked = [(torch.cat([n[fixed[g]], idx[w[g] > 0]]),
               torch.cat([torch.zeros(int(fixed[g].sum())), w[g][w[g] > 0].log()])) for g in range(G)]
    return dict(out=(num + es @ vv[idx]) / den[:, None], den=den, stats=(m, tot_m, n_mid, need, float(ex)),
                picked=picked, sampled=(w > 0).sum(1))


def scan_decode_ref(q, k, v, ksig, proj, lengths=None, *, sink=128, window=128, topk=4096, m0=128, eps=0.05,
                    delta=0.05, seed=0, scale=None, var_conf=-1.0, mode="denominator", sub=4096, sub_block=None,
                    tau=None, thu=None, total=None, exact=None):
    """Float64 twin of vattention_scan_decode. tau / thu / total (int tensors [B*Hkv]) and
    exact (bool) replace the cut, sample size and exact flag it would compute (to compare
    outputs exactly when float32 rounding moves a cut by one). Returns (out [B,Hq,1,D]
    float64, dict with 'rows' [B*Hkv, 7] float64 as the kernel's stats, 'exact_keys',
    'sample_keys', and 'd_hat', 'd' [B, Hq]: estimated and true denominators, same shift)."""
    B, Hq, _, D = q.shape
    Hkv, N, W = k.shape[1], k.shape[2], ksig.shape[-1]
    G = Hq // Hkv
    dev = q.device
    lengths = torch.full((B,), N, dtype=torch.int32) if lengths is None else lengths.cpu()
    scale = D ** -0.5 if scale is None else float(scale)
    NH, SH = bins(G * 32 * W)
    sub_block = cut_block(B * Hkv) if sub_block is None else sub_block
    sc = (bit_scores_ref(sign_bits(q, proj.float()), ksig[:, :, :N], True).view(B * Hkv, N).cpu().long() >> SH).clamp(max=NH - 1)
    n_mid_max = max(N - sink - window, 1)
    stride = subsample_stride(n_mid_max, sub)
    P = -(-n_mid_max // (sub_block * stride))
    zz, infl = mode_quantile(mode, delta), var_inflation(m0, delta, var_conf)
    out = torch.zeros((B, Hq, 1, D), dtype=torch.float64)
    rows = torch.zeros((B * Hkv, 7), dtype=torch.float64)
    exact_keys = torch.zeros(B * Hkv, dtype=torch.int32)
    sample_keys = torch.zeros(B * Hkv, dtype=torch.int32)
    d_hat = torch.zeros((B, Hq), dtype=torch.float64)
    d_true = torch.zeros((B, Hq), dtype=torch.float64)
    picked = []  # per row: (key positions, log weights) of what the row attends
    for row in range(B * Hkv):
        b, h = divmod(row, Hkv)
        L = int(lengths[b])
        kr = row_topk(topk, L)
        hi = L - window
        n_mid = max(hi - sink, 0)
        s = sc[row]
        skey, tkey = row_keys(seed, row, L)
        # the cut from the subsample: P blocks of runs of 32 keys, one run every 32 * stride
        lane = torch.arange(sub_block)
        rel = (lane // 32) * (32 * stride) + lane % 32
        pos = torch.cat([sink + p * sub_block * stride + rel for p in range(P)])
        pos = pos[pos < hi]
        hc = torch.bincount(s[pos], minlength=NH).float()
        tot = hc.sum()
        ge = tot - hc.cumsum(0) + hc
        want = torch.tensor(float(kr), dtype=torch.float32) * tot.float() / float(max(n_mid, 1))
        t = max(int((ge >= want).sum()) - 1, 0)
        p = ((want - (ge[t] - hc[t])) / max(float(hc[t]), 1.0)).clamp(0, 1)
        tu = int((p.float() * 16777216.0).to(torch.int32))
        t = t if tau is None else int(tau[row])
        tu = tu if thu is None else int(thu[row])
        n = torch.arange(N)
        u = (_mix_ref(n, tkey) >> 8)
        taken = (s > t) | ((s == t) & (u < tu))
        mid = (n >= sink) & (n < hi)
        fixed = (n < L) & (~mid | taken)
        qq = q[b, h * G:(h + 1) * G, 0].double().cpu()
        kk, vv = k[b, h].double().cpu(), v[b, h].double().cpu()
        logit = qq @ kk.T * scale  # [G, N]
        e = torch.exp(logit - logit[:, :L].amax(1, keepdim=True))
        est = estimate_row_ref(e, vv, L, sink, hi, fixed.expand(G, N), taken.expand(G, N), kr, skey, m0, zz, eps,
                               infl, mode, None if total is None else int(total[row]),
                               None if exact is None else bool(exact[row]))
        out[b, h * G:(h + 1) * G, 0] = est["out"]
        d_hat[b, h * G:(h + 1) * G] = est["den"]
        d_true[b, h * G:(h + 1) * G] = e[:, :L].sum(1)
        rows[row] = torch.tensor([*est["stats"], t, tu], dtype=torch.float64)
        picked.append(est["picked"][0])
        exact_keys[row] = int(fixed.sum())
        sample_keys[row] = int(est["sampled"][0])
    return out.to(dev), dict(rows=rows, exact_keys=exact_keys, sample_keys=sample_keys, d_hat=d_hat, d=d_true,
                             selection=picked_selection(picked, B, Hkv, dev, shared=True))


def picked_selection(picked, B, H, device, shared) -> Selection:
    """A twin's choices, per row (positions, log weights), as a Selection [B, H, 1, K] (a key
    drawn twice is listed twice)."""
    kmax = max((len(i) for i, _ in picked), default=0)
    idx = torch.full((B * H, kmax), -1, dtype=torch.int32)
    lw = torch.zeros((B * H, kmax), dtype=torch.float32)
    for r, (i, w) in enumerate(picked):
        idx[r, :len(i)], lw[r, :len(i)] = i.to(torch.int32), w.float()
    count = torch.tensor([len(i) for i, _ in picked], dtype=torch.int32)
    return Selection(idx.view(B, H, 1, kmax).to(device), lw.view(B, H, 1, kmax).to(device),
                     count.view(B, H, 1).to(device), shared=shared)


def scan_density(st, lengths, Hkv):
    """Mean over rows of (exact + sample keys) / length."""
    L = lengths.float().repeat_interleave(Hkv)
    return ((st["exact_keys"] + st["sample_keys"]).float() / L.to(st["exact_keys"].device)).mean().item()
