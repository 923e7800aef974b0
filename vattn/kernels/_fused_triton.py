"""Triton kernel behind vattn.kernels.fused (imported lazily: needs triton). See fused.py.

One kernel, three phases per program (row, sp) of a row's S programs, the work of the scan
pipeline's three kernels (same cut, budget and draws):
 1. histogram its subsample blocks (sp, sp + S, ... of P), score its pilot slice, score the
    first block of its span;
 2. the cut from the row's P histograms, compact the span's exact keys, attend them;
 3. the budget from D_F (phase 2's partials) and the pilot, attend its blocks of draws.
PH = 0 runs the three in one launch with a spin barrier per row between them (every program
must be resident at once: fused.py sizes the grid from the kernel's occupancy); PH = 1, 2, 3
runs one phase per launch (the interpreter, or rows that do not fit).
"""
import triton
import triton.language as tl

from vattn.kernels._bits_triton import qwords
from vattn.kernels._online import dot_qk, finish, load_cg, merge_block, online_step  # noqa: F401 (jit globals)
from vattn.kernels._scan_triton import (_bins, _cut, _draw, _mid, _pilot, _query, _row_pre, _sample_part,
                                        _scan_part, _stamp, _taken, _wbins, _words, _write_partial)
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

__all__ = ["fused_kernel", "_query", "_taken"]


