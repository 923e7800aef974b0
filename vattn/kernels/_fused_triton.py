"""Triton kernel behind vattn.kernels.fused (imported lazily: needs triton). See fused.py.

One kernel, three phases per program (row, sp) of a row's S programs:
 1. score its span's keys (bins kept as bytes), histogram them, score its pilot slice;
 2. the cut from the row's full histogram, compact the span's exact keys, attend them;
 3. the budget from D_F (phase 2's partials) and the pilot, attend its blocks of draws.
PH = 0 runs the three in one launch with a spin barrier per row between them (every program
must be resident at once: fused.py sizes the grid from the kernel's occupancy); PH = 1, 2, 3
runs one phase per launch (the interpreter, or rows that do not fit).
"""
import triton
import triton.language as tl

from vattn.kernels._bits_triton import qwords
from vattn.kernels._online import dot_qk, finish, online_step  # noqa: F401 (jit globals)
from vattn.kernels._scan_triton import (_bins, _compact_block, _cut, _draw, _gather, _mid, _pilot, _query,
                                        _row_pre, _sample_part, _stamp, _taken, _wbins, _words, _write_partial)
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

__all__ = ["fused_kernel", "_taken"]


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
def _row_cut(hist, row, S, n_mid, K, NH: tl.constexpr, SPP: tl.constexpr):
    """(tau, thu) from the row's S span histograms (every program computes the same)."""
    p = tl.arange(0, SPP)
    v = tl.arange(0, NH)
    tile = tl.load(hist + (row * S + p[:, None]) * NH + v[None, :], mask=(p < S)[:, None], other=0,
                   cache_modifier=".cg")
    return _cut(tl.sum(tile, 0), n_mid, K, NH)


@triton.jit
def _hist_part(qv, qq, ks, kb, skn, bins8, hist, pil, pbin, row, b, sp, S, start, end, hi, sink, n_mid, m0, skey,
               H, N, scale_log2, G: tl.constexpr, R: tl.constexpr, M: tl.constexpr, W: tl.constexpr,
               WP: tl.constexpr, D: tl.constexpr, RWP: tl.constexpr, NH: tl.constexpr, SH: tl.constexpr,
               CB: tl.constexpr, M0P: tl.constexpr, PC: tl.constexpr, HW: tl.constexpr, IEEE: tl.constexpr):
    """Phase 1: score bins of the span's middle keys into bins8 (bytes) and their histogram
    into hist[row, sp]; pilot draws [sp * PC, (sp + 1) * PC): pil scores, pbin bins."""
    hc = tl.zeros([NH], tl.int32)
    b8 = bins8 + row.to(tl.int64) * N
    n = start + tl.arange(0, CB)
    w_nx = _words(ks, row, b, n, _mid(n, end, sink, hi), H, N, G, R, W, WP)
    for n0 in range(start, end, CB):
        n = n0 + tl.arange(0, CB)
        mid = _mid(n, end, sink, hi)
        w = w_nx
        w_nx = _words(ks, row, b, n + CB, _mid(n + CB, end, sink, hi), H, N, G, R, W, WP)
        s = _wbins(qv, w, R, W, WP, RWP, HW, SH, NH)
        hc += tl.histogram(s, NH, mask=mid)
        tl.store(b8 + n, s.to(tl.uint8), mask=mid)
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
    v = tl.arange(0, NH)
    tl.store(hist + (row * S + sp) * NH + v, hc)


