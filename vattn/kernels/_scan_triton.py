"""Triton kernels behind vattn.kernels.scan (imported lazily: needs triton). See scan.py.

Selection rows are shared (one per KV head, its G query heads in the M dim of tl.dot), T = 1.
Scores are in the log2 domain, as in the other decode kernels.
"""
import triton
import triton.language as tl

from vattn.kernels._bits_triton import agreement, key_sig, qwords, sig_words
from vattn.kernels._online import stamp, attend_rows, dot_qk, finish, kv_rows, online_init, pdl_wait

TIE_SALT = tl.constexpr(0x68E31DA4)  # a jit global must be a constexpr


@triton.jit
def _mix(x, key):
    """uint32 keyed hash of x, as scan._mix_ref."""
    x = (x ^ key) * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    return x ^ (x >> 13)


@triton.jit
def _keys(seed, row, L):
    """(sample key, tie key) of a selection row of length L: uint32, as scan.row_keys."""
    # hashed, not xor-ed: seeds that differ in low bits must not permute the same slots; the
    # length makes each decode step draw afresh (no host counter, so a captured graph does too)
    key = _mix(row.to(tl.uint32) * 0x1B873593, _mix(L.to(tl.uint32), seed.to(tl.uint32)))
    return key, _mix(key, TIE_SALT)


@triton.jit
def _wbins(qv, kw, R: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, RWP: tl.constexpr, HW: tl.constexpr,
           SH: tl.constexpr, NH: tl.constexpr):
    """Histogram bin of each key's bit-agreement score (words kw): min(score >> SH, NH - 1)."""
    return tl.minimum(agreement(qv, kw, R, W, WP, RWP, HW) >> SH, NH - 1)


@triton.jit
def _bins(qv, ks, row, n, inr, N, R: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, RWP: tl.constexpr,
          HW: tl.constexpr, SH: tl.constexpr, NH: tl.constexpr):
    return _wbins(qv, sig_words(ks, row, n, inr, N, W, WP), R, W, WP, RWP, HW, SH, NH)


@triton.jit
def _taken(s, n, tau, thu, tkey):
    """Top-k membership of middle keys n with score bins s: above tau, or at tau with the
    key's 24-bit hash below thu (ties taken at random with probability thu / 2^24)."""
    u = (_mix(n.to(tl.uint32), tkey) >> 8).to(tl.int32)
    return (s > tau) | ((s == tau) & (u < thu))


@triton.jit
def draw_pos(i, skey, sink, n_mid):
    """Position of sample slot i: uniform over the middle [sink, sink + n_mid), independent slots."""
    h = _mix(i.to(tl.uint32), skey)
    return sink + ((h.to(tl.uint64) * n_mid.to(tl.uint64)) >> 32).to(tl.int32)


@triton.jit
def _row_k(K, KF, L):
    """The row's top-k count: K keys plus the fraction KF of its length L (as resolve_size)."""
    return tl.minimum(K + tl.ceil(KF * L.to(tl.float32)).to(tl.int32), L)


@triton.jit
def _cut(hc, n_mid, K, NH: tl.constexpr):
    """(tau, thu) from the subsample histogram hc [NH]: about K of the n_mid middle keys taken."""
    tot = tl.sum(hc, 0)
    v = tl.arange(0, NH)
    ge = tot - tl.cumsum(hc, 0) + hc  # subsample keys with bin >= v
    want = K.to(tl.float32) * tot.to(tl.float32) / tl.maximum(n_mid, 1).to(tl.float32)
    t = tl.maximum(tl.sum((ge.to(tl.float32) >= want).to(tl.int32), 0) - 1, 0)
    neq = tl.sum(tl.where(v == t, hc, 0), 0)
    ngt = tl.sum(tl.where(v == t, ge, 0), 0) - neq
    p = (want - ngt.to(tl.float32)) / tl.maximum(neq, 1).to(tl.float32)
    p = tl.minimum(tl.maximum(p, 0.0), 1.0)
    return t, (p * 16777216.0).to(tl.int32)


@triton.jit
def write_partial(po, plse, acc, m_i, l_i, lw2, row, col, S, R: tl.constexpr, M: tl.constexpr, D: tl.constexpr):
    # partials [rows * R, S, D] / [rows * R, S]; a program that saw no key writes only lse = -inf.
    # lw2: the log2 weight shared by every key of the partial
    o, lse = finish(acc, m_i, l_i)
    lse = lse + lw2
    r = tl.arange(0, M)
    d = tl.arange(0, D)
    orow = (row * R + r).to(tl.int64)
    tl.store(po + (orow[:, None] * S + col) * D + d[None, :], o, mask=((r < R) & (l_i > 0))[:, None])
    tl.store(plse + orow * S + col, lse, mask=r < R)


