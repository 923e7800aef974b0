"""Triton kernels behind vattn.kernels.sampled (imported lazily: needs triton). See sampled.py.

Sample rows are KV heads (G query heads in the M dim of tl.dot), T = 1; the Selection's rows
are KV heads (shared, RS = 1) or query heads (RS = G). Scores in the log2 domain.
"""
import triton
import triton.language as tl

from vattn.kernels._online import dot_qk, kv_rows, online_init, online_step, pdl_wait
from vattn.kernels._scan_triton import (draw_pos, pilot_stats, row_pre, write_partial, budget_total, denominator_b0,
                                        output_b0, store_stats)


@triton.jit
def member_kernel(idx, cnt, starts, lens, bits, kmid, tot, K, NW, H, sink, window, BW: tl.constexpr,
                  BK: tl.constexpr, CNT: tl.constexpr = 0):
    """Program `row` (a selection row, T = 1) writes bits [rows, NW]: bit n set where the row lists
    key n in the middle [start + sink, L - window); kmid[row] = how many; CNT: tot[row] = its
    count (the sample kernels add their keys to it)."""
    row = tl.program_id(0)
    L = tl.load(lens + row // H)
    lo = tl.load(starts + row // H) + sink
    hi = L - window
    base = bits + row.to(tl.int64) * NW
    w = tl.arange(0, BW)
    for w0 in range(0, NW, BW):
        tl.store(base + w0 + w, 0, mask=w0 + w < NW)
    tl.debug_barrier()  # the zeros land before any thread of this program sets a bit
    c = tl.load(cnt + row)
    j = tl.arange(0, BK)
    km = 0
    for j0 in range(0, c, BK):
        ok = j0 + j < c
        p = tl.load(idx + row.to(tl.int64) * K + j0 + j, mask=ok, other=-1)
        mid = ok & (p >= lo) & (p < hi)
        tl.atomic_or(base + p // 32, (1 << (p % 32)).to(tl.int32), mask=mid)
        km += tl.sum(mid.to(tl.int32), 0)
    tl.store(kmid + row, km)
    if CNT:
        tl.store(tot + row, c)


@triton.jit
def _members(bits, srow, NW, x, ok, rok):
    """[M, BN] bool: key x is listed by the selection row srow of each head (rows outside rok:
    none; keys outside ok: not read)."""
    w = tl.load(bits + srow[:, None] * NW + (x // 32)[None, :], mask=rok[:, None] & ok[None, :], other=0)
    return ((w >> (x % 32)[None, :]) & 1) != 0


@triton.jit
def _fold(qq, kk, vv, take, scale_log2, m_i, l_i, acc, got, IEEE: tl.constexpr):
    """Fold a tile's keys in take ([M, BN]) into the running softmax; count them per head."""
    sc = tl.where(take, dot_qk(qq, kk, IEEE) * scale_log2, float("-inf"))
    m_i, l_i, acc = online_step(sc, vv, m_i, l_i, acc, IEEE)
    return m_i, l_i, acc, got + tl.sum(take.to(tl.int32), 1)


@triton.jit(do_not_specialize=["seed"])
def sample_kernel(q, k, v, starts, lens, bits, kmid, po, plse, stats, tot,
                  sqb, sqh, skb, skh, skn, svb, svh, svn,
                  H, NW, S1, S2, sink, window, m0, seed, scale_log2, zz, eps2, infl,
                  R: tl.constexpr, M: tl.constexpr, RS: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                  M0P: tl.constexpr, SP: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = 0,
                  OUT: tl.constexpr = 0, CNT: tl.constexpr = 0):
    """Program (row, j) scores the pilot (the first m0 draws), sizes the row's sample from it and
    D_F (the exact part's partials, columns [0, S1)), then attends blocks j, j + S2, ... of the
    draws, each weighted n_mid / total, a key the head's selection lists counting 0 (exact
    rows: the middle in position order, weight 1): partial column S1 + j of S1 + S2. The pilot's
    keys load and its scores are taken before the wait for the exact part."""
    row = tl.program_id(0)
    j2 = tl.program_id(1)
    S = S1 + S2
    b, L, hi, skey, tkey, qq, kb, vb = row_pre(q, lens, k, v, seed, row, H, sqb, sqh, skb, skh, svb, svh,
                                               window, R, M, D)
    lo = tl.load(starts + b) + sink  # the middle: [start + sink, L - window)
    n_mid = tl.maximum(hi - lo, 0)
    m = tl.where(n_mid > 0, m0, 0)
    r = tl.arange(0, M)
    rok = r < R
    srow = (row * RS + r % RS).to(tl.int64)  # each head's selection row
    i = tl.arange(0, M0P)
    pok = i < m
    xp = draw_pos(i, skey, lo, n_mid)
    kp = tl.load(kb + xp.to(tl.int64)[:, None] * skn + tl.arange(0, D)[None, :], mask=pok[:, None], other=0.0)
    spl = dot_qk(qq, kp, IEEE) * scale_log2  # [M, M0P]
    pdl_wait(PDL)
    keep = pok[None, :] & ~_members(bits, srow, NW, xp, pok, rok)
    sp = tl.where(keep, spl * 0.6931471805599453, float("-inf"))
    if OUT:
        b0 = output_b0(sp, xp, m, po, plse, vb, svn, row, S, S1, n_mid, zz, eps2, infl, R, M, M0P, D, SP, IEEE)
    else:
        ps, pm, pv = pilot_stats(sp, m, M0P)
        b0 = denominator_b0(ps, pm, pv, plse, row, S, S1, n_mid, zz, eps2, infl, R, M, SP)
    K = tl.min(tl.where(rok, tl.load(kmid + srow, mask=rok, other=0), 2147483647), 0)  # the fewest listed
    total, exact, need = budget_total(b0, n_mid, K, m, R, M)
    if j2 == 0:  # (no cut: tau and thu 0)
        store_stats(stats, row, m, total, n_mid, need, exact, 0, 0)
    m_i, l_i, acc = online_init(M, D)
    got = tl.zeros([M], tl.int32)
    j = tl.arange(0, BN)
    if exact:  # the middle in position order, every row read: loads that wait on no other load
        for blk in range(j2, tl.cdiv(n_mid, BN), S2):
            ii = blk * BN + j
            use = ii < n_mid
            kk, vv = kv_rows(kb, vb, skn, svn, (lo + ii).to(tl.int64), use, D)
            take = use[None, :] & ~_members(bits, srow, NW, lo + ii, use, rok)  # [M, BN]
            m_i, l_i, acc, got = _fold(qq, kk, vv, take, scale_log2, m_i, l_i, acc, got, IEEE)
    else:
        for blk in range(j2, tl.cdiv(total, BN), S2):
            ii = blk * BN + j
            use = ii < total
            x = draw_pos(ii, skey, lo, n_mid)
            take = use[None, :] & ~_members(bits, srow, NW, x, use, rok)
            read = tl.sum((take & rok[:, None]).to(tl.int32), 0) > 0  # a key some head needs
            kk, vv = kv_rows(kb, vb, skn, svn, x.to(tl.int64), read, D)
            m_i, l_i, acc, got = _fold(qq, kk, vv, take, scale_log2, m_i, l_i, acc, got, IEEE)
    lw2 = tl.where(exact, 0.0, tl.log2(n_mid.to(tl.float32) / tl.maximum(total, 1).to(tl.float32)))
    write_partial(po, plse, acc, m_i, l_i, lw2, row, S1 + j2, S, R, M, D)
    if CNT:  # keys attended per selection row (a shared row: its heads agree, the first adds)
        tl.atomic_add(tot + srow, got, mask=rok & (r < RS))
