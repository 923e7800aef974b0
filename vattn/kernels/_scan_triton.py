"""Triton kernels behind vattn.kernels.scan (imported lazily: needs triton). See scan.py.

Selection rows are shared (one per KV head, its G query heads in the M dim of tl.dot), T = 1.
Scores are in the log2 domain, as in the other decode kernels.
"""
import triton
import triton.language as tl

from vattn.kernels._bits_triton import popc, popc_hw, qwords, scores  # noqa: F401 (jit globals)
from vattn.kernels._online import dot_qk, finish, online_step  # noqa: F401
from vattn.kernels._sample_triton import _mix

TIE_SALT = tl.constexpr(0x68E31DA4)  # a jit global must be a constexpr


@triton.jit
def _keys(seed, row):
    """(sample key, tie key) of a selection row: uint32, as scan._row_keys."""
    # hashed, not xor-ed: seeds that differ in low bits must not permute the same slots
    key = _mix(row.to(tl.uint32) * 0x1B873593, seed.to(tl.uint32))
    return key, _mix(key, TIE_SALT)


@triton.jit
def _taken(s, n, tau, thu, tkey):
    """Top-k membership of middle keys n with scores s: above tau, or at tau with the key's
    24-bit hash below thu (ties taken at random with probability thu / 2^24)."""
    u = (_mix(n.to(tl.uint32), tkey) >> 8).to(tl.int32)
    return (s > tau) | ((s == tau) & (u < thu))


@triton.jit
def _draw(i, skey, sink, n_mid):
    """Position of sample slot i: uniform over the middle [sink, sink + n_mid), independent slots."""
    h = _mix(i.to(tl.uint32), skey)
    return sink + ((h.to(tl.uint64) * n_mid.to(tl.uint64)) >> 32).to(tl.int32)