@triton.jit
def _query(q, row, b, H, sqb, sqh, R: tl.constexpr, M: tl.constexpr, D: tl.constexpr):
    r = tl.arange(0, M)
    d = tl.arange(0, D)
    h = row % H
    return tl.load(q + b.to(tl.int64) * sqb + (h * R + r)[:, None].to(tl.int64) * sqh + d[None, :],
                   mask=(r < R)[:, None], other=0.0)


@triton.jit(do_not_specialize=["seed"])  # seed may be 1: keep it a tensor
def cut_kernel(q, proj, ks, k, lens, hist, ctr, cut, pil, pbin, qs, tot, tr,
               sqb, sqh, skb, skh, skn, H, N, sink, window, K, KF, STRIDE, seed, m0, scale_log2,
               R: tl.constexpr, M: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
               D: tl.constexpr, RWP: tl.constexpr, NH: tl.constexpr, SH: tl.constexpr, PP: tl.constexpr,
               M0P: tl.constexpr, PC: tl.constexpr, BN: tl.constexpr, CL: tl.constexpr, HW: tl.constexpr,
               IEEE: tl.constexpr, PDL: tl.constexpr = 0, TR: tl.constexpr = 0, UPD: tl.constexpr = 0,
               CNT: tl.constexpr = 0):
    """Program (row, p) stores the histogram of subsample block p (runs of CL keys, one every
    CL * STRIDE keys of the middle) and scores pilot draws [p * PC, (p + 1) * PC) (the first m0
    sample draws): pil [rows * R, M0P] log2 scores, pbin [rows, M0P] their score bins (whether a
    draw is a top-k key is decided where the cut is known). The last program of a row to
    finish (counter ctr, zero before the launch, left zero) sums the histograms into cut[row] =
    (tau, thu). CNT: program (row, 0) zeroes tot[row], which the sample kernel adds the row's
    keys attended to (no memset launch: it would cut the launches' PDL chain)."""
    row = tl.program_id(0)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    stamp(tr, 0, p, TR)
    pdl_wait(PDL)
    b = row // H
    L = tl.load(lens + b)
    K = _row_k(K, KF, L)
    hi = L - window
    n_mid = tl.maximum(hi - sink, 0)
    qv = qwords(q, proj, row, b, H, sqb, sqh, R, W, D, RWP)
    if p == 0:  # the query signature, for the later launches (layout [B, Hq, 1, W])
        rw = tl.arange(0, RWP)
        tl.store(qs + row * R * W + rw, qv.to(tl.int32, bitcast=True), mask=rw < R * W)
        if CNT:
            tl.store(tot + row, 0)
        if UPD:  # the newest key's signature: in the window now, so no launch of this step reads it
            if L > 0:
                key_sig(k, proj, ks, b, row % H, L - 1, skb, skh, skn, H, N, W, D)
    lane = tl.arange(0, BN)
    n = sink + p * (BN * STRIDE) + (lane // CL) * (CL * STRIDE) + lane % CL
    inr = n < hi
    hc = tl.histogram(_bins(qv, ks, row, n, inr, N, R, W, WP, RWP, HW, SH, NH), NH, mask=inr)
    # this program's pilot draws: their loads overlap the histogram's
    skey, tkey = _keys(seed, row, L)
    i = p * PC + tl.arange(0, PC)
    pok = i < tl.where(n_mid > 0, m0, 0)
    xp = draw_pos(i, skey, sink, n_mid)
    d = tl.arange(0, D)
    kb = k + b.to(tl.int64) * skb + (row % H).to(tl.int64) * skh
    kp = tl.load(kb + xp.to(tl.int64)[:, None] * skn + d[None, :], mask=pok[:, None], other=0.0)
    pb = _bins(qv, ks, row, xp, pok, N, R, W, WP, RWP, HW, SH, NH)
    spl = dot_qk(_query(q, row, b, H, sqb, sqh, R, M, D), kp, IEEE) * scale_log2
    r = tl.arange(0, M)
    tl.store(pil + (row * R + r)[:, None] * M0P + i[None, :], spl, mask=(r < R)[:, None] & pok[None, :])
    tl.store(pbin + row * M0P + i, pb, mask=pok)
    v = tl.arange(0, NH)
    tl.store(hist + (row * P + p) * NH + v, hc)
    stamp(tr, 1, tl.sum(hc, 0) + tl.sum(pb, 0), TR)
    tl.debug_barrier()
    done = tl.atomic_add(ctr + row, 1, sem="acq_rel")
    stamp(tr, 2, done, TR)
    if done == P - 1:
        pp = tl.arange(0, PP)
        tile = tl.load(hist + (row * P + pp[:, None]) * NH + v[None, :], mask=(pp < P)[:, None], other=0,
                       volatile=True)
        t, tu = _cut(tl.sum(tile, 0), n_mid, K, NH)
        f = tl.arange(0, 2)
        tl.store(cut + row * 2 + f, tl.where(f == 0, t, tu))
        tl.store(ctr + row, 0)  # every program has counted: zero again for the next call (no memset)
        stamp(tr, 3, t + tu, TR)


@triton.jit
def _scan_part(qv, s, w_nx, qq, ks, kb, vb, skn, svn, scr, tr, row, start, end, t, tu, tkey, N,
               scale_log2, R: tl.constexpr, M: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
               D: tl.constexpr, RWP: tl.constexpr, NH: tl.constexpr, SH: tl.constexpr, CB: tl.constexpr,
               BN: tl.constexpr, HW: tl.constexpr, IEEE: tl.constexpr, TR: tl.constexpr):
    """Middle keys [start, end) of the row: compact the taken ones into scr, then attend them
    (weight 0). s: the first block's score bins, w_nx: the second block's signature words.
    Returns (m_i, l_i, acc, keys attended)."""
    sb = scr + row.to(tl.int64) * N + start
    c = 0
    for n0 in range(start, end, CB):
        n = n0 + tl.arange(0, CB)
        c = _compact_block(sb, c, n, s, end, t, tu, tkey)
        s = _wbins(qv, w_nx, R, W, WP, RWP, HW, SH, NH)  # the next block: its words were loaded a block ago
        nn = n + 2 * CB
        w_nx = sig_words(ks, row, nn, nn < end, N, W, WP)
    stamp(tr, 2, c, TR)
    m_i, l_i, acc = _gather(qq, kb, vb, skn, svn, sb, c, scale_log2, M, D, BN, IEEE)
    return m_i, l_i, acc, c


@triton.jit
def _compact_block(sb, c, n, s, end, t, tu, tkey):
    """Append the taken keys of block n (score bins s, all middle keys) at sb[c, ...); returns
    the new count."""
    sel = (n < end) & _taken(s, n, t, tu, tkey)
    si = sel.to(tl.int32)
    tl.store(sb + c + tl.cumsum(si, 0) - 1, n, mask=sel)
    return c + tl.sum(si, 0)


@triton.jit
def _gather(qq, kb, vb, skn, svn, sb, c, scale_log2, M: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
            IEEE: tl.constexpr):
    """Attend the c keys listed at sb (written by this program's threads). Returns (m_i, l_i, acc)."""
    tl.debug_barrier()  # the compacted positions, written by other threads of this program
    m_i, l_i, acc = online_init(M, D)
    j = tl.arange(0, BN)
    ix_nx = tl.load(sb + j, mask=j < c, other=-1)
    for j0 in range(0, c, BN):
        ix = ix_nx
        jj = j0 + BN + j
        ix_nx = tl.load(sb + jj, mask=jj < c, other=-1)
        ok = ix >= 0
        kk, vv = kv_rows(kb, vb, skn, svn, tl.where(ok, ix, 0).to(tl.int64), ok, D)
        m_i, l_i, acc = attend_rows(qq, kk, vv, ok, scale_log2, m_i, l_i, acc, IEEE)
    return m_i, l_i, acc


@triton.jit
def _pilot(pil, pbin, row, n_mid, m0, sink, skey, t, tu, tkey, R: tl.constexpr, M: tl.constexpr,
           M0P: tl.constexpr):
    """The pilot's log2 scores [M, M0P] (cut kernel outputs, read past L1): -inf past m0 and at
    draws that are top-k keys (they count as 0)."""
    r = tl.arange(0, M)
    i = tl.arange(0, M0P)
    m = tl.where(n_mid > 0, m0, 0)
    pb = tl.load(pbin + row * M0P + i, mask=i < m, other=0, cache_modifier=".cg")
    keep = (i < m) & ~_taken(pb, draw_pos(i, skey, sink, n_mid), t, tu, tkey)
    return tl.load(pil + (row * R + r)[:, None] * M0P + i[None, :], mask=(r < R)[:, None] & keep[None, :],
                   other=float("-inf"), cache_modifier=".cg")


@triton.jit
def pilot_stats(sp, m, M0P: tl.constexpr):
    """Per head, with the pilot's own shift: (shift, mean, variance) of exp(s - shift) over the
    m pilot keys, sp [M, M0P] natural-log scores, -inf for a key that counts as 0. Needs no
    partial, so a kernel can take it before waiting for them."""
    pok = tl.arange(0, M0P) < m
    pshift = tl.maximum(tl.max(sp, 1), -1e30)
    xp = tl.where(pok[None, :], tl.exp(sp - pshift[:, None]), 0.0)
    mf = m.to(tl.float32)
    mean = tl.sum(xp, 1) / tl.maximum(mf, 1.0)
    dev_ = tl.where(pok[None, :], xp - mean[:, None], 0.0)
    return pshift, mean, tl.sum(dev_ * dev_, 1) / tl.maximum(mf - 1.0, 1.0)


@triton.jit
def _moments(pshift, mean, var, plse, row, S1, ST, R: tl.constexpr, M: tl.constexpr, SP: tl.constexpr):
    """(variance, D_F, mean) on one shift per head: the pilot's stats (pilot_stats) rescaled,
    D_F the exact mass from the split-KV partials plse [rows*R, ST] log2 units, columns [0, S1)."""
    r = tl.arange(0, M)
    sc = tl.arange(0, SP)
    pl = tl.load(plse + (row * R + r)[:, None].to(tl.int64) * ST + sc[None, :],
                 mask=(r < R)[:, None] & (sc < S1)[None, :], other=float("-inf"))
    shift = tl.maximum(pshift, tl.maximum(tl.max(pl, 1) * 0.6931471805599453, -1e30))
    dfix = tl.sum(tl.exp2(pl - shift[:, None] * 1.4426950408889634), 1)
    f = tl.exp(pshift - shift)
    return var * f * f, dfix, mean * f


@triton.jit
def _output_b0(pil, pbin, po, plse, vb, svn, row, S, S1, n_mid, m0, sink, skey, t, tu, tkey, zq, eps2, infl,
               R: tl.constexpr, M: tl.constexpr, M0P: tl.constexpr, D: tl.constexpr, SP: tl.constexpr,
               IEEE: tl.constexpr):
    """Output mode's b0 per head (scan.py, _output_b0_ref): zq n_mid^2 tr(S) / (eps ||o_low|| D_hat)^2,
    tr(S) the pilot's spread of x_j (v_j - o_hat) (times infl), o_low = ||o_hat|| - sqrt(zq) times
    o_hat's pilot standard error (0: exact). Reads the pilot's value rows and the scan's partials."""
    sp = _pilot(pil, pbin, row, n_mid, m0, sink, skey, t, tu, tkey, R, M, M0P) * 0.6931471805599453
    return output_b0(sp, draw_pos(tl.arange(0, M0P), skey, sink, n_mid), tl.where(n_mid > 0, m0, 0), po, plse, vb, svn,
                     row, S, S1, n_mid, zq, eps2, infl, R, M, M0P, D, SP, IEEE)


@triton.jit
def output_b0(sp, xp, m, po, plse, vb, svn, row, S, S1, n_mid, zq, eps2, infl, R: tl.constexpr, M: tl.constexpr,
              M0P: tl.constexpr, D: tl.constexpr, SP: tl.constexpr, IEEE: tl.constexpr):
    """_output_b0 from the pilot's natural-log scores sp [M, M0P] (-inf: counts as 0) at
    positions xp [M0P], m of them used, and the exact part's partials (columns [0, S1))."""
    r = tl.arange(0, M)
    d = tl.arange(0, D)
    sc = tl.arange(0, SP)
    pl = tl.load(plse + (row * R + r)[:, None].to(tl.int64) * S + sc[None, :],
                 mask=(r < R)[:, None] & (sc < S1)[None, :], other=float("-inf"))
    shift = tl.maximum(tl.maximum(tl.max(sp, 1), tl.max(pl, 1) * 0.6931471805599453), -1e30)
    nf = tl.zeros((M, D), dtype=tl.float32)  # N_F: the scan's partials, each o times its mass
    for c in range(S1):
        w = tl.exp2(tl.load(plse + (row * R + r).to(tl.int64) * S + c, mask=r < R, other=float("-inf"))
                    - shift * 1.4426950408889634)
        o = tl.load(po + ((row * R + r)[:, None].to(tl.int64) * S + c) * D + d[None, :], mask=(w > 0)[:, None],
                    other=0.0)
        nf += w[:, None] * o
    dfix = tl.sum(tl.exp2(pl - shift[:, None] * 1.4426950408889634), 1)
    i = tl.arange(0, M0P)
    x = tl.where((i < m)[None, :], tl.exp(sp - shift[:, None]), 0.0)  # [M, M0P], members 0
    vv = tl.load(vb + xp.to(tl.int64)[:, None] * svn + d[None, :], mask=(i < m)[:, None], other=0.0).to(tl.float32)
    if IEEE:
        xv = tl.dot(x, vv, input_precision="ieee")
        x2v = tl.dot(x * x, vv, input_precision="ieee")
    else:
        xv = tl.dot(x, vv)
        x2v = tl.dot(x * x, vv)
    vn = tl.sum(vv * vv, 1)  # [M0P]
    sx = tl.sum(x, 1)
    sxx = tl.sum(x * x, 1)
    x2vv = tl.sum(x * x * vn[None, :], 1)
    mf = tl.maximum(m.to(tl.float32), 1.0)
    nm = n_mid.to(tl.float32)
    dhat = dfix + nm * sx / mf
    oh = (nf + nm * xv / mf) / dhat[:, None]
    onorm2 = tl.sum(oh * oh, 1)
    ybar = (xv - oh * sx[:, None]) / mf
    ss = x2vv - 2.0 * tl.sum(oh * x2v, 1) + onorm2 * sxx - mf * tl.sum(ybar * ybar, 1)
    trs = tl.maximum(ss, 0.0) / tl.maximum(mf - 1.0, 1.0) * infl
    sd = nm * tl.sqrt(trs / mf) / dhat
    olow = tl.maximum(tl.sqrt(onorm2) - tl.sqrt(zq) * sd, 0.0)
    return zq * nm * nm * trs / (eps2 * dhat * dhat * olow * olow)


@triton.jit
def _budget(plse, ps, pm, pv, row, S, S1, n_mid, K, m0, zz, eps2, infl, pil, pbin, po, vb, svn, sink, skey, t, tu,
            tkey, R: tl.constexpr, M: tl.constexpr, SP: tl.constexpr, M0P: tl.constexpr, D: tl.constexpr,
            IEEE: tl.constexpr, OUT: tl.constexpr):
    """(total draws, exact, need): the verified budget from D_F (the scan's partials, columns
    [0, S1) of plse) and the pilot's stats (ps, pm, pv: pilot_stats of _pilot's scores, taken
    before the wait for the scan). total = max over
    heads of ceil(z^2 n_mid^2 var / (eps D_hat)^2), var the pilot variance times infl, at least
    m0; exact when that reaches the residual's size (n_mid - K). OUT: output mode's b0 instead
    (_output_b0; zz is then its quantile)."""
    if OUT:
        b0 = _output_b0(pil, pbin, po, plse, vb, svn, row, S, S1, n_mid, m0, sink, skey, t, tu, tkey, zz, eps2,
                        infl, R, M, M0P, D, SP, IEEE)
    else:
        b0 = denominator_b0(ps, pm, pv, plse, row, S, S1, n_mid, zz, eps2, infl, R, M, SP)
    return budget_total(b0, n_mid, K, tl.where(n_mid > 0, m0, 0), R, M)


@triton.jit
def denominator_b0(ps, pm, pv, plse, row, S, S1, n_mid, zz, eps2, infl, R: tl.constexpr, M: tl.constexpr,
                   SP: tl.constexpr):
    """Denominator mode's b0 per head: z^2 n_mid^2 var / (eps D_hat)^2 from the pilot's stats
    (pilot_stats) and D_F (the exact part's partials, columns [0, S1) of plse)."""
    nm = n_mid.to(tl.float32)
    var, dfix, mean = _moments(ps, pm, pv, plse, row, S1, S, R, M, SP)
    var = var * infl  # with replacement every row has its m0 pilot draws: the bound always applies
    dhat = dfix + nm * mean
    return zz * nm * nm * var / (eps2 * dhat * dhat)


@triton.jit
def budget_total(b0, n_mid, K, m, R: tl.constexpr, M: tl.constexpr):
    """(total draws, exact, need) from b0 per head: the largest need over the heads, at least the
    pilot's m; exact when it reaches the residual's size (n_mid - K)."""
    r = tl.arange(0, M)
    b0 = tl.where(b0 == b0, b0, float("inf"))  # NaN (nothing to trust): exact
    need = tl.max(tl.where(r < R, tl.ceil(b0 - 1e-6), 0.0), 0)
    limit = tl.maximum(n_mid - K, m)  # at or past the residual's size, attending it exactly is cheaper
    exact = (need >= limit.to(tl.float32)) & (n_mid > 0)
    total = tl.where(exact, n_mid, tl.maximum(need, m.to(tl.float32)).to(tl.int32))
    return tl.where(n_mid > 0, total, 0), exact, need


@triton.jit
def store_stats(stats, row, m, total, n_mid, need, exact, t, tu):
    """stats[row, :7] = (pilot, total, n_mid, need, exact, tau, thu) as float32 (scan.STAT_NAMES)."""
    f = tl.arange(0, 8)
    vals = tl.where(f == 0, m.to(tl.float32), 0.0)
    vals = tl.where(f == 1, total.to(tl.float32), vals)
    vals = tl.where(f == 2, n_mid.to(tl.float32), vals)
    vals = tl.where(f == 3, need, vals)
    vals = tl.where(f == 4, exact.to(tl.float32), vals)
    vals = tl.where(f == 5, t * 1.0, vals)  # (t, tu may be the constant 0)
    vals = tl.where(f == 6, tu * 1.0, vals)
    tl.store(stats + row * 8 + f, vals)


@triton.jit
def _draw_tile(qv, x, w, ok, kb, vb, skn, svn, t, tu, tkey, R: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
               RWP: tl.constexpr, HW: tl.constexpr, SH: tl.constexpr, NH: tl.constexpr, D: tl.constexpr):
    """(use, keys, values) of draws x (signature words w): used where ok and not a top-k key."""
    use = ok & ~_taken(_wbins(qv, w, R, W, WP, RWP, HW, SH, NH), x, t, tu, tkey)
    # masked lanes are not read (zeroing them trips a triton 3.6 layout pass)
    kk, vv = kv_rows(kb, vb, skn, svn, x.to(tl.int64), use, D)
    return use, kk, vv


@triton.jit
def _sample_part(qv, ps, pm, pv, x0, w0, x1, w1, m_i, l_i, acc, got, qq, ks, kb, vb, skn, svn, plse, stats, tr, row,
                 j2, S1, S2, sink, n_mid, K, m0, t, tu, skey, tkey, N, scale_log2, zz, eps2, infl, pil, pbin, po,
                 R: tl.constexpr, M: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                 D: tl.constexpr, RWP: tl.constexpr, NH: tl.constexpr, SH: tl.constexpr, BN: tl.constexpr,
                 SP: tl.constexpr, HW: tl.constexpr, IEEE: tl.constexpr, PRE: tl.constexpr, TR: tl.constexpr,
                 M0P: tl.constexpr, OUT: tl.constexpr):
    """Blocks j2, j2 + S2, ... of the draws [0, total), each weighted n_mid / total (a drawn
    top-k key counts as 0); exact rows: the same blocks of the residual keys, weight 1.
    x0 / w0, x1 / w1: positions and signature words of blocks j2 and j2 + S2 as draws.
    (m_i, l_i, acc, got): block j2 attended before the wait (PRE); kept when every draw of it
    is in the sample, else dropped and the block attended again. Returns (m_i, l_i, acc,
    log2 weight, keys attended)."""
    total, exact, need = _budget(plse, ps, pm, pv, row, S1 + S2, S1, n_mid, K, m0, zz, eps2, infl, pil, pbin, po,
                                 vb, svn, sink, skey, t, tu, tkey, R, M, SP, M0P, D, IEEE, OUT)
    stamp(tr, 2, total, TR)
    if j2 == 0:
        store_stats(stats, row, tl.where(n_mid > 0, m0, 0), total, n_mid, need, exact, t, tu)
    pre = (PRE != 0) & ~exact & (j2 * BN + BN <= total)
    m_i = tl.where(pre, m_i, float("-inf"))
    l_i = tl.where(pre, l_i, 0.0)
    acc = tl.where(pre, acc, 0.0)
    got = tl.where(pre, got, 0)
    j = tl.arange(0, BN)
    if exact:  # the residual in position order: every row read (loads that wait on no other load),
        for blk in range(j2, tl.cdiv(n_mid, BN), S2):  # the top-k keys masked after
            ii = blk * BN + j
            ok = ii < n_mid
            w = sig_words(ks, row, sink + ii, ok, N, W, WP)
            use = ok & ~_taken(_wbins(qv, w, R, W, WP, RWP, HW, SH, NH), sink + ii, t, tu, tkey)
            kk, vv = kv_rows(kb, vb, skn, svn, (sink + ii).to(tl.int64), ok, D)
            m_i, l_i, acc = attend_rows(qq, kk, vv, use, scale_log2, m_i, l_i, acc, IEEE)
            got += tl.sum(use.to(tl.int32), 0)
    else:
        x_nx = tl.where(pre, x1, x0)
        w_nx = tl.where(pre, w1, w0)
        for blk in range(tl.where(pre, j2 + S2, j2), tl.cdiv(total, BN), S2):
            ii = blk * BN + j
            use, kk, vv = _draw_tile(qv, x_nx, w_nx, ii < total, kb, vb, skn, svn, t, tu, tkey, R, W, WP, RWP, HW,
                                     SH, NH, D)
            i2 = ii + S2 * BN  # the program's next block: its words load while this one is attended
            x_nx = draw_pos(i2, skey, sink, n_mid)
            w_nx = sig_words(ks, row, x_nx, i2 < total, N, W, WP)
            m_i, l_i, acc = attend_rows(qq, kk, vv, use, scale_log2, m_i, l_i, acc, IEEE)
            got += tl.sum(use.to(tl.int32), 0)
    lw2 = tl.where(exact, 0.0, tl.log2(n_mid.to(tl.float32) / tl.maximum(total, 1).to(tl.float32)))
    return m_i, l_i, acc, lw2, got


@triton.jit
def row_pre(q, lens, k, v, seed, row, H, sqb, sqh, skb, skh, svb, svh, window, R: tl.constexpr,
            M: tl.constexpr, D: tl.constexpr):
    # Reads only inputs older than the pipeline (q, k, v, lengths): safe before the
    # programmatic-dependent-launch wait.
    b = row // H
    L = tl.load(lens + b)
    skey, tkey = _keys(seed, row, L)
    qq = _query(q, row, b, H, sqb, sqh, R, M, D)
    kb = k + b.to(tl.int64) * skb + (row % H).to(tl.int64) * skh
    vb = v + b.to(tl.int64) * svb + (row % H).to(tl.int64) * svh
    return b, L, L - window, skey, tkey, qq, kb, vb


@triton.jit
def _qsig(qs, row, R: tl.constexpr, W: tl.constexpr, RWP: tl.constexpr):
    """The cut kernel's query signature words (read past L1)."""
    rw = tl.arange(0, RWP)
    return tl.load(qs + row * R * W + rw, mask=rw < R * W, other=0, cache_modifier=".cg").to(tl.uint32, bitcast=True)


@triton.jit(do_not_specialize=["seed"])
def scan_kernel(q, proj, qs, ks, k, v, lens, cut, scr, cnt, po, plse, tr,
                sqb, sqh, skb, skh, skn, svb, svh, svn, H, N, S1, S, sink, window, seed, scale_log2,
                R: tl.constexpr, M: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                D: tl.constexpr, RWP: tl.constexpr, NH: tl.constexpr, SH: tl.constexpr, CB: tl.constexpr,
                BN: tl.constexpr, HW: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = 0,
                TR: tl.constexpr = 0):
    """Program (row, 0) attends the row's sinks and window, which need no cut, without waiting
    for the cut kernel; program (row, sp > 0) scans span sp - 1 of the row's middle keys
    (_scan_part). Partial column sp of S, keys attended cnt[row, sp] (row stride S). A span
    program scores its first block with its own query signature before the wait for the cut,
    and loads the second block's words."""
    row = tl.program_id(0)
    sp = tl.program_id(1)
    stamp(tr, 0, sp, TR)
    b, L, hi, skey, tkey, qq, kb, vb = row_pre(q, lens, k, v, seed, row, H, sqb, sqh, skb, skh, svb, svh,
                                               window, R, M, D)
    if sp == 0:
        m_i, l_i, acc, c = _fixed_part(qq, kb, vb, skn, svn, L, hi, sink, scale_log2, M, D, BN, IEEE)
    else:
        chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - sink, 0), S1 - 1), CB) * CB
        start = sink + (sp - 1) * chunk
        end = tl.minimum(start + chunk, hi)
        qv0 = qwords(q, proj, row, b, H, sqb, sqh, R, W, D, RWP)
        n = start + tl.arange(0, CB)
        w0 = sig_words(ks, row, n, n < end, N, W, WP)
        s = _wbins(qv0, w0, R, W, WP, RWP, HW, SH, NH)
        w_nx = sig_words(ks, row, n + CB, n + CB < end, N, W, WP)
        pdl_wait(PDL)
        t = tl.load(cut + row * 2)
        tu = tl.load(cut + row * 2 + 1)
        qv = _qsig(qs, row, R, W, RWP)  # the cut's own bits: scan, sample and cut must agree on each key
        if tl.sum((qv != qv0).to(tl.int32), 0) > 0:  # rounding put a dot on the other side of 0
            s = _wbins(qv, w0, R, W, WP, RWP, HW, SH, NH)
        stamp(tr, 1, t + tu + tl.sum(s, 0), TR)
        m_i, l_i, acc, c = _scan_part(qv, s, w_nx, qq, ks, kb, vb, skn, svn, scr, tr, row, start, end,
                                      t, tu, tkey, N, scale_log2, R, M, W, WP, D, RWP, NH, SH, CB, BN, HW, IEEE,
                                      TR)
    stamp(tr, 3, tl.sum(l_i, 0) + tl.sum(tl.sum(acc, 1), 0), TR)
    write_partial(po, plse, acc, m_i, l_i, 0.0, row, sp, S, R, M, D)
    tl.store(cnt + row * S + sp, c)
    stamp(tr, 4, c, TR)


