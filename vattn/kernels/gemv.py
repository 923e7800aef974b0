"""Skinny GEMMs for the decode step, y = f(x) @ W^T for M <= 16 rows, with the layer op before the GEMM fused in.

    linear(x, w, bias)                                   y = x W^T (+ bias)
    rms_linear(x, delta, norm_w, w, eps, gemma, w_delta) h = x + [rms(delta, w_delta)], y = rms(h, norm_w) W^T
                                                         -> (h, y)
    glu_linear(gu, act, w)                               y = (act(gate) * up) W^T,   gu = [gate | up]
    rms_linear(..., rope=(pos, cos, sin, Hq, Hkv, cache)) one row: y's q, k rotated, k and v written
                                                         into the KV cache -> (h, q)

Shapes: x, delta [..., K] (M = the product of the leading dims, 1..16), gu [..., 2K], w [N, K]
(nn.Linear layout, last-dim stride 1), bias [N], norm_w and w_delta [K]; y [..., N]. One float dtype
for activations, w and bias (bf16/fp16; fp32 too, with exact fp32 dots).

Why: at batch 1 a decode step's GEMMs read each weight once and do nothing else, so they should
run at HBM bandwidth; cuBLAS picks kernels for small N*K that run below it (a split-K reduce is a
second launch), and the RMSNorm / GLU launches between the GEMMs cost 1.5-2.5 us each. Here each
GEMM is one launch with its prologue folded in, launched as a programmatic dependent (PDL): its
first weight tile is loaded before it waits for the previous kernel.

Kernel (one for all three): program (j, s) owns output columns [j BN, (j + 1) BN) of all M rows
and the K range [s KS, (s + 1) KS) (split_k = 1: the whole K). It
  1. loads its first weight tile W[cols, k0:k0 + BK] into registers (weights do not depend on the
     previous kernel), then `pdl_wait` (_online.pdl_wait: griddepcontrol.wait, then
     launch_dependents so the next GEMM's programs can start their own first loads). Without PDL the
     wait is compiled out and the kernel is otherwise the same. Compiled for sm_90 (no GPU at hand)
     the SASS has the tile's LDG.128s ahead of the wait (ACQBULK);
  2. rms_linear only: a pre-pass over the whole rows of x (+ delta) for the float32 RMS statistic
     of each row (two with w_delta: the statistic of delta first), in tiles of up to 4096 / MP
     elements (a whole row at M = 1 and K <= 4096: one round of loads). Every program recomputes it
     from L2: M K (2 M K with delta) elements, 16 KB a program at M = 1, K = 4096, 16 x that at M = 16.
     Program (0, 0) also writes the new residual h to h_out in this pass;
  3. loops over its K range in BK tiles (tl.range, num_stages: the weight and activation tiles are
     streamed through shared memory with cp.async). The activation tile a [MP, BK] is x (plain),
     rms(x + delta) (recomputed per tile from L1/L2, rounded to the activation dtype where
     add_rms_norm_ref rounds) or act(gate) * up (rounded as glu_ref), multiplied into a float32
     accumulator: with `dot` (tensor cores, M > 1 default) rows are padded to MP = 16 and acc [BN, MP]
     += W_tile @ a^T (the weight tile in the MMA's M dim: wgmma at BN >= 64, where a [MP, BN] tile
     wasted the MMA on padding); without it (M = 1 default) a CUDA-core GEMV whose BN can be as small as 1, so a
     narrow N still gives every SM several programs. Its accumulator is [BN, BK / VEC]: each thread
     sums its own 16-byte vectors (no cross-thread reduction in the loop, one tl.sum at the end).
     block_k = 32 num_warps VEC (VEC = elements in 16 bytes) gives the weight tile and the
     activation row one register layout: other block_k cost a shared-memory layout conversion of
     every weight tile (seen in the TTGIR);
  4. split_k = 1: adds the bias in float32, rounds once, stores. split_k > 1 (deterministic, one
     launch): each program stores its float32 partial to a workspace, counts itself done with an
     atomic on a per-column-block counter (vattn.kernels.common.zeroed_counters), and the last
     one of a column block sums the split_k partials in index order (the same bits whichever
     program finishes last), adds the bias, stores y and zeroes the counter for the next call.
  5. rope= (M = 1, split_k = 1): program j owns column pairs (d, d + D/2) of one head instead of a
     contiguous block, so the epilogue rotates q and k as layer_ops.qkv_rope rounds and stores q and
     the cache's k, v itself: the RoPE launch of a single-row step is gone (H200, B=1 32K dense:
     5.475 -> 5.42 ms a step). This launch does not let the attention schedule before it ends: the
     attention's waiting programs held the SM room its own programs needed (qkv 17 -> 47 us, the step
     5.87-5.94 ms).
Rows past N are clamped to row N - 1 for the loads (unmasked, vectorised) and masked at the store;
K needs masks only when BK does not divide it.
Tried and dropped: a register double buffer of the weight tiles in the M = 1 loop (ptxas sinks the
next tile's loads below the FMAs, to reuse the registers: one tile in flight again).

Numerics: the prologues round where their torch references round (layer_ops.add_rms_norm_ref,
layer_ops.glu_ref), the dot accumulates exact products in float32 and y is rounded once, so y
equals the reference activation times W^T computed in float64 and rounded, up to the float32 sum
order (and that of the RMS statistic): bf16 differs in rare elements by one ulp.

Tuning: block_n, block_k, num_warps, num_stages, split_k, dot as keywords (default_config picks
them from (M, N, K)). On an H200 (2026-12-03) the sweep of scripts/bench_gemv.py found configs
faster for each op alone (num_stages 1, wider tiles: 2-11% per op), but in the run that used them
the B=1 decode step, a chain of dependent launches, was 0.45-0.64 ms slower (not isolated from
another change of that run); the defaults stayed (docs/BENCHMARKS.md). Limits: the interpreter
has no griddepcontrol, so PDL is GPU only (use_pdl) and the tests run without it; whether the
early tile load pays off (and the per-program norm pre-pass at M = 16 costs little) was for the
GPU timing to show. M = 16 (H200, 2026-12-03, swapped tiles, default configs): `linear` equals cuBLAS
(o: 14.5 against 14.6 us), but a prologue costs what it saves: every program recomputes its activation
tiles (and with the norm, the rows' statistic), M times the work of M = 1 for the same weight bytes.
rms_linear qkv 55.7 us against 19.9 for add_rms_norm + cuBLAS, gate_up 121.2 against 68.8, glu_linear
down 61.1 against 38.1; a layer's chain 243.5 against 132.5 us (the best swept configs 164.8, the norms
as their own launches 156.6). So the engine runs M > 1 on cuBLAS (engine/model.py GEMV_ROWS).
At M = 1, configs chosen in the chain of a layer's four GEMMs (bench_gemv.py --chain-sweep) made the
chain 2.2% faster but the engine's B=1 step 0.2%: the defaults stay.
"""
from __future__ import annotations