@triton.jit
def tau_kernel(q, proj, ks, lens, tau, thu, H, N, sqb, sqh, sqt, sink, window, K, STRIDE,
               G: tl.constexpr, R: tl.constexpr, W: tl.constexpr, D: tl.constexpr, RWP: tl.constexpr,
               NH: tl.constexpr, BN: tl.constexpr, CL: tl.constexpr, HW: tl.constexpr):
    """Per row: tau and thu such that about K middle keys are taken (scan._taken), from the
    histogram of a subsample: runs of CL consecutive keys, one run every CL * STRIDE keys."""
    row = tl.program_id(0)
    b = row // H
    hi = tl.load(lens + b) - window
    n_mid = tl.maximum(hi - sink, 0)
    qv = qwords(q, q, proj, row, b, H, 1, sqb, sqh, sqt, R, W, D, RWP, True)
    lane = tl.arange(0, BN)
    rel = (lane // CL) * (CL * STRIDE) + lane % CL
    hc = tl.zeros([NH], tl.int32)
    for n0 in range(sink, hi, BN * STRIDE):
        n = n0 + rel
        inr = n < hi
        s = scores(qv, ks, row, b, n, inr, H, H, 1, N, G, R, W, RWP, HW)
        hc += tl.histogram(s, NH, mask=inr)
    tot = tl.sum(hc, 0)
    v = tl.arange(0, NH)
    ge = tot - tl.cumsum(hc, 0) + hc  # subsample keys with score >= v
    want = K.to(tl.float32) * tot.to(tl.float32) / tl.maximum(n_mid, 1).to(tl.float32)
    t = tl.maximum(tl.sum((ge.to(tl.float32) >= want).to(tl.int32), 0) - 1, 0)
    neq = tl.sum(tl.where(v == t, hc, 0), 0)
    ngt = tl.sum(tl.where(v == t, ge, 0), 0) - neq
    p = (want - ngt.to(tl.float32)) / tl.maximum(neq, 1).to(tl.float32)
    p = tl.minimum(tl.maximum(p, 0.0), 1.0)
    tl.store(tau + row, t)
    tl.store(thu + row, (p * 16777216.0).to(tl.int32))


@triton.jit
def _write_partial(po, plse, acc, m_i, l_i, row, col, S, R: tl.constexpr, M: tl.constexpr, D: tl.constexpr):
    # partials [rows * R, S, D] / [rows * R, S]; a program that saw no key writes only lse = -inf
    o, lse = finish(acc, m_i, l_i)
    r = tl.arange(0, M)
    d = tl.arange(0, D)
    orow = (row * R + r).to(tl.int64)
    tl.store(po + (orow[:, None] * S + col) * D + d[None, :], o, mask=((r < R) & (l_i > 0))[:, None])
    tl.store(plse + orow * S + col, lse, mask=r < R)


@triton.jit
def _query(q, row, b, H, sqb, sqh, sqt, R: tl.constexpr, M: tl.constexpr, D: tl.constexpr):
    r = tl.arange(0, M)
    d = tl.arange(0, D)
    h = row % H
    return tl.load(q + b.to(tl.int64) * sqb + (h * R + r)[:, None].to(tl.int64) * sqh + d[None, :],
                   mask=(r < R)[:, None], other=0.0)


@triton.jit(do_not_specialize=["seed"])  # seed may be 1: keep it a tensor
def scan_kernel(q, proj, ks, k, v, lens, tau, thu, scr, cnt, po, plse,
                sqb, sqh, sqt, skb, skh, skn, svb, svh, svn,
                H, N, S, sink, window, seed, scale_log2,
                G: tl.constexpr, R: tl.constexpr, M: tl.constexpr, W: tl.constexpr, D: tl.constexpr,
                RWP: tl.constexpr, CB: tl.constexpr, BN: tl.constexpr, HW: tl.constexpr, IEEE: tl.constexpr):
    """Program (row, sp) owns the keys [sp * chunk, ...) of its row: it scores them from the
    signatures, compacts the exact ones (sinks, window, taken middle keys) into its part of
    scr [rows, N], then attends them (weight 0); partial column sp, count cnt[row, sp]."""
    row = tl.program_id(0)
    sp = tl.program_id(1)
    nsp = tl.num_programs(1)
    b = row // H
    L = tl.load(lens + b)
    hi = L - window
    chunk = tl.cdiv(tl.cdiv(L, nsp), CB) * CB
    start = sp * chunk
    end = tl.minimum(start + chunk, L)
    t = tl.load(tau + row)
    tu = tl.load(thu + row)
    skey, tkey = _keys(seed, row)
    qv = qwords(q, q, proj, row, b, H, 1, sqb, sqh, sqt, R, W, D, RWP, True)
    sb = scr + row.to(tl.int64) * N + start
    c = 0
    n = start + tl.arange(0, CB)
    s_nx = scores(qv, ks, row, b, n, (n < end) & (n >= sink) & (n < hi), H, H, 1, N, G, R, W, RWP, HW)
    for n0 in range(start, end, CB):
        n = n0 + tl.arange(0, CB)
        inr = n < end
        mid = inr & (n >= sink) & (n < hi)
        s = s_nx  # the next block's signatures are in flight while this one is compacted
        nn = n + CB
        s_nx = scores(qv, ks, row, b, nn, (nn < end) & (nn >= sink) & (nn < hi), H, H, 1, N, G, R, W, RWP, HW)
        sel = (inr & ~mid) | (mid & _taken(s, n, t, tu, tkey))
        si = sel.to(tl.int32)
        tl.store(sb + c + tl.cumsum(si, 0) - 1, n, mask=sel)
        c += tl.sum(si, 0)
    tl.debug_barrier()  # the compacted positions, written by other threads of this program
    qq = _query(q, row, b, H, sqb, sqh, sqt, R, M, D)
    d = tl.arange(0, D)
    kb = k + b.to(tl.int64) * skb + (row % H).to(tl.int64) * skh
    vb = v + b.to(tl.int64) * svb + (row % H).to(tl.int64) * svh
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    j = tl.arange(0, BN)
    ix_nx = tl.load(sb + j, mask=j < c, other=-1)
    for j0 in range(0, c, BN):
        ix = ix_nx
        jj = j0 + BN + j
        ix_nx = tl.load(sb + jj, mask=jj < c, other=-1)
        ok = ix >= 0
        ix64 = tl.where(ok, ix, 0).to(tl.int64)
        kk = tl.load(kb + ix64[:, None] * skn + d[None, :], mask=ok[:, None], other=0.0)
        vv = tl.load(vb + ix64[:, None] * svn + d[None, :], mask=ok[:, None], other=0.0)
        sc = tl.where(ok[None, :], dot_qk(qq, kk, IEEE) * scale_log2, float("-inf"))
        m_i, l_i, acc = online_step(sc, vv, m_i, l_i, acc, IEEE)
    _write_partial(po, plse, acc, m_i, l_i, row, sp, S, R, M, D)
    tl.store(cnt + row * nsp + sp, c)


@triton.jit(do_not_specialize=["seed"])
def sample_kernel(q, proj, ks, k, v, lens, tau, thu, cnt, po, plse, stats,
                  sqb, sqh, sqt, skb, skh, skn, svb, svh, svn,
                  H, N, S, S1, sink, window, seed, K, m0, scale_log2, zz, eps2, infl,
                  G: tl.constexpr, R: tl.constexpr, M: tl.constexpr, W: tl.constexpr, D: tl.constexpr,
                  RWP: tl.constexpr, M0P: tl.constexpr, SP: tl.constexpr, BN: tl.constexpr, HW: tl.constexpr,
                  IEEE: tl.constexpr):
    """Program (row, sp): every program of a row sizes the same sample from the pilot (the
    first m0 draws) and D_F (pass-1 partials, columns [0, S1)), then attends its share of the
    draws [0, total) with weight n_mid / total (taken keys drawn count as 0), or, when the
    budget reaches the residual's size, its share of the residual exactly (weight 1).
    Partial column S1 + sp, attended keys cnt[row, sp]; program 0 writes stats[row]."""
    row = tl.program_id(0)
    sp = tl.program_id(1)
    nsp = tl.num_programs(1)
    b = row // H
    hi = tl.load(lens + b) - window
    n_mid = tl.maximum(hi - sink, 0)
    t = tl.load(tau + row)
    tu = tl.load(thu + row)
    skey, tkey = _keys(seed, row)
    qv = qwords(q, q, proj, row, b, H, 1, sqb, sqh, sqt, R, W, D, RWP, True)
    qq = _query(q, row, b, H, sqb, sqh, sqt, R, M, D)
    d = tl.arange(0, D)
    kb = k + b.to(tl.int64) * skb + (row % H).to(tl.int64) * skh
    vb = v + b.to(tl.int64) * svb + (row % H).to(tl.int64) * svh
    # the budget, from the pilot and D_F (log2 units throughout)
    m = tl.where(n_mid > 0, m0, 0)
    i = tl.arange(0, M0P)
    pok = i < m
    xp0 = _draw(i, skey, sink, n_mid)
    keep = pok & ~_taken(scores(qv, ks, row, b, xp0, pok, H, H, 1, N, G, R, W, RWP, HW), xp0, t, tu, tkey)
    kp = tl.load(kb + xp0.to(tl.int64)[:, None] * skn + d[None, :], mask=keep[:, None], other=0.0)
    spl = tl.where(keep[None, :], dot_qk(qq, kp, IEEE) * scale_log2, float("-inf"))
    r = tl.arange(0, M)
    c1 = tl.arange(0, SP)
    pl = tl.load(plse + (row * R + r)[:, None].to(tl.int64) * S + c1[None, :],
                 mask=(r < R)[:, None] & (c1 < S1)[None, :], other=float("-inf"))
    shift = tl.maximum(tl.maximum(tl.max(spl, 1), tl.max(pl, 1)), -1e30)
    dfix = tl.sum(tl.exp2(pl - shift[:, None]), 1)
    xp = tl.where(pok[None, :], tl.exp2(spl - shift[:, None]), 0.0)
    mf = tl.maximum(m, 1).to(tl.float32)
    mean = tl.sum(xp, 1) / mf
    dev_ = tl.where(pok[None, :], xp - mean[:, None], 0.0)
    var = tl.sum(dev_ * dev_, 1) / tl.maximum(mf - 1.0, 1.0) * infl
    dhat = dfix + n_mid.to(tl.float32) * mean
    nm = n_mid.to(tl.float32)
    b0 = zz * nm * nm * var / (eps2 * dhat * dhat)
    b0 = tl.where(b0 == b0, b0, float("inf"))  # NaN (nothing to trust): exact
    need = tl.max(tl.where(r < R, tl.ceil(b0 - 1e-6), 0.0), 0)
    limit = tl.maximum(n_mid - K, m)  # at or past the residual's size, attending it exactly is cheaper
    exact = (need >= limit.to(tl.float32)) & (n_mid > 0)
    total = tl.where(exact, n_mid, tl.maximum(need, m.to(tl.float32)).to(tl.int32))
    total = tl.where(n_mid > 0, total, 0)
    lw2 = tl.where(exact, 0.0, tl.log2(nm / tl.maximum(total, 1).to(tl.float32)))
    chunk = tl.cdiv(tl.cdiv(total, nsp), BN) * BN
    st = sp * chunk
    en = tl.minimum(st + chunk, total)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    j = tl.arange(0, BN)
    x_nx = tl.where(exact, sink + st + j, _draw(st + j, skey, sink, n_mid))
    s_nx = scores(qv, ks, row, b, x_nx, st + j < en, H, H, 1, N, G, R, W, RWP, HW)
    got = 0
    for i0 in range(st, en, BN):
        ok = i0 + j < en
        x = x_nx
        s = s_nx  # the next block's signatures are in flight while this one is attended
        inx = i0 + BN + j
        x_nx = tl.where(exact, sink + inx, _draw(inx, skey, sink, n_mid))
        s_nx = scores(qv, ks, row, b, x_nx, inx < en, H, H, 1, N, G, R, W, RWP, HW)
        kp_ = ok & ~_taken(s, x, t, tu, tkey)
        x64 = tl.where(kp_, x, 0).to(tl.int64)
        kk = tl.load(kb + x64[:, None] * skn + d[None, :], mask=kp_[:, None], other=0.0)
        vv = tl.load(vb + x64[:, None] * svn + d[None, :], mask=kp_[:, None], other=0.0)
        sc = tl.where(kp_[None, :], dot_qk(qq, kk, IEEE) * scale_log2 + lw2, float("-inf"))
        m_i, l_i, acc = online_step(sc, vv, m_i, l_i, acc, IEEE)
        got += tl.sum(kp_.to(tl.int32), 0)
    _write_partial(po, plse, acc, m_i, l_i, row, S1 + sp, S, R, M, D)
    tl.store(cnt + row * nsp + sp, got)
    if sp == 0:
        f = tl.arange(0, 8)
        vals = tl.where(f == 0, m.to(tl.float32), 0.0)
        vals = tl.where(f == 1, total.to(tl.float32), vals)
        vals = tl.where(f == 2, nm, vals)
        vals = tl.where(f == 3, need, vals)
        vals = tl.where(f == 4, exact.to(tl.float32), vals)
        vals = tl.where(f == 5, t.to(tl.float32), vals)
        vals = tl.where(f == 6, tu.to(tl.float32), vals)
        tl.store(stats + row * 8 + f, vals)