@triton.jit
def _fixed_part(qq, kb, vb, skn, svn, L, hi, sink, scale_log2, M: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                IEEE: tl.constexpr):
    """The row's sinks [0, sink) and window [hi, L) (all of [0, L) when they meet), read in
    position order. Returns (m_i, l_i, acc, keys attended)."""
    s_end = tl.minimum(sink, L)
    w_start = tl.maximum(hi, s_end)
    nf = s_end + L - w_start
    m_i, l_i, acc = online_init(M, D)
    for j0 in tl.range(0, nf, BN, num_stages=1):  # not pipelined: its buffers would double the shared memory
        f = j0 + tl.arange(0, BN)
        ok = f < nf
        x = tl.where(f < s_end, f, w_start + f - s_end).to(tl.int64)
        kk, vv = kv_rows(kb, vb, skn, svn, x, ok, D)
        m_i, l_i, acc = attend_rows(qq, kk, vv, ok, scale_log2, m_i, l_i, acc, IEEE)
    return m_i, l_i, acc, nf


@triton.jit(do_not_specialize=["seed"])
def sample_kernel(q, qs, ks, k, v, lens, cut, pil, pbin, cnt, po, plse, stats, tot, tr,
                  sqb, sqh, skb, skh, skn, svb, svh, svn,
                  H, N, S1, S2, sink, window, K, KF, m0, seed, scale_log2, zz, eps2, infl,
                  R: tl.constexpr, M: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                  D: tl.constexpr, RWP: tl.constexpr, NH: tl.constexpr, SH: tl.constexpr, BN: tl.constexpr,
                  M0P: tl.constexpr, SP: tl.constexpr, HW: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = 0,
                  TR: tl.constexpr = 0, PRE: tl.constexpr = 0, OUT: tl.constexpr = 0, CNT: tl.constexpr = 0):
    """Program (row, j) sizes the row's sample from D_F (the scan's columns [0, S1)) and the
    pilot scores, then attends its share (_sample_part): partial column S1 + j of S1 + S2.
    Before the wait for the scan it reads the cut kernel's outputs (that kernel finished
    before the scan's programs passed their own wait, so before this launch began) and loads
    its first block's signature words; with PRE it also attends that block's draws (the
    draws' positions do not depend on the budget) and loads the next block's words. CNT: adds
    its keys attended to tot[row] (zeroed by the cut kernel), program (row, 0) the scan's too."""
    row = tl.program_id(0)
    j2 = tl.program_id(1)
    stamp(tr, 0, j2, TR)
    b, L, hi, skey, tkey, qq, kb, vb = row_pre(q, lens, k, v, seed, row, H, sqb, sqh, skb, skh, svb, svh,
                                               window, R, M, D)
    K = _row_k(K, KF, L)
    n_mid = tl.maximum(hi - sink, 0)
    t = tl.load(cut + row * 2, cache_modifier=".cg")
    tu = tl.load(cut + row * 2 + 1, cache_modifier=".cg")
    qv = _qsig(qs, row, R, W, RWP)
    spl = _pilot(pil, pbin, row, n_mid, m0, sink, skey, t, tu, tkey, R, M, M0P)
    ps, pm, pv = pilot_stats(spl * 0.6931471805599453, tl.where(n_mid > 0, m0, 0), M0P)
    j = tl.arange(0, BN)
    x0 = draw_pos(j2 * BN + j, skey, sink, n_mid)
    w0 = sig_words(ks, row, x0, x0 < sink + n_mid, N, W, WP)  # none when there is no middle
    m_i, l_i, acc = online_init(M, D)
    c0 = 0
    x1, w1 = x0, w0
    if PRE:
        use, kk, vv = _draw_tile(qv, x0, w0, x0 < sink + n_mid, kb, vb, skn, svn, t, tu, tkey, R, W, WP, RWP, HW,
                                 SH, NH, D)
        x1 = draw_pos(j2 * BN + S2 * BN + j, skey, sink, n_mid)
        w1 = sig_words(ks, row, x1, x1 < sink + n_mid, N, W, WP)
        m_i, l_i, acc = attend_rows(qq, kk, vv, use, scale_log2, m_i, l_i, acc, IEEE)
        c0 = tl.sum(use.to(tl.int32), 0)
    pdl_wait(PDL)
    stamp(tr, 1, t + tu + tl.sum(qv, 0).to(tl.int32), TR)
    m_i, l_i, acc, lw2, c = _sample_part(qv, ps, pm, pv, x0, w0, x1, w1, m_i, l_i, acc, c0, qq, ks, kb, vb, skn,
                                         svn, plse, stats, tr, row, j2, S1, S2, sink, n_mid, K, m0, t, tu, skey,
                                         tkey, N, scale_log2, zz, eps2, infl, pil, pbin, po, R, M, W, WP, D, RWP, NH,
                                         SH, BN, SP, HW, IEEE, PRE, TR, M0P, OUT)
    stamp(tr, 3, tl.sum(l_i, 0) + tl.sum(tl.sum(acc, 1), 0), TR)
    write_partial(po, plse, acc, m_i, l_i, lw2, row, S1 + j2, S1 + S2, R, M, D)
    tl.store(cnt + row * (S1 + S2) + S1 + j2, c)
    if CNT:
        sc = tl.arange(0, SP)
        fixed = tl.sum(tl.load(cnt + row * (S1 + S2) + sc, mask=sc < tl.where(j2 == 0, S1, 0), other=0), 0)
        tl.atomic_add(tot + row, c + fixed)
    stamp(tr, 4, c, TR)
