"""Triton kernel behind vattention_scan_decode(fused=True): the cut, scan and sample launches
of _scan_triton as one, their boundaries replaced by per-row barriers (atomic counters).

Why: at B=1 the four-launch pipeline is a chain of latencies (round 11 trace); here a row's
programs start together, and each one's part of the sample runs on the SM it already holds
instead of waiting for a scan program to leave. Every program of a row must be resident at
once, or a barrier never opens: scan.py sizes the grid from the driver's occupancy.
PHASES (bit mask) runs a subset of the three phases per launch and SPIN=0 skips the waits:
the interpreter runs programs one after another, so it launches the phases one by one.

Program (row, j) of S: phase 0 histograms subsample blocks j, j + S, ... into the row's
shared histogram and scores pilot draws [j * PC, (j + 1) * PC); phase 1 takes the cut,
compacts and attends span j of the middle: partial column j of 2S + 1 (program S - 1 also
attends the sinks and window, column S); phase 2 sizes the sample from columns [0, S] and
attends blocks j, j + S, ... of the draws: column S + 1 + j; phase 3, once every column is
written, merges them: program j < R * D / DB one head's DB output columns.
"""
import triton
import triton.language as tl

from vattn.kernels._bits_triton import qwords
from vattn.kernels._online import pdl_wait
from vattn.kernels._scan_triton import (_bins, _column, _cut, _draw, _fixed_part, _key_sig, _pilot, _row_pre,
                                        _sample_head, _sample_part, _scan_part, _stamp, _words, dot_qk)


@triton.jit
def _arrive(ctr):
    tl.debug_barrier()  # every thread's stores are issued before the release
    tl.atomic_add(ctr, 1, sem="release")


@triton.jit
def _wait(ctr, target, SPIN: tl.constexpr):
    if SPIN:
        c = tl.atomic_add(ctr, 0, sem="acquire")
        while c < target:
            c = tl.atomic_add(ctr, 0, sem="acquire")
        tl.debug_barrier()


@triton.jit
def _row_cut(hrow, n_mid, K, NH: tl.constexpr):
    """(tau, thu) from the row's shared histogram (complete once barrier 0 opened)."""
    return _cut(tl.load(hrow + tl.arange(0, NH), cache_modifier=".cg"), n_mid, K, NH)


@triton.jit
def _span_head(qv, ks, row, b, start, end, H, N, G: tl.constexpr, R: tl.constexpr, W: tl.constexpr,
               WP: tl.constexpr, RWP: tl.constexpr, HW: tl.constexpr, SH: tl.constexpr, NH: tl.constexpr,
               CB: tl.constexpr):
    """Score bins of the span's first block and the second block's words (no cut needed)."""
    n = start + tl.arange(0, CB)
    s = _bins(qv, ks, row, b, n, n < end, H, N, G, R, W, WP, RWP, HW, SH, NH)
    return s, _words(ks, row, b, n + CB, n + CB < end, H, N, G, R, W, WP)