import functools

import torch

from vattn.errors import VattnError
from vattn.kernels.common import (check_runnable, next_pow2, resolve_pdl, target_programs, use_ieee,
                                  zeroed_counters)
from vattn.kernels.layer_ops import ACTS, rope_targets

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MAX_ROWS = 16
TUNING = ("block_n", "block_k", "num_warps", "num_stages", "split_k", "dot")


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    from vattn.kernels._online import pdl_wait
    from vattn.kernels._rounding import rms_apply as _norm, round_to as _round

    @triton.jit
    def _rstd(ss, K, eps):
        return (1.0 / tl.sqrt(ss / K + eps))[:, None]

    @triton.jit
    def _wtile(wp, k0, kk, K, EVEN_K: tl.constexpr):
        if EVEN_K:
            return tl.load(wp + k0)
        return tl.load(wp + k0, mask=(k0 + kk < K)[None, :], other=0.0)

    @triton.jit
    def _resid(x, delta, wd, off, m, k, km, rstd_d, T: tl.constexpr, HAS_DELTA: tl.constexpr,
               NORM_DELTA: tl.constexpr, GEMMA: tl.constexpr):
        # the residual tile h = x + [rms(delta, wd)] in float32 (values of T), as add_rms_norm_ref
        h = tl.load(x + off, mask=m, other=0.0).to(tl.float32)
        if HAS_DELTA:
            d = tl.load(delta + off, mask=m, other=0.0).to(tl.float32)
            if NORM_DELTA:  # Gemma's sandwich norm: the sublayer output is normed before the add
                wdk = tl.load(wd + k[None, :], mask=km[None, :], other=0.0).to(tl.float32)  # 2-D: x's layout
                d = _norm(d, rstd_d, wdk, T, GEMMA).to(tl.float32)
            h = _round(h + d, T).to(tl.float32)
        return h

    @triton.jit
    def _atile(x, delta, nw, wd, k0, kk, r, rm, sxm, K, rstd_d, rstd, T: tl.constexpr, PRO: tl.constexpr,
               HAS_DELTA: tl.constexpr, NORM_DELTA: tl.constexpr, GEMMA: tl.constexpr, ACT: tl.constexpr):
        # the activation tile [MP, BK] in T: x (PRO 0), rms(x + delta) (1), act(gate) * up (2)
        k = k0 + kk
        km = k < K
        m = rm[:, None] & km[None, :]
        off = r[:, None] * sxm + k[None, :]
        if PRO == 0:
            a = tl.load(x + off, mask=m, other=0.0)
        elif PRO == 1:
            h = _resid(x, delta, wd, off, m, k, km, rstd_d, T, HAS_DELTA, NORM_DELTA, GEMMA)
            a = _norm(h, rstd, tl.load(nw + k[None, :], mask=km[None, :], other=0.0).to(tl.float32), T, GEMMA)
        else:
            g = tl.load(x + off, mask=m, other=0.0).to(tl.float32)
            u = tl.load(x + off + K, mask=m, other=0.0).to(tl.float32)
            if ACT == 0:  # SiLU
                s = g / (1.0 + tl.exp(-g))
            else:  # gelu, tanh approximation, as layer_ops.glu: g sigmoid(2y)
                s = g / (1.0 + tl.exp(-1.5957691216057308 * (g + 0.044715 * g * g * g)))
            a = _round(_round(s, T).to(tl.float32) * u, T)  # torch rounds act(g), then the product
        return a

    @triton.jit
    def _mac(acc, a, wt, MP: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr, VEC: tl.constexpr):
        # acc += a [MP, BK] @ wt [BN, BK]^T: acc [BN, MP] with DOT (transposed), [MP, BN] for the CUDA-core
        # product at M > 1, [BN, BK / VEC] at M = 1: each thread adds up its own VEC-element vectors (no
        # cross-thread reduction in the loop)
        if DOT:  # swapped: acc [BN, MP] += wt @ a^T, the weight tile in the MMA's M dim (BN >= 64 fills it)
            if IEEE:
                acc = tl.dot(wt.to(tl.float32), tl.trans(a.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(wt, tl.trans(a), acc)
        elif MP == 1:
            p = wt.to(tl.float32) * a.to(tl.float32)
            acc += tl.sum(tl.reshape(p, [p.shape[0], p.shape[1] // VEC, VEC]), 2)
        else:
            acc += tl.sum(a.to(tl.float32)[:, None, :] * wt.to(tl.float32)[None, :, :], 2)
        return acc

    @triton.jit
    def _rope_store(acc, j, pos, cos, sin, q, k, v, rows, sqb, sqh, skb, skh, skt, svb, svh, svt, HQ, HKV,
                    T: tl.constexpr, BN: tl.constexpr, HALF: tl.constexpr, Q_ROWS: tl.constexpr):
        # ROPE's epilogue at M = 1: lanes 2i, 2i + 1 hold dims d, d + D/2 of one head (q heads, then
        # k, then v), rounded to T as the qkv output; q and k rotated as qkv_rope's kernel rounds,
        # q stored to its row, k and v to the cache at (rows[0], head, pos)
        x0, x1 = tl.split(tl.reshape(_round(acc, T).to(tl.float32), [BN // 2, 2]))
        d = (j * (BN // 2) + tl.arange(0, BN // 2)) % HALF
        h = (j * (BN // 2)) // HALF  # one head a program (HALF % (BN / 2) == 0)
        p = tl.load(pos)
        slot = tl.load(rows)
        if h < HQ + HKV:
            c0 = _round(tl.load(cos + p * 2 * HALF + d), T).to(tl.float32)
            c1 = _round(tl.load(cos + p * 2 * HALF + d + HALF), T).to(tl.float32)
            s0 = _round(tl.load(sin + p * 2 * HALF + d), T).to(tl.float32)
            s1 = _round(tl.load(sin + p * 2 * HALF + d + HALF), T).to(tl.float32)
            r0 = _round(_round(x0 * c0, T).to(tl.float32) - _round(x1 * s0, T).to(tl.float32), T)
            x1 = _round(_round(x1 * c1, T).to(tl.float32) + _round(x0 * s1, T).to(tl.float32), T).to(tl.float32)
            x0 = r0.to(tl.float32)
        if h < HQ:
            if Q_ROWS:
                dst = q + slot * sqb + h * sqh
            else:
                dst = q + h * sqh
        elif h < HQ + HKV:
            dst = k + slot * skb + (h - HQ) * skh + p * skt
        else:
            dst = v + slot * svb + (h - HQ - HKV) * svh + p * svt
        tl.store(dst + d, x0.to(T))
        tl.store(dst + d + HALF, x1.to(T))

    # jit bodies resolve helpers in module globals
    globals().update(_round=_round, _norm=_norm, _rstd=_rstd, _wtile=_wtile, _resid=_resid, _atile=_atile,
                     _mac=_mac, _rope_store=_rope_store, pdl_wait=pdl_wait)

    @triton.jit
    def gemv_kernel(x, delta, nw, wd, w, bias, y, h_out, ws, ctr, M, N, K, sxm, swn, KS, eps,
                    pos, cos, sin, k_out, v_out, rows, sqb, sqh, skb, skh, skt, svb, svh, svt, HQ, HKV,
                    MP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BKN: tl.constexpr, SPLIT: tl.constexpr,
                    PRO: tl.constexpr, HAS_DELTA: tl.constexpr, NORM_DELTA: tl.constexpr, GEMMA: tl.constexpr,
                    WRITE_H: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                    IEEE: tl.constexpr, EVEN_K: tl.constexpr, VEC: tl.constexpr, STAGES: tl.constexpr,
                    NS_NORM: tl.constexpr, ROPE: tl.constexpr = 0, HALF: tl.constexpr = 1,
                    Q_ROWS: tl.constexpr = 0, PDL: tl.constexpr = 0):
        T = y.dtype.element_ty
        j = tl.program_id(0)
        s = tl.program_id(1)
        if ROPE:  # pair-interleaved columns: lane 2i a head's dim d, lane 2i + 1 its dim d + D/2
            lane = tl.arange(0, BN)
            pair = j * (BN // 2) + lane // 2
            n = (pair // HALF) * (2 * HALF) + pair % HALF + (lane % 2) * HALF
        else:
            n = j * BN + tl.arange(0, BN)
        nc = tl.minimum(n, N - 1).to(tl.int64)  # rows past N re-read row N - 1: loads need no mask
        kk = tl.arange(0, BK)
        k_lo = s * KS
        k_hi = tl.minimum(k_lo + KS, K)
        wp = w + nc[:, None] * swn + kk[None, :]
        wt = _wtile(wp, k_lo, kk, K, EVEN_K)  # weights do not depend on the previous kernel: before the wait
        if ROPE:  # the attention follows: its programs, scheduled early to wait, slowed this launch 3x
            pdl_wait(PDL, 0)
        else:
            pdl_wait(PDL)
        r = tl.arange(0, MP)
        rm = r < M
        rstd_d = tl.full([MP, 1], 1.0, tl.float32)
        rstd = tl.full([MP, 1], 1.0, tl.float32)
        if PRO == 1:  # the rows' RMS statistics (every program: no second launch); (0, 0) writes h
            kn = tl.arange(0, BKN)
            first = tl.full([MP, BKN], j + s, tl.int32) == 0
            if NORM_DELTA:
                ss = tl.zeros([MP], tl.float32)
                for k0 in tl.range(0, K, BKN, num_stages=NS_NORM):
                    k = k0 + kn
                    m = rm[:, None] & (k < K)[None, :]
                    d = tl.load(delta + r[:, None] * sxm + k[None, :], mask=m, other=0.0).to(tl.float32)
                    ss += tl.sum(d * d, 1)
                rstd_d = _rstd(ss, K, eps)
            ss = tl.zeros([MP], tl.float32)
            for k0 in tl.range(0, K, BKN, num_stages=NS_NORM):
                k = k0 + kn
                km = k < K
                m = rm[:, None] & km[None, :]
                off = r[:, None] * sxm + k[None, :]
                h = _resid(x, delta, wd, off, m, k, km, rstd_d, T, HAS_DELTA, NORM_DELTA, GEMMA)
                if WRITE_H:
                    tl.store(h_out + off, h.to(T), mask=m & first)  # h holds values of T: exact
                ss += tl.sum(h * h, 1)
            rstd = _rstd(ss, K, eps)
        if DOT:
            acc = tl.zeros([BN, MP], tl.float32)
        elif MP > 1:
            acc = tl.zeros([MP, BN], tl.float32)
        else:
            acc = tl.zeros([BN, BK // VEC], tl.float32)
        a = _atile(x, delta, nw, wd, k_lo, kk, r, rm, sxm, K, rstd_d, rstd, T, PRO, HAS_DELTA, NORM_DELTA, GEMMA, ACT)
        acc = _mac(acc, a, wt, MP, DOT, IEEE, VEC)
        for k0 in tl.range(k_lo + BK, k_hi, BK, num_stages=STAGES):  # dot or not: streamed through shared memory
            wt = _wtile(wp, k0, kk, K, EVEN_K)
            a = _atile(x, delta, nw, wd, k0, kk, r, rm, sxm, K, rstd_d, rstd, T, PRO, HAS_DELTA, NORM_DELTA, GEMMA,
                       ACT)
            acc = _mac(acc, a, wt, MP, DOT, IEEE, VEC)
        if DOT:
            acc = tl.trans(acc)
        elif MP == 1:
            acc = tl.sum(acc, 1)[None, :]
        ym = rm[:, None] & (n < N)[None, :]
        yp = y + r[:, None] * N + n[None, :]
        if SPLIT == 1:
            if HAS_BIAS:
                acc += tl.load(bias + nc).to(tl.float32)[None, :]
            if ROPE:
                _rope_store(acc, j, pos, cos, sin, y, k_out, v_out, rows, sqb, sqh, skb, skh, skt, svb, svh, svt,
                            HQ, HKV, T, BN, HALF, Q_ROWS)
            else:
                tl.store(yp, _round(acc, T), mask=ym)
        else:  # deterministic split-K: the last program of column block j sums the partials in order
            c = tl.arange(0, BN)
            wsj = ws + (j * SPLIT * MP + r[:, None]) * BN + c[None, :]
            tl.store(wsj + s * MP * BN, acc)
            tl.debug_barrier()
            done = tl.atomic_add(ctr + j, 1, sem="acq_rel")
            if done == SPLIT - 1:
                tot = tl.zeros([MP, BN], tl.float32)
                for i in range(SPLIT):
                    tot += tl.load(wsj + i * MP * BN, volatile=True)
                if HAS_BIAS:
                    tot += tl.load(bias + nc).to(tl.float32)[None, :]
                tl.store(yp, _round(tot, T), mask=ym)
                tl.store(ctr + j, 0)  # every split has counted: zero again for the next call (no memset)

    return gemv_kernel


# ------------------------------------------------------------------ configuration

def default_config(M: int, N: int, K: int, dtype=torch.bfloat16, programs: int = 264) -> dict:
    """The tuning knobs for an [M, K] x [N, K]^T product (see the module docstring); any of them can be
    overridden by keyword. programs: about how many programs fill the device (two per SM). M = 1: guesses
    and one measured rule (below), kept over the H200 sweep's per-op winners (module docstring). M > 1:
    tensor cores with the weight tile in the MMA's M dim (64 output columns a program), K split until
    about `programs` run, each split keeping at least 4 K tiles to pipeline."""
    if M == 1:  # CUDA-core GEMV; block_k = 32 num_warps x (16 bytes of elements): no layout conversion a tile
        # 2 warps (half the tile, the shared memory) where 4 would take one to two waves of programs at
        # ~4 an SM and 2 fit one: Llama-3-8B's qkv (768 programs), B=1 32K step 5.42 -> 5.325 ms (H200);
        # o and down (512) and gate|up (3584) ran slower at 2
        nw = 2 if 2 * programs < -(-N // 8) <= 4 * programs else 4
        return dict(block_n=8, block_k=min(max(16, next_pow2(K)), 32 * nw * (16 // dtype.itemsize)),
                    num_warps=nw, num_stages=3, split_k=1, dot=False)
    bn, bk = 64, 128
    split = max(1, min(-(-programs // -(-N // bn)), K // (4 * bk)))
    return dict(block_n=bn, block_k=bk, num_warps=4, num_stages=4, split_k=split, dot=True)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _config(M, N, K, dtype, tuning, programs: int) -> dict:
    bad = sorted(set(tuning) - set(TUNING))
    if bad:
        raise VattnError(f"unknown tuning keyword(s) {bad}; the gemv kernels take {list(TUNING)}")
    cfg = default_config(M, N, K, dtype, programs)
    cfg.update({k: v for k, v in tuning.items() if v is not None})
    cfg["dot"] = bool(cfg["dot"])
    for name in ("block_n", "block_k"):
        v = cfg[name]
        if not isinstance(v, int) or v < 1 or v & (v - 1):
            raise VattnError(f"{name}={v!r}: use a power of two")
    if cfg["dot"] and min(cfg["block_n"], cfg["block_k"]) < 16:
        raise VattnError(f"dot=True (tensor cores) needs block_n and block_k >= 16, got {cfg['block_n']}, "
                         f"{cfg['block_k']}: raise them or pass dot=False")
    if not isinstance(cfg["split_k"], int) or cfg["split_k"] < 1:
        raise VattnError(f"split_k={cfg['split_k']!r}: use an int >= 1")
    cfg["block_k"] = min(cfg["block_k"], max(16, next_pow2(K)))  # no tile wider than the padded row
    return cfg


# ------------------------------------------------------------------ checks and launch

def _check_act(name, t, dtype=None):
    if t.dtype not in FLOATS:
        raise VattnError(f"{name} has dtype {t.dtype}; the gemv kernels take {[str(f) for f in FLOATS]}")
    if dtype is not None and t.dtype != dtype:
        raise VattnError(f"{name} is {t.dtype} but x is {dtype}: cast it to {dtype} (one dtype for activations "
                         "and weights)")
    if not t.is_contiguous():
        raise VattnError(f"{name} must be contiguous (got shape {tuple(t.shape)}, strides {tuple(t.stride())}): "
                         "call .contiguous() first")


def _rows(name, x, width) -> int:
    """M, the rows of x [..., width]: 1..MAX_ROWS."""
    if x.dim() < 1 or x.numel() == 0:
        raise VattnError(f"{name} must be a non-empty [..., {width}] tensor, got shape {tuple(x.shape)}")
    M = x.numel() // x.shape[-1]
    if M > MAX_ROWS:
        raise VattnError(f"{name} has {M} rows (shape {tuple(x.shape)}); the gemv kernels take 1..{MAX_ROWS} "
                         "(decode): use F.linear for more")
    return M


def _check_w(w, K, dtype, what):
    if w.dim() != 2 or w.shape[1] != K:
        raise VattnError(f"w must be [N, {K}] ({what}), got shape {tuple(w.shape)}")
    if w.dtype != dtype:
        raise VattnError(f"w is {w.dtype} but x is {dtype}: cast the weight or the activations to one dtype")
    if w.stride(1) != 1:
        raise VattnError(f"w must have last-dim stride 1 (nn.Linear layout), got strides {tuple(w.stride())}: "
                         "call .contiguous() first")
    return w.shape[0]


def _check_vec(name, t, n, dtype=None):
    if t is None:
        return
    if t.shape != (n,) or not t.is_contiguous():
        raise VattnError(f"{name} must be a contiguous [{n}] vector, got shape {tuple(t.shape)}")
    if t.dtype not in FLOATS or (dtype is not None and t.dtype != dtype):
        raise VattnError(f"{name} is {t.dtype}: use {dtype or 'a float dtype'}")


def _check_out(name, t, shape, dtype):
    if t.shape != shape or t.dtype != dtype or not t.is_contiguous():
        raise VattnError(f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)}, got {t.dtype} "
                         f"{tuple(t.shape)} (contiguous: {t.is_contiguous()})")


def _launch(x, w, bias, out, pdl, tuning, *, M, K, sxm, lead, pro=0, delta=None, nw=None, wd=None, h_out=None,
            gemma=False, eps=0.0, act=0, rope=None):
    N = w.shape[0]
    _check_vec("bias", bias, N, x.dtype)
    rope_args = None
    if rope is not None:
        if out is not None:
            raise VattnError("rope= stores q, k and v where cache says, not y: pass out=None")
        rope_args, out = _rope_args(rope, M, N, x)
    elif out is None:
        out = torch.empty(*lead, N, dtype=x.dtype, device=x.device)
    else:
        _check_out("out", out, (*lead, N), x.dtype)
        if any(t is not None and out.data_ptr() == t.data_ptr() for t in (x, delta, h_out)):
            raise VattnError("out must not be an input or h_out: other programs still read the inputs while "
                             "one writes y; pass a separate buffer")
    check_runnable(x, w)
    dev = x.device
    pdl = resolve_pdl(pdl, dev)
    cfg = _config(M, N, K, x.dtype, tuning, target_programs(dev))
    bn, bk = cfg["block_n"], cfg["block_k"]
    if rope is not None and (cfg["dot"] or cfg["split_k"] != 1 or bn < 2 or rope_args["HALF"] % (bn // 2)):
        raise VattnError(f"rope= runs with the single-row config (dot=False, split_k=1, block_n dividing the head "
                         f"dim {2 * rope_args['HALF']}); got {cfg}")
    mp = max(16, next_pow2(M)) if cfg["dot"] else next_pow2(M)
    ks = _cdiv(_cdiv(K, cfg["split_k"]), bk) * bk  # a split's K range: whole tiles
    split = _cdiv(K, ks)  # no empty split
    tiles = _cdiv(N, bn)
    bkn = min(max(16, next_pow2(K)), max(bk, 4096 // mp))  # the norm pre-pass's tile: a whole row at M = 1
    if split > 1:
        ws = torch.empty(tiles * split * mp * bn, dtype=torch.float32, device=dev)
        ctr = zeroed_counters(tiles, dev)
    else:
        ws = ctr = out
    extra = dict(PDL=1, launch_pdl=True) if pdl else {}
    _kernel()[(tiles, split)](
        x, x if delta is None else delta, x if nw is None else nw, x if wd is None else wd, w,
        x if bias is None else bias, out, out if h_out is None else h_out, ws, ctr,
        M, N, K, sxm, w.stride(0), ks, float(eps),
        MP=mp, BN=bn, BK=bk, BKN=bkn, SPLIT=split, PRO=pro, HAS_DELTA=delta is not None, NORM_DELTA=wd is not None,
        GEMMA=bool(gemma), WRITE_H=h_out is not None, ACT=act, HAS_BIAS=bias is not None, DOT=cfg["dot"],
        IEEE=use_ieee(x.dtype), EVEN_K=K % bk == 0, VEC=min(bk, 16 // x.element_size()), STAGES=cfg["num_stages"],
        NS_NORM=1 if bkn >= K else cfg["num_stages"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **(rope_args or dict(_NO_ROPE, pos=x, cos=x, sin=x, k_out=x, v_out=x, rows=x)), **extra)
    return out


_NO_ROPE = dict(sqb=0, sqh=0, skb=0, skh=0, skt=0, svb=0, svh=0, svt=0, HQ=0, HKV=0)  # and x for the pointers


def _rope_args(rope, M, N, x):
    """rms_linear's rope=(pos, cos, sin, heads, kv_heads, cache) -> (the kernel's RoPE arguments, q)."""
    pos, cos, sin, heads, kv_heads, cache = rope
    if M != 1 or cache is None:
        raise VattnError(f"rope= fuses RoPE and the KV write into a single-row step's qkv GEMM: it takes one row "
                         f"(got {M}) and a cache=(K, V, rows[, Q]); use layer_ops.qkv_rope otherwise")
    D, q, q_rows = rope_targets(1, 1, N, x.dtype, x.device, pos, cos, sin, heads, kv_heads, cache)
    K, V, rows = cache[:3]
    return dict(pos=pos, cos=cos, sin=sin, k_out=K, v_out=V, rows=rows, sqb=q.stride(0), sqh=q.stride(1),
                skb=K.stride(0), skh=K.stride(1), skt=K.stride(2), svb=V.stride(0), svh=V.stride(1),
                svt=V.stride(2), HQ=heads, HKV=kv_heads, ROPE=1, HALF=D // 2, Q_ROWS=q_rows), q


def linear(x, w, *, bias=None, out=None, pdl=None, **tuning):
    """y = x @ w.T (+ bias), one launch: x contiguous [..., K] with 1..16 rows, w [N, K] -> y [..., N].
    out: a contiguous [..., N] tensor to write y into. pdl: launch as a programmatic dependent of the
    previous kernel (None: where available, see common.use_pdl). tuning: see default_config."""
    _check_act("x", x)
    K = x.shape[-1] if x.dim() else 0
    M = _rows("x", x, K)
    _check_w(w, K, x.dtype, "x's last dim")
    return _launch(x, w, bias, out, pdl, tuning, M=M, K=K, sxm=K, lead=tuple(x.shape[:-1]))


def rms_linear(x, delta, norm_w, w, eps: float, gemma: bool = False, *, w_delta=None, h_out=None, bias=None,
               out=None, pdl=None, rope=None, **tuning):
    """(h, y): h = x + delta (delta first normed by w_delta: Gemma's sandwich), y = rms(h, norm_w) @ w.T
    (+ bias), in one launch; rms as layer_ops.rms_norm_ref (plain: norm_w in x's dtype; gemma: norm_w
    is the float32 (1 + w)). Equals `hn, h = add_rms_norm_ref(x, delta, norm_w, eps, gemma, w_delta);
    y = F.linear(hn, w, bias)`. x, delta contiguous [..., K] (1..16 rows); delta None: h = x (the
    first layer's input norm), returned as x itself unless h_out is given. h_out: where h is written
    (default a new tensor; it must not be x or delta: other programs still read them).
    rope=(pos, cos, sin, heads, kv_heads, cache), one row, w the fused qkv projection: y is not
    stored; its q and k heads are rotated and q, k, v placed as layer_ops.qkv_rope(y, pos, cos,
    sin, heads, kv_heads, cache=cache) places them (no q/k norm), and (h, q) returned: the RoPE
    launch of a single-row decode step folded into this one."""
    _check_act("x", x)
    K = x.shape[-1] if x.dim() else 0
    M = _rows("x", x, K)
    if delta is not None:
        _check_act("delta", delta, x.dtype)
        if delta.shape != x.shape:
            raise VattnError(f"delta must have x's shape {tuple(x.shape)}, got {tuple(delta.shape)}")
    elif w_delta is not None:
        raise VattnError("w_delta norms delta: pass delta too")
    _check_vec("norm_w", norm_w, K, None if gemma else x.dtype)
    _check_vec("w_delta", w_delta, K, None if gemma else x.dtype)
    _check_w(w, K, x.dtype, "x's last dim")
    if h_out is None and delta is not None:
        h_out = torch.empty_like(x)
    elif h_out is not None:
        _check_out("h_out", h_out, tuple(x.shape), x.dtype)
        if any(t is not None and h_out.data_ptr() == t.data_ptr() for t in (x, delta)):
            raise VattnError("h_out must not be x or delta: the kernel's other programs still read them while "
                             "one writes h; pass a separate buffer")
    y = _launch(x, w, bias, out, pdl, tuning, M=M, K=K, sxm=K, lead=tuple(x.shape[:-1]), pro=1, delta=delta,
                nw=norm_w, wd=w_delta, h_out=h_out, gemma=gemma, eps=eps, rope=rope)
    return (x if h_out is None else h_out), y


def glu_linear(gu, act: str, w, *, bias=None, out=None, pdl=None, **tuning):
    """y = (act(gate) * up) @ w.T (+ bias), one launch, as F.linear(layer_ops.glu_ref(gu, act), w, bias):
    gu contiguous [..., 2I] = [gate | up] with 1..16 rows, act one of layer_ops.ACTS, w [N, I] (the down
    projection) -> y [..., N]."""
    if act not in ACTS:
        raise VattnError(f"glu_linear runs the activations {sorted(ACTS)}, not {act!r}: use glu_ref then F.linear")
    _check_act("gu", gu)
    width = gu.shape[-1] if gu.dim() else 0
    if width % 2:
        raise VattnError(f"gu must be [..., 2I] (gate | up), got an odd last dim {width}")
    M = _rows("gu", gu, width)
    _check_w(w, width // 2, gu.dtype, "half of gu's last dim")
    return _launch(gu, w, bias, out, pdl, tuning, M=M, K=width // 2, sxm=width, lead=tuple(gu.shape[:-1]), pro=2,
                   act=ACTS[act])
