"""Triton kernel behind vattn.kernels.sample (imported lazily: needs triton)."""
import triton
import triton.language as tl


@triton.jit
def _mix(x, key):
    x = (x ^ key) * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    return x ^ (x >> 13)


@triton.jit
def _feistel(x, hb, mask, key):
    lft = x >> hb
    rgt = x & mask
    for i in tl.static_range(4):
        nxt = lft ^ (_mix(rgt, key + i * 0x3C6EF372) & mask)
        lft = rgt
        rgt = nxt
    return (lft << hb) | rgt


@triton.jit
def perm_sample_kernel(hi, member, out, acc, lo, seed, H, T, N, CAP,
                       BC: tl.constexpr, WALK: tl.constexpr):
    row = tl.program_id(0)
    b = row // (H * T)
    j = tl.program_id(1) * BC + tl.arange(0, BC)
    n_mid = tl.maximum(tl.load(hi + b) - lo, 0)
    # half-width of the smallest even power-of-two domain holding n_mid
    bits = 0
    for i in tl.static_range(31):
        bits += (((n_mid - 1) >> i) > 0).to(tl.int32)
    hb = (bits + 1) // 2
    mask = ((1 << hb) - 1).to(tl.uint32)
    key = (seed ^ (row * 0x1B873593)).to(tl.uint32)
    y = _feistel(j.to(tl.uint32), hb.to(tl.uint32), mask, key)
    # cycle walking (a bijection of [0, n_mid)); stop once every live slot is in range
    live = j < n_mid
    todo = tl.sum(((y >= n_mid) & live).to(tl.int32), 0)
    it = 0
    while (todo > 0) & (it < WALK):
        y = tl.where(y >= n_mid, _feistel(y, hb.to(tl.uint32), mask, key), y)
        todo = tl.sum(((y >= n_mid) & live).to(tl.int32), 0)
        it += 1
    ok = (j < n_mid) & (y < n_mid) & (j < CAP)
    pos = lo + y.to(tl.int32)
    mem = tl.load(member + row.to(tl.int64) * N + pos, mask=ok, other=1)
    tl.store(out + row.to(tl.int64) * CAP + j, tl.where(ok, pos, -1), mask=j < CAP)
    tl.store(acc + row.to(tl.int64) * CAP + j, (ok & (mem == 0)).to(tl.int8), mask=j < CAP)