@triton.jit(do_not_specialize=["seed"])
def fused_kernel(q, proj, ks, k, v, lens, sync, pil, pbin, scr, cnt, po, plse, out, stats, tr, tr2,
                 sqb, sqh, sqt, skb, skh, skn, svb, svh, svn, H, N, S, sink, window, K, STRIDE, P, seed, m0,
                 scale_log2, zz, eps2, infl,
                 G: tl.constexpr, R: tl.constexpr, M: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                 D: tl.constexpr, RWP: tl.constexpr, NH: tl.constexpr, SH: tl.constexpr, M0P: tl.constexpr,
                 PC: tl.constexpr, SB: tl.constexpr, CL: tl.constexpr, CB: tl.constexpr, BN: tl.constexpr,
                 SBN: tl.constexpr, SP: tl.constexpr, DB: tl.constexpr, SP2: tl.constexpr, HW: tl.constexpr,
                 IEEE: tl.constexpr, PHASES: tl.constexpr = 15,
                 SPIN: tl.constexpr = 1, PRE: tl.constexpr = 0, PDL: tl.constexpr = 0, TR: tl.constexpr = 0,
                 UPD: tl.constexpr = 0):
    """See the module docstring. sync int32 [rows, 4 + NH], zero before the launch and left
    zero: the three barriers' arrival counts, the merge programs done, the row's histogram. out [B, Hq, 1, D] (contiguous). Trace
    stamps (TR) as the scan kernel's in tr (0 start, 1 cut known, 2 compacted, 3-4 column
    written; 5 past the PDL wait, 6 phase 0 done) and the sample kernel's in tr2 (0 phase start,
    1 the scan columns complete, 2 budget, 3-4 column written; 5-6 merge start, end)."""
    row = tl.program_id(0)
    j = tl.program_id(1)
    _stamp(tr, 0, j, TR)
    pdl_wait(PDL)  # q may come from the launch before
    _stamp(tr, 5, j, TR)
    b, L, hi, skey, tkey, qq, kb, vb = _row_pre(q, lens, k, v, seed, row, H, sqb, sqh, sqt, skb, skh, svb, svh,
                                                window, R, M, D)
    n_mid = tl.maximum(hi - sink, 0)
    qv = qwords(q, q, proj, row, b, H, 1, sqb, sqh, sqt, R, W, D, RWP, True)
    ctr = sync + row * (4 + NH)
    chunk = tl.cdiv(tl.cdiv(n_mid, S), CB) * CB
    start = sink + j * chunk
    end = tl.minimum(start + chunk, hi)
    if (PHASES & 1) != 0:
        if UPD:  # the newest key's signature: in the window now, so this launch does not read it
            if (j == 0) & (L > 0):
                _key_sig(k, proj, ks, b, row % H, L - 1, skb, skh, skn, H, N, W, D)
        _cut_share(qv, qq, ks, kb, skn, ctr + 4, pil, pbin, row, b, j, S, hi, sink, n_mid, P, STRIDE, skey, m0,
                   scale_log2, H, N, G, R, M, W, WP, D, RWP, NH, SH, M0P, PC, SB, CL, HW, IEEE)
        _arrive(ctr)
        _stamp(tr, 6, j, TR)
    if (PHASES & 2) != 0:
        s, w_nx = _span_head(qv, ks, row, b, start, end, H, N, G, R, W, WP, RWP, HW, SH, NH, CB)
        if j == S - 1:  # the sinks and window need no cut: attended while the others arrive
            mf, lf, af, nf = _fixed_part(qq, kb, vb, skn, svn, L, hi, sink, scale_log2, M, D, BN, IEEE)
            _column(po, plse, cnt, tr, af, mf, lf, 0.0, nf, row, S, 2 * S + 1, R, M, D, 0)
        _wait(ctr, S, SPIN)
        t, tu = _row_cut(ctr + 4, n_mid, K, NH)
        _stamp(tr, 1, t + tu, TR)
        m_i, l_i, acc, c = _scan_part(qv, s, w_nx, qq, ks, kb, vb, skn, svn, scr, tr, row, b, start, end, t, tu,
                                      tkey, H, N, scale_log2, G, R, M, W, WP, D, RWP, NH, SH, CB, BN, HW, IEEE, TR)
        _column(po, plse, cnt, tr, acc, m_i, l_i, 0.0, c, row, j, 2 * S + 1, R, M, D, TR)
        _arrive(ctr + 1)
    if (PHASES & 4) != 0:
        _stamp(tr2, 0, j, TR)
        if (PHASES & 2) == 0:
            t, tu = _row_cut(ctr + 4, n_mid, K, NH)
        spl = _pilot(pil, pbin, row, n_mid, m0, sink, skey, t, tu, tkey, R, M, M0P)
        x0, w0, x1, w1, m_i, l_i, acc, c0 = _sample_head(qv, qq, ks, kb, vb, skn, svn, row, b, j, S, sink, n_mid, t,
                                                         tu, skey, tkey, scale_log2, H, N, G, R, M, W, WP, D, RWP,
                                                         HW, SH, NH, SBN, IEEE, PRE)
        _wait(ctr + 1, S, SPIN)
        _stamp(tr2, 1, c0, TR)
        m_i, l_i, acc, lw2, c = _sample_part(qv, spl, x0, w0, x1, w1, m_i, l_i, acc, c0, qq, ks, kb, vb, skn, svn,
                                             plse, stats, tr2, row, b, j, S + 1, S, sink, n_mid, K, m0, t, tu, skey, tkey,
                                             H, N, scale_log2, zz, eps2, infl, G, R, M, W, WP, D, RWP, NH, SH, SBN,
                                             M0P, SP, HW, IEEE, PRE, TR)
        _column(po, plse, cnt, tr2, acc, m_i, l_i, lw2, c, row, S + 1 + j, 2 * S + 1, R, M, D, TR)
        _arrive(ctr + 2)
    if (PHASES & 8) != 0:  # programs j < R * D / DB merge one head's slice of DB output columns
        if j < R * (D // DB):
            _wait(ctr + 2, S, SPIN)
            _stamp(tr2, 5, j, TR)
            _merge_slice(po, plse, out, row * R + j // (D // DB), (j % (D // DB)) * DB, 2 * S + 1, D, DB, SP2)
            _stamp(tr2, 6, j, TR)
            tl.debug_barrier()
            if tl.atomic_add(ctr + 3, 1, sem="acq_rel") == tl.minimum(S, R * (D // DB)) - 1:
                # every program of the row is past its last read of sync: zero it for the next call
                tl.store(ctr + tl.arange(0, 4), tl.zeros([4], tl.int32))
                tl.store(ctr + 4 + tl.arange(0, NH), tl.zeros([NH], tl.int32))


@triton.jit
def _cut_share(qv, qq, ks, kb, skn, hrow, pil, pbin, row, b, j, S, hi, sink, n_mid, P, STRIDE, skey, m0, scale_log2,
               H, N, G: tl.constexpr, R: tl.constexpr, M: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
               D: tl.constexpr, RWP: tl.constexpr, NH: tl.constexpr, SH: tl.constexpr, M0P: tl.constexpr,
               PC: tl.constexpr, SB: tl.constexpr, CL: tl.constexpr, HW: tl.constexpr, IEEE: tl.constexpr):
    """Program j's share of the cut kernel's work: subsample blocks j, j + S, ... (SB keys in
    runs of CL, one run every CL * STRIDE keys) added to the row's histogram hrow, and the pilot
    draws [j * PC, (j + 1) * PC) scored into pil / pbin (as cut_kernel)."""
    lane = tl.arange(0, SB)
    v = tl.arange(0, NH)
    for p in range(j, P, S):
        n = sink + p * (SB * STRIDE) + (lane // CL) * (CL * STRIDE) + lane % CL
        inr = n < hi
        hc = tl.histogram(_bins(qv, ks, row, b, n, inr, H, N, G, R, W, WP, RWP, HW, SH, NH), NH, mask=inr)
        tl.atomic_add(hrow + v, hc, sem="relaxed")
    i = j * PC + tl.arange(0, PC)
    pok = i < tl.where(n_mid > 0, m0, 0)
    xp = _draw(i, skey, sink, n_mid)
    d = tl.arange(0, D)
    kp = tl.load(kb + xp.to(tl.int64)[:, None] * skn + d[None, :], mask=pok[:, None], other=0.0)
    pb = _bins(qv, ks, row, b, xp, pok, H, N, G, R, W, WP, RWP, HW, SH, NH)
    spl = dot_qk(qq, kp, IEEE) * scale_log2
    r = tl.arange(0, M)
    tl.store(pil + (row * R + r)[:, None] * M0P + i[None, :], spl, mask=(r < R)[:, None] & pok[None, :])
    tl.store(pbin + row * M0P + i, pb, mask=pok)


@triton.jit
def _merge_slice(po, plse, out, r, d0, S2, D: tl.constexpr, DB: tl.constexpr, SP2: tl.constexpr):
    """Output row r (of [B * Hq, D]), columns [d0, d0 + DB), from its S2 partials (po
    [rows * R, S2, D] f32, plse [rows * R, S2] log2 units; a partial with lse -inf saw no key
    and may be unwritten: not read). A row with no key gives 0."""
    c = tl.arange(0, SP2)
    d = d0 + tl.arange(0, DB)
    r64 = r.to(tl.int64)
    lse = tl.load(plse + r64 * S2 + c, mask=c < S2, other=float("-inf"), cache_modifier=".cg")
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    live = lse > float("-inf")
    w = tl.where(live, tl.exp2(lse - m), 0.0)
    o = tl.load(po + (r64 * S2 + c)[:, None] * D + d[None, :], mask=live[:, None], other=0.0, cache_modifier=".cg")
    acc = tl.sum(w[:, None] * o, 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(out + r64 * D + d, acc.to(out.dtype.element_ty))