@triton.jit
def _exact_part(qq, kb, vb, skn, svn, bins8, scr, row, start, end, hi, sink, t, tu, tkey, N, scale_log2,
                M: tl.constexpr, D: tl.constexpr, CB: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    """Phase 2: compact the span's exact keys (bins from phase 1) into scr and attend them."""
    sb = scr + row.to(tl.int64) * N + start
    b8 = bins8 + row.to(tl.int64) * N
    c = 0
    n = start + tl.arange(0, CB)
    s_nx = tl.load(b8 + n, mask=_mid(n, end, sink, hi), other=0).to(tl.int32)
    for n0 in range(start, end, CB):
        n = n0 + tl.arange(0, CB)
        s = s_nx  # the next block's bytes load while this one is compacted
        s_nx = tl.load(b8 + n + CB, mask=_mid(n + CB, end, sink, hi), other=0).to(tl.int32)
        c = _compact_block(sb, c, n, s, end, hi, sink, t, tu, tkey)
    m_i, l_i, acc = _gather(qq, kb, vb, skn, svn, sb, c, scale_log2, M, D, BN, IEEE)
    return m_i, l_i, acc, c


@triton.jit(do_not_specialize=["seed"])
def fused_kernel(q, proj, ks, k, v, lens, hist, ctr, cut, pil, pbin, bins8, scr, cnt, po, plse, stats, tr,
                 sqb, sqh, sqt, skb, skh, skn, svb, svh, svn, H, N, S, sink, window, K, m0, seed, scale_log2,
                 zz, eps2, infl, G: tl.constexpr, R: tl.constexpr, M: tl.constexpr, W: tl.constexpr,
                 WP: tl.constexpr, D: tl.constexpr, RWP: tl.constexpr, NH: tl.constexpr, SH: tl.constexpr,
                 SPP: tl.constexpr, M0P: tl.constexpr, PC: tl.constexpr, CB: tl.constexpr, BN: tl.constexpr,
                 HW: tl.constexpr, IEEE: tl.constexpr, PH: tl.constexpr, PDL: tl.constexpr = 0,
                 TR: tl.constexpr = 0):
    """Program (row, sp) of S per row: span sp of the row's keys (phases 1, 2; partial column sp
    of 2 S) and draw blocks sp, sp + S, ... (phase 3; column S + sp). cnt [rows, 2 S]: keys
    attended; ctr [rows] zero before the launch (PH = 0)."""
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
        _hist_part(qv, qq, ks, kb, skn, bins8, hist, pil, pbin, row, b, sp, S, start, end, hi, sink, n_mid, m0,
                   skey, H, N, scale_log2, G, R, M, W, WP, D, RWP, NH, SH, CB, M0P, PC, HW, IEEE)
        if PH == 0:
            _row_sync(ctr + row, S)
    _stamp(tr, 1, sp, TR)
    if PH == 0 or PH == 2:
        t, tu = _row_cut(hist, row, S, n_mid, K, NH, SPP)
        if sp == 0:
            f = tl.arange(0, 2)
            tl.store(cut + row * 2 + f, tl.where(f == 0, t, tu))
        m_i, l_i, acc, c = _exact_part(qq, kb, vb, skn, svn, bins8, scr, row, start, end, hi, sink, t, tu, tkey,
                                       N, scale_log2, M, D, CB, BN, IEEE)
        _write_partial(po, plse, acc, m_i, l_i, 0.0, row, sp, 2 * S, R, M, D)
        tl.store(cnt + row * 2 * S + sp, c)
        _stamp(tr, 2, c, TR)
        if PH == 0:
            _row_sync(ctr + row, 2 * S)
    _stamp(tr, 3, sp, TR)
    if PH == 0 or PH == 3:
        if PH == 3:
            t, tu = _row_cut(hist, row, S, n_mid, K, NH, SPP)
        spl = _pilot(pil, pbin, row, n_mid, m0, sink, skey, t, tu, tkey, R, M, M0P)
        x_nx = _draw(sp * BN + tl.arange(0, BN), skey, sink, n_mid)
        w_nx = _words(ks, row, b, x_nx, x_nx < sink + n_mid, H, N, G, R, W, WP)
        m_i, l_i, acc, lw2, c = _sample_part(qv, spl, x_nx, w_nx, qq, ks, kb, vb, skn, svn, plse, stats, tr, row, b,
                                             sp, S, S, sink, n_mid, K, m0, t, tu, skey, tkey, H, N, scale_log2, zz,
                                             eps2, infl, G, R, M, W, WP, D, RWP, NH, SH, BN, M0P, SPP, HW, IEEE, 0)
        _write_partial(po, plse, acc, m_i, l_i, lw2, row, S + sp, 2 * S, R, M, D)
        tl.store(cnt + row * 2 * S + S + sp, c)
    _stamp(tr, 4, sp, TR)
    if PDL:
        gdc_launch_dependents()