@triton.jit
def budget_emit_kernel(q, kp, lens, tcnt, sidx, sacc, out, lw, cnt, stats, plse,
                       sqb, sqh, sqt, skb, skh, skn, H, HKV, T, KT, CAP,
                       sink, window, m0, scale, zz, eps2, infl, S1, ST,
                       G: tl.constexpr, R: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
                       CP: tl.constexpr, M0P: tl.constexpr, FP: tl.constexpr, BLK: tl.constexpr,
                       IEEE: tl.constexpr, PART: tl.constexpr, SP: tl.constexpr, POOLED: tl.constexpr):
    """One program per selection row: sample compaction, verified budget, Selection assembly.

    Row layout: [sink | window | top-k (tcnt[row] keys, written before) | sample | -1 pad].
    Sample: accepted slots of the permutation prefix, compacted; the first m = min(m0, n_r,
    accepted) are the pilot, the next ext the extension. ext = the CPU reference's
    denominator-mode budget (_ext_size, pilot variance times infl), max over the R query heads,
    at most the slots held.
    Weights (_weights): POOLED n_r / (m + ext) on every sample key; else pilot 1, extension
    (n_r - m) / ext.
    D_F (the exact mass in D_hat): PART=1 reads it from the split-KV partials of an attention
    pass over [sink | window | top-k] (plse [rows*R, ST] log2 units, columns [0, S1)): every
    fixed key counts, as in the CPU reference. PART=0 scores the sink and window keys here
    (top-k mass left out: D_hat smaller, budget larger) and writes them to slots [0, F0).
    CP is the compaction block; the sample slots are compacted in a loop over CAP.
    """
    row = tl.program_id(0)
    t = row % T
    h = (row // T) % H
    b = row // (H * T)
    b64 = b.to(tl.int64)
    L = tl.load(lens + b)
    hi = L - window
    F0 = sink + window
    top_n = tl.load(tcnt + row)
    base = F0 + top_n
    n_r = tl.maximum(hi - sink - top_n, 0)
    ob = out + row.to(tl.int64) * KT
    lb = lw + row.to(tl.int64) * KT
    # compact the accepted sample slots to ob[base + rank]
    avail = 0
    for c0 in range(0, CAP, CP):
        c = c0 + tl.arange(0, CP)
        acc = tl.load(sacc + row.to(tl.int64) * CAP + c, mask=c < CAP, other=0).to(tl.int32)
        six = tl.load(sidx + row.to(tl.int64) * CAP + c, mask=c < CAP, other=-1)
        rank = avail + tl.cumsum(acc, 0) - 1
        avail += tl.sum(acc, 0)
        tl.store(ob + base + rank, six, mask=acc > 0)
    m = tl.minimum(tl.minimum(m0, n_r), avail)
    tl.debug_barrier()
    # pilot and fixed keys, scored by the R query heads of this row
    j = (h * R) // G
    kb = kp + b64 * skb + j.to(tl.int64) * skh
    d = tl.arange(0, D)
    r = tl.arange(0, M)
    qq = tl.load(q + b64 * sqb + (h * R + r)[:, None].to(tl.int64) * sqh + t * sqt + d[None, :],
                 mask=(r < R)[:, None], other=0.0)
    p = tl.arange(0, M0P)
    pok = p < m
    pix = tl.load(ob + base + p, mask=pok, other=0)
    kk = tl.load(kb + pix.to(tl.int64)[:, None] * skn + d[None, :], mask=pok[:, None], other=0.0)
    if IEEE:
        sp = tl.dot(qq.to(tl.float32), tl.trans(kk.to(tl.float32)), input_precision="ieee")
    else:
        sp = tl.dot(qq, tl.trans(kk))
    sp = tl.where(pok[None, :], sp * scale, float("-inf"))
    f = tl.arange(0, FP)
    fok = f < F0
    fix = tl.where(f < sink, f, hi + f - sink)
    if PART:
        # D_F from the partials: sum_s 2^lse_s = sum over fixed keys of exp(score) (natural)
        sc = tl.arange(0, SP)
        pl = tl.load(plse + (row * R + r)[:, None].to(tl.int64) * ST + sc[None, :],
                     mask=(r < R)[:, None] & (sc < S1)[None, :], other=float("-inf"))
        shift = tl.maximum(tl.maximum(tl.max(sp, 1), tl.max(pl, 1) * 0.6931471805599453), -1e30)
        dfix = tl.sum(tl.exp2(pl - shift[:, None] * 1.4426950408889634), 1)
    else:
        kf = tl.load(kb + tl.where(fok, fix, 0).to(tl.int64)[:, None] * skn + d[None, :], mask=fok[:, None],
                     other=0.0)
        if IEEE:
            sf = tl.dot(qq.to(tl.float32), tl.trans(kf.to(tl.float32)), input_precision="ieee")
        else:
            sf = tl.dot(qq, tl.trans(kf))
        sf = tl.where(fok[None, :], sf * scale, float("-inf"))
        shift = tl.maximum(tl.maximum(tl.max(sp, 1), tl.max(sf, 1)), -1e30)
        dfix = tl.sum(tl.where(fok[None, :], tl.exp(sf - shift[:, None]), 0.0), 1)
    xp = tl.where(pok[None, :], tl.exp(sp - shift[:, None]), 0.0)
    mf = m.to(tl.float32)
    mean = tl.sum(xp, 1) / tl.maximum(mf, 1.0)
    dev_ = tl.where(pok[None, :], xp - mean[:, None], 0.0)
    var = tl.sum(dev_ * dev_, 1) / tl.maximum(mf - 1.0, 1.0)
    nrf = n_r.to(tl.float32)
    dhat = dfix + nrf * mean
    braw, want = _ext_size(var, dhat, n_r, m, m0, zz, eps2, infl, r < R, POOLED)
    ext = tl.maximum(tl.minimum(want, avail - m), 0)
    count = base + m + ext
    wp, lwv = _weights(n_r, m, ext, POOLED)
    tl.store(cnt + row, count)
    tl.store(stats + row * 4 + tl.arange(0, 4),
             tl.where(tl.arange(0, 4) == 0, mf, tl.where(tl.arange(0, 4) == 1, ext.to(tl.float32),
                      tl.where(tl.arange(0, 4) == 2, nrf, braw))))
    # fixed keys, then weights for the whole row and -1 padding after count
    if not PART:  # with PART the emit pass wrote them
        tl.store(ob + f, fix, mask=fok)
        tl.store(lb + f, tl.zeros([FP], tl.float32), mask=fok)
    tl.debug_barrier()
    for p0 in range(base, KT, BLK):  # top-k slots got weight 0 from the emit pass
        pp = p0 + tl.arange(0, BLK)
        inr = pp < KT
        w = tl.where(pp < base + m, wp, tl.where(pp < count, lwv, float("-inf")))
        tl.store(lb + pp, w, mask=inr)
        tl.store(ob + pp, tl.full([BLK], -1, tl.int32), mask=inr & (pp >= count))


@triton.jit
def _draw(ob, mb, tr, c0, avail, goal, dom, n_mid, hb, mask, key, sink, base, CB: tl.constexpr, CAPG: tl.constexpr):
    """Draw blocks of CB permutation slots from c0 until avail >= goal accepted keys (in range,
    member <= tr: not top-k); the accepted keys go to ob[base + rank], ranks < goal only if CAPG.
    Returns (next slot, accepted)."""
    while (c0 < dom) & (avail < goal):
        j = c0 + tl.arange(0, CB)
        y = _feistel(j.to(tl.uint32), hb, mask, key)
        ok = (j < dom) & (y < n_mid)
        pos = sink + y.to(tl.int32)
        mem = tl.load(mb + pos, mask=ok, other=255).to(tl.int32)
        acc = (ok & (mem <= tr)).to(tl.int32)
        rank = avail + tl.cumsum(acc, 0) - 1
        put = acc > 0
        if CAPG:
            put = put & (rank < goal)
        tl.store(ob + base + rank, pos, mask=put)
        avail += tl.sum(acc, 0)
        c0 += CB
    return c0, avail


@triton.jit
def _pilot_scores(q, kp, ob, b64, h, t, base, m, sqb, sqh, sqt, skb, skh, skn, scale,
                  G: tl.constexpr, R: tl.constexpr, M: tl.constexpr, D: tl.constexpr, M0P: tl.constexpr,
                  IEEE: tl.constexpr):
    """f32 [M, M0P]: scale * q . k for the R query heads of the row and the m pilot keys at
    ob[base:base + m] (-inf elsewhere)."""
    kb = kp + b64 * skb + ((h * R) // G).to(tl.int64) * skh
    d = tl.arange(0, D)
    r = tl.arange(0, M)
    qq = tl.load(q + b64 * sqb + (h * R + r)[:, None].to(tl.int64) * sqh + t * sqt + d[None, :],
                 mask=(r < R)[:, None], other=0.0)
    p = tl.arange(0, M0P)
    pok = p < m
    pix = tl.load(ob + base + p, mask=pok, other=0)
    kk = tl.load(kb + pix.to(tl.int64)[:, None] * skn + d[None, :], mask=pok[:, None], other=0.0)
    if IEEE:
        sp = tl.dot(qq.to(tl.float32), tl.trans(kk.to(tl.float32)), input_precision="ieee")
    else:
        sp = tl.dot(qq, tl.trans(kk))
    return tl.where(pok[None, :], sp * scale, float("-inf"))


@triton.jit
def _ext_size(var, dhat, n_r, m, m0, zz, eps2, infl, ok, POOLED: tl.constexpr):
    """Extension size from the pilot's per-head variance var [M] and D_hat [M] (heads where ok):
    the CPU reference's denominator-mode budget (two-sided z, finite-population correction),
    with var raised to its upper confidence bound var * infl (infl: sample.var_inflation of
    the configured pilot size m0; 1 = plug-in).
    Two-phase: the extension alone stands for the n_r - m keys outside the pilot, b = smallest
    with b0 (pop - b) / (pop - 1) <= b over pop = n_r - m. Pooled: the whole sample (pilot
    first) stands for all n_r keys, the same formula over pop = n_r sizes it, b_ext = b - m.
    Returns (raw extension: max over heads, may be < 0 pooled; want = raw clamped to
    [1 (two-phase) or 0 (pooled), n_r - m])."""
    # The factor falls as the pilot grows, so m0's factor is too small for a smaller pilot. Such
    # a pilot is either the whole residual (m = n_r: want = 0 whatever the factor) or the slots
    # ran out (budget_emit with few slots): there ask for the whole residual (infinite factor).
    var = var * tl.where(m < tl.minimum(m0, n_r), float("inf"), infl)
    restf = (n_r - m).to(tl.float32)
    lo = 1.0  # two-phase: one extension key at least (the pilot stands for itself only)
    pop = restf
    if POOLED:
        lo = 0.0
        pop = n_r.to(tl.float32)
    b0 = zz * pop * pop * var / (eps2 * dhat * dhat)
    b0 = tl.where(b0 == b0, b0, float("inf"))  # NaN (nothing to trust): exact
    bq = tl.where(b0 == float("inf"), pop, tl.ceil(b0 * pop / tl.maximum(pop - 1.0 + b0, 1e-30) - 1e-6))
    braw = tl.max(tl.where(ok, bq, 0.0), 0)
    if POOLED:
        braw -= m.to(tl.float32)
    want = tl.minimum(tl.maximum(braw, lo), restf)
    return braw, tl.maximum(want.to(tl.int32), 0)


@triton.jit
def _weights(n_r, m, ext, POOLED: tl.constexpr):
    """(pilot, extension) log-weights: pooled log(n_r / (m + ext)) on both; two-phase 0 and
    log((n_r - m) / ext)."""
    if POOLED:
        we = tl.log(n_r.to(tl.float32) / tl.maximum(m + ext, 1).to(tl.float32))
        wp = we
    else:
        we = tl.log((n_r - m).to(tl.float32) / tl.maximum(ext, 1).to(tl.float32))
        wp = tl.zeros_like(we)
    return wp, we


@triton.jit
def _budget(sp, plse, row, m, m0, n_r, zz, eps2, infl, S1, ST, R: tl.constexpr, M: tl.constexpr, M0P: tl.constexpr,
            SP: tl.constexpr, POOLED: tl.constexpr):
    """The verified budget (_ext_size) from the pilot scores sp [M, M0P] and D_F (the split-KV
    partials of attention pass 1, plse [rows*R, ST] log2 units, columns [0, S1))."""
    var, dfix, mean = _pilot_moments(sp, plse, row, m, S1, ST, R, M, M0P, SP)
    r = tl.arange(0, M)
    return _ext_size(var, dfix + n_r.to(tl.float32) * mean, n_r, m, m0, zz, eps2, infl, r < R, POOLED)


@triton.jit
def _pilot_stats(sp, m, M0P: tl.constexpr):
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
    """(variance, D_F, mean) on one shift per head: the pilot's stats (_pilot_stats) rescaled,
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
def _pilot_moments(sp, plse, row, m, S1, ST, R: tl.constexpr, M: tl.constexpr, M0P: tl.constexpr,
                   SP: tl.constexpr):
    """Per head, with one shift: (variance and mean of exp(s) over the m pilot keys, sp [M, M0P]
    natural-log scores, -inf for a key that counts as 0; D_F, the exact mass, from the split-KV
    partials plse [rows*R, ST] log2 units, columns [0, S1))."""
    pshift, mean, var = _pilot_stats(sp, m, M0P)
    return _moments(pshift, mean, var, plse, row, S1, ST, R, M, SP)


@triton.jit
def _finish(cnt, stats, lb, ob, row, base, m, ext, n_r, braw, stop, PAD: tl.constexpr, BLK: tl.constexpr,
            POOLED: tl.constexpr):
    """count, stats (m, ext, n_r, raw extension) and the sample weights (_weights) at slots
    [base, stop) (PAD: -inf and index -1 from count on)."""
    count = base + m + ext
    wp, lwv = _weights(n_r, m, ext, POOLED)
    tl.store(cnt + row, count)
    i4 = tl.arange(0, 4)
    tl.store(stats + row * 4 + i4, tl.where(i4 == 0, m.to(tl.float32), tl.where(i4 == 1, ext.to(tl.float32),
                                           tl.where(i4 == 2, n_r.to(tl.float32), braw))))
    for p0 in range(base, stop, BLK):
        pp = p0 + tl.arange(0, BLK)
        inr = pp < stop
        tl.store(lb + pp, tl.where(pp < base + m, wp, tl.where(pp < count, lwv, float("-inf"))), mask=inr)
        if PAD:
            tl.store(ob + pp, tl.full([BLK], -1, tl.int32), mask=inr & (pp >= count))


@triton.jit
def _row(lens, tcnt, out, lw, member, row, H, T, N, KT, sink, window):
    b = row // (H * T)
    top_n = tl.load(tcnt + row)
    n_r = tl.maximum(tl.load(lens + b) - window - sink - top_n, 0)
    return (b, (row // T) % H, row % T, sink + window + top_n, n_r, out + row.to(tl.int64) * KT,
            lw + row.to(tl.int64) * KT, member + row.to(tl.int64) * N)


@triton.jit
def sample_budget_kernel(q, kp, lens, tcnt, member, thr, out, lw, cnt, stats, plse, ctl,
                         sqb, sqh, sqt, skb, skh, skn, H, T, N, KT, seed,
                         sink, window, m0, scale, zz, eps2, infl, S1, ST,
                         G: tl.constexpr, R: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
                         CB: tl.constexpr, M0P: tl.constexpr, SP: tl.constexpr, BLK: tl.constexpr,
                         IEEE: tl.constexpr, PAD: tl.constexpr, PAR: tl.constexpr, POOLED: tl.constexpr):
    """One program per selection row: permutation sample + verified budget + assembly.

    The sample comes from perm_sample_kernel's keyed Feistel permutation P of the domain
    [0, 4^hb) without cycle walking: slots j = 0, 1, ... in order, keeping P(j) < n_mid. The
    kept values, in order, are a uniformly random order of [0, n_mid) (the restriction of a
    random permutation to a subset), so every prefix is a uniform sample without replacement.
    Blocks of CB slots are drawn, compacting the accepted slots (member <= thr: not top-k) to
    out[row, base + rank], until the pilot (m0 accepted) is in hand, then until m + want
    accepted, want = the budget (_ext_size): the whole residual is reachable (no slot cap),
    so ext = want on every row. D_F comes from the split-KV partials of attention pass 1
    over [sink | window | top-k] (plse), so it is the exact mass of every fixed key. PAD: write
    -inf weights and -1 indices after count up to KT (a full Selection row); else only up to
    count. PAR: only the pilot blocks are drawn here and ctl[row] = (next slot, accepted so
    far); sample_count_kernel + sample_scatter_kernel draw the rest with several programs per row.
    """
    row = tl.program_id(0)
    b, h, t, base, n_r, ob, lb, mb = _row(lens, tcnt, out, lw, member, row, H, T, N, KT, sink, window)
    n_mid, n_r, hb, mask, key, dom = _perm_params(lens, tcnt, row, H, T, window, sink, seed)
    goal = tl.minimum(m0, n_r)
    tr = tl.load(thr + row)
    c0, avail = _draw(ob, mb, tr, tl.full([], 0, tl.int32), tl.full([], 0, tl.int32), goal, dom, n_mid, hb, mask,
                      key, sink, base, CB, False)
    m = tl.minimum(goal, avail)
    tl.debug_barrier()
    sp = _pilot_scores(q, kp, ob, b.to(tl.int64), h, t, base, m, sqb, sqh, sqt, skb, skh, skn, scale,
                       G, R, M, D, M0P, IEEE)
    braw, want = _budget(sp, plse, row, m, m0, n_r, zz, eps2, infl, S1, ST, R, M, M0P, SP, POOLED)
    if PAR:
        tl.store(ctl + row * 2 + tl.arange(0, 2), tl.where(tl.arange(0, 2) == 0, c0, avail))
        ext = want
        stop = tl.minimum(base + avail, base + m + want)
    else:  # draw on until m + want accepted keys (the rest of the permutation holds all of R)
        c0, avail = _draw(ob, mb, tr, c0, avail, m + want, dom, n_mid, hb, mask, key, sink, base, CB, True)
        ext = tl.maximum(tl.minimum(want, avail - m), 0)
        stop = base + m + ext
    tl.debug_barrier()
    _finish(cnt, stats, lb, ob, row, base, m, ext, n_r, braw, KT if PAD else stop, PAD, BLK, POOLED)


@triton.jit
def _perm_params(lens, tcnt, row, H, T, window, sink, seed):
    b = row // (H * T)
    hi = tl.load(lens + b) - window
    n_mid = tl.maximum(hi - sink, 0)
    n_r = tl.maximum(n_mid - tl.load(tcnt + row), 0)
    bits = 0
    for i in tl.static_range(31):
        bits += (((n_mid - 1) >> i) > 0).to(tl.int32)
    hb = ((bits + 1) // 2).to(tl.uint32)
    mask = ((1 << hb) - 1).to(tl.uint32)
    key = (seed ^ (row * 0x1B873593)).to(tl.uint32)
    dom = 1 << (2 * hb.to(tl.int32))
    return n_mid, n_r, hb, mask, key, dom


@triton.jit
def _par_blocks(stats, ctl, row, n_r, dom, CB: tl.constexpr, NB, MARGIN, EXTRA):
    """Blocks of CB slots after the pilot that sample_count_kernel counts: enough for the
    expected slots of the missing accepted keys times MARGIN plus EXTRA blocks (the scatter
    pass draws on serially in the rare case they fall short)."""
    m = tl.load(stats + row * 4).to(tl.int32)
    want = tl.load(stats + row * 4 + 1).to(tl.int32)
    c0 = tl.load(ctl + row * 2)
    a0 = tl.load(ctl + row * 2 + 1)
    need = m + want - a0
    est = need.to(tl.float32) * dom.to(tl.float32) / tl.maximum(n_r, 1).to(tl.float32) * MARGIN
    nbc = tl.minimum(tl.cdiv(est.to(tl.int32), CB) + EXTRA, tl.cdiv(tl.maximum(dom - c0, 0), CB))
    nbc = tl.where(need > 0, tl.maximum(tl.minimum(nbc, NB), 1), 0)
    return m, want, c0, a0, nbc


@triton.jit
def sample_count_kernel(lens, tcnt, member, thr, stats, ctl, bcnt, H, T, N, seed, sink, window, NB, MARGIN, EXTRA,
                        CB: tl.constexpr):
    """Program (row, p) counts the accepted slots (in range, not top-k) of blocks p, p + P, ...
    after the pilot (P programs per row: few idle programs however large the domain)."""
    row = tl.program_id(0)
    n_mid, n_r, hb, mask, key, dom = _perm_params(lens, tcnt, row, H, T, window, sink, seed)
    m, want, c0, a0, nbc = _par_blocks(stats, ctl, row, n_r, dom, CB, NB, MARGIN, EXTRA)
    tr = tl.load(thr + row)
    for bi in range(tl.program_id(1), nbc, tl.num_programs(1)):
        j = c0 + bi * CB + tl.arange(0, CB)
        y = _feistel(j.to(tl.uint32), hb, mask, key)
        ok = (j < dom) & (y < n_mid)
        mem = tl.load(member + row.to(tl.int64) * N + sink + y.to(tl.int32), mask=ok, other=255).to(tl.int32)
        tl.store(bcnt + row * NB + bi, tl.sum((ok & (mem <= tr)).to(tl.int32), 0))


@triton.jit
def sample_scatter_kernel(lens, tcnt, member, thr, stats, ctl, bcnt, out, lw, H, T, N, KT, seed, sink, window,
                          NB, MARGIN, EXTRA, CB: tl.constexpr, NBP: tl.constexpr, POOLED: tl.constexpr):
    """Program (row, p), for its blocks i = p, p + P, ...: rank offset of block i = accepted
    before it (pilot + prefix of block counts); writes its accepted keys at out[row, base + rank]
    (rank < m + want) with the extension weight (_weights). The last counted block draws on serially if the
    counted blocks fell short."""
    row = tl.program_id(0)
    n_mid, n_r, hb, mask, key, dom = _perm_params(lens, tcnt, row, H, T, window, sink, seed)
    m, want, c0, a0, nbc = _par_blocks(stats, ctl, row, n_r, dom, CB, NB, MARGIN, EXTRA)
    goal = m + want
    bb = tl.arange(0, NBP)
    cs = tl.load(bcnt + row * NB + bb, mask=bb < nbc, other=0)
    tot = a0 + tl.sum(cs, 0)
    base = sink + window + tl.load(tcnt + row)
    ob = out + row.to(tl.int64) * KT
    lb = lw + row.to(tl.int64) * KT
    mb = member + row.to(tl.int64) * N
    tr = tl.load(thr + row)
    wp, lwv = _weights(n_r, m, want, POOLED)
    for bi in range(tl.program_id(1), nbc, tl.num_programs(1)):
        avail = a0 + tl.sum(tl.where(bb < bi, cs, 0), 0)
        s0 = c0 + bi * CB
        if avail < goal:
            j = s0 + tl.arange(0, CB)
            y = _feistel(j.to(tl.uint32), hb, mask, key)
            ok = (j < dom) & (y < n_mid)
            mem = tl.load(mb + sink + y.to(tl.int32), mask=ok, other=255).to(tl.int32)
            acc = (ok & (mem <= tr)).to(tl.int32)
            rank = avail + tl.cumsum(acc, 0) - 1
            st = (acc > 0) & (rank < goal)
            tl.store(ob + base + rank, sink + y.to(tl.int32), mask=st)
            tl.store(lb + base + rank, tl.zeros([CB], tl.float32) + lwv, mask=st)
        if (bi == nbc - 1) & (tot < goal):
            c = s0 + CB
            avail = tot
            while (c < dom) & (avail < goal):
                j = c + tl.arange(0, CB)
                y = _feistel(j.to(tl.uint32), hb, mask, key)
                ok = (j < dom) & (y < n_mid)
                mem = tl.load(mb + sink + y.to(tl.int32), mask=ok, other=255).to(tl.int32)
                acc = (ok & (mem <= tr)).to(tl.int32)
                rank = avail + tl.cumsum(acc, 0) - 1
                st = (acc > 0) & (rank < goal)
                tl.store(ob + base + rank, sink + y.to(tl.int32), mask=st)
                tl.store(lb + base + rank, tl.zeros([CB], tl.float32) + lwv, mask=st)
                avail += tl.sum(acc, 0)
                c += CB