@triton.jit
def _row_sync(ctr, target):
    """Wait until the row's counter reaches target, after adding this program's 1 (its writes
    before this call are visible to the row's programs after theirs)."""
    tl.debug_barrier()
    cur = tl.atomic_add(ctr, 1, sem="acq_rel") + 1
    while cur < target:
        cur = tl.atomic_add(ctr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _row_cut(hist, row, P, n_mid, K, NH: tl.constexpr, PP: tl.constexpr):
    """(tau, thu) from the row's P subsample histograms (every program computes the same)."""
    p = tl.arange(0, PP)
    v = tl.arange(0, NH)
    tile = tl.load(hist + (row * P + p[:, None]) * NH + v[None, :], mask=(p < P)[:, None], other=0,
                   cache_modifier=".cg")
    return _cut(tl.sum(tile, 0), n_mid, K, NH)


@triton.jit
def _hist_part(qv, qq, ks, kb, skn, hist, pil, pbin, row, b, sp, S, P, STRIDE, hi, sink, n_mid, m0, skey, H, N,
               scale_log2, G: tl.constexpr, R: tl.constexpr, M: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
               D: tl.constexpr, RWP: tl.constexpr, NH: tl.constexpr, SH: tl.constexpr, BH: tl.constexpr,
               CL: tl.constexpr, M0P: tl.constexpr, PC: tl.constexpr, HW: tl.constexpr, IEEE: tl.constexpr):
    """Phase 1: histograms of subsample blocks sp, sp + S, ... of P (as the scan's cut kernel:
    runs of CL keys, one every CL * STRIDE middle keys) into hist[row, p]; pilot draws
    [sp * PC, (sp + 1) * PC): pil scores, pbin score bins."""
    lane = tl.arange(0, BH)
    v = tl.arange(0, NH)
    for p in range(sp, P, S):
        n = sink + p * (BH * STRIDE) + (lane // CL) * (CL * STRIDE) + lane % CL
        inr = n < hi
        hc = tl.histogram(_bins(qv, ks, row, b, n, inr, H, N, G, R, W, WP, RWP, HW, SH, NH), NH, mask=inr)
        tl.store(hist + (row * P + p) * NH + v, hc)
    i = sp * PC + tl.arange(0, PC)
    pok = i < tl.where(n_mid > 0, m0, 0)
    xp = _draw(i, skey, sink, n_mid)
    d = tl.arange(0, D)
    kp = tl.load(kb + xp.to(tl.int64)[:, None] * skn + d[None, :], mask=pok[:, None], other=0.0)
    pb = _bins(qv, ks, row, b, xp, pok, H, N, G, R, W, WP, RWP, HW, SH, NH)
    spl = dot_qk(qq, kp, IEEE) * scale_log2
    r = tl.arange(0, M)
    tl.store(pil + (row * R + r)[:, None] * M0P + i[None, :], spl, mask=(r < R)[:, None] & pok[None, :])
    tl.store(pbin + row * M0P + i, pb, mask=pok)


@triton.jit(do_not_specialize=["seed"])
def fused_kernel(q, proj, ks, k, v, lens, hist, ctr, cut, pil, pbin, scr, cnt, po, plse, stats, out, tr,
                 sqb, sqh, sqt, skb, skh, skn, svb, svh, svn, H, N, S, P, STRIDE, sink, window, K, m0, seed,
                 scale_log2, zz, eps2, infl, G: tl.constexpr, R: tl.constexpr, M: tl.constexpr, W: tl.constexpr,
                 WP: tl.constexpr, D: tl.constexpr, RWP: tl.constexpr, NH: tl.constexpr, SH: tl.constexpr,
                 SPP: tl.constexpr, SP2: tl.constexpr, PP: tl.constexpr, M0P: tl.constexpr, PC: tl.constexpr,
                 BH: tl.constexpr,
                 CL: tl.constexpr, CB: tl.constexpr, BN: tl.constexpr, HW: tl.constexpr, IEEE: tl.constexpr,
                 PH: tl.constexpr, PDL: tl.constexpr = 0, TR: tl.constexpr = 0):
    """Program (row, sp) of S per row: span sp of the row's keys (phases 1, 2; partial column sp
    of 2 S) and draw blocks sp, sp + S, ... (phase 3; column S + sp); with PH = 0 also a share
    of the row's merge into out. cnt [rows, 2 S]: keys attended. ctr [rows]: zero before the
    launch, and zero after it (the row's last program resets it)."""
    row = tl.program_id(0)
    sp = tl.program_id(1)
    _stamp(tr, 0, sp, TR)
    if PDL:  # q, k, v may come from the previous launch. No early launch_dependents: a
        gdc_wait()  # dependent's programs must not take the slots this launch's programs wait for
    b, L, hi, skey, tkey, qq, kb, vb = _row_pre(q, lens, k, v, seed, row, H, sqb, sqh, sqt, skb, skh, svb, svh,
                                                window, R, M, D)
    n_mid = tl.maximum(hi - sink, 0)
    chunk = tl.cdiv(tl.cdiv(L, S), CB) * CB
    start = sp * chunk
    end = tl.minimum(start + chunk, L)
    qv = qwords(q, q, proj, row, b, H, 1, sqb, sqh, sqt, R, W, D, RWP, True)
    if PH <= 1:
        _hist_part(qv, qq, ks, kb, skn, hist, pil, pbin, row, b, sp, S, P, STRIDE, hi, sink, n_mid, m0, skey, H,
                   N, scale_log2, G, R, M, W, WP, D, RWP, NH, SH, BH, CL, M0P, PC, HW, IEEE)
    if PH == 0 or PH == 2:  # the span's first block scored, the second block's words in flight
        n = start + tl.arange(0, CB)
        s = _wbins(qv, _words(ks, row, b, n, _mid(n, end, sink, hi), H, N, G, R, W, WP), R, W, WP, RWP, HW, SH, NH)
        w_nx = _words(ks, row, b, n + CB, _mid(n + CB, end, sink, hi), H, N, G, R, W, WP)
    if PH == 0:
        _row_sync(ctr + row, S)
    _stamp(tr, 1, sp, TR)
    if PH == 0 or PH == 2:
        t, tu = _row_cut(hist, row, P, n_mid, K, NH, PP)
        if sp == 0:
            f = tl.arange(0, 2)
            tl.store(cut + row * 2 + f, tl.where(f == 0, t, tu))
        m_i, l_i, acc, c = _scan_part(qv, s, w_nx, qq, ks, kb, vb, skn, svn, scr, tr, row, b, start, end, hi, sink,
                                      t, tu, tkey, H, N, scale_log2, G, R, M, W, WP, D, RWP, NH, SH, CB, BN, HW, IEEE,
                                      0)
        _write_partial(po, plse, acc, m_i, l_i, 0.0, row, sp, 2 * S, R, M, D)
        tl.store(cnt + row * 2 * S + sp, c)
        _stamp(tr, 2, c, TR)
        if PH == 0:
            _row_sync(ctr + row, 2 * S)
    _stamp(tr, 3, sp, TR)
    if PH == 0 or PH == 3:
        if PH == 3:
            t, tu = _row_cut(hist, row, P, n_mid, K, NH, PP)
        spl = _pilot(pil, pbin, row, n_mid, m0, sink, skey, t, tu, tkey, R, M, M0P)
        x_nx = _draw(sp * BN + tl.arange(0, BN), skey, sink, n_mid)
        w_nx = _words(ks, row, b, x_nx, x_nx < sink + n_mid, H, N, G, R, W, WP)
        m_i, l_i, acc, lw2, c = _sample_part(qv, spl, x_nx, w_nx, qq, ks, kb, vb, skn, svn, plse, stats, tr, row, b,
                                             sp, S, S, sink, n_mid, K, m0, t, tu, skey, tkey, H, N, scale_log2, zz,
                                             eps2, infl, G, R, M, W, WP, D, RWP, NH, SH, BN, M0P, SPP, HW, IEEE, 0)
        _write_partial(po, plse, acc, m_i, l_i, lw2, row, S + sp, 2 * S, R, M, D)
        tl.store(cnt + row * 2 * S + S + sp, c)
    if PH == 0:  # the merge, R * D / 32 blocks of 32 outputs per row shared by its programs
        _row_sync(ctr + row, 3 * S)
        U: tl.constexpr = D // 32
        for u in range(sp, R * U, S):
            merge_block(po, plse, out, (row * R + u // U).to(tl.int64), (u % U) * 32 + tl.arange(0, 32), 2 * S, D, 32,
                        SP2, min(SP2, 64), True)
        tl.debug_barrier()
        if tl.atomic_add(ctr + row, 1, sem="acq_rel") == 4 * S - 1:  # every program is past its waits
            tl.atomic_xchg(ctr + row, 0)
    _stamp(tr, 4, sp, TR)
    if PDL:
        gdc_launch_dependents()
