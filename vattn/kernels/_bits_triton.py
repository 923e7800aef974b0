"""Triton kernels behind vattn.kernels.bits and the fused selection (imported lazily: needs triton).

Counting select: agreement scores take only R*32*W + 1 values, so histograms give the exact
threshold. The histogram pass stores one histogram per program; the emit pass sums its row's
histograms (the threshold) and the earlier programs' counts (its slot offsets), so no torch
ops, zero fills or atomics lie between or inside the two launches.
With FUSEQ the query signature (signs of q @ proj, packed) is computed inside each program.
"""
import triton
import triton.language as tl


@triton.jit
def popc_hw(x):
    return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x.to(tl.int32, bitcast=True)],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def popc(x):
    x = x.to(tl.uint32, bitcast=True)
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def sign_word(x, p):
    """uint32: bit c is the sign of x . p[:, c] (x [D] f32, p [D, 32] one word's projection)."""
    c = tl.arange(0, 32)
    return tl.sum((tl.sum(x[:, None] * p, 0) > 0).to(tl.uint32) << c.to(tl.uint32), 0)


@triton.jit
def qwords(q, qs, proj, row, b, H, T, sqb, sqh, sqt,
           R: tl.constexpr, W: tl.constexpr, D: tl.constexpr, RWP: tl.constexpr, FUSEQ: tl.constexpr):
    """uint32 [RWP]: word w of the signature of query head h*R + r at slot r*W + w."""
    t = row % T
    h = (row // T) % H
    rw = tl.arange(0, RWP)
    if FUSEQ:
        d = tl.arange(0, D)
        c = tl.arange(0, 32)
        out = tl.zeros([RWP], tl.uint32)
        for w in tl.static_range(W):  # each proj tile is loaded once per program (L2 traffic)
            p = tl.load(proj + d[:, None] * (32 * W) + w * 32 + c[None, :])
            for r in tl.static_range(R):
                qv = tl.load(q + b.to(tl.int64) * sqb + (h * R + r) * sqh + t * sqt + d).to(tl.float32)
                out = tl.where(rw == r * W + w, sign_word(qv, p), out)
        return out
    else:
        ok = rw < R * W
        v = tl.load(qs + ((b * H * R + h * R + rw // W) * T + t) * W + rw % W, mask=ok, other=0)
        return v.to(tl.uint32, bitcast=True)


@triton.jit
def sig_words(ks, row, b, n, inr, H, HKV, T, N, G: tl.constexpr, R: tl.constexpr, W: tl.constexpr,
              WP: tl.constexpr):
    """Raw signature words of keys n of this selection row: [BN] when W == 1, else [BN, WP]
    (0 outside inr). Apart from `agreement` so a caller can issue the loads a block ahead."""
    h = (row // T) % H
    j = (h * R) // G
    kb = ks + ((b * HKV + j) * N).to(tl.int64) * W
    if W == 1:
        return tl.load(kb + n.to(tl.int64), mask=inr, other=0)
    else:
        w = tl.arange(0, WP)
        return tl.load(kb + n.to(tl.int64)[:, None] * W + w[None, :], mask=inr[:, None] & (w < W)[None, :], other=0)


@triton.jit
def agreement(qv, kw, R: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, RWP: tl.constexpr, HW: tl.constexpr):
    """int32 [BN]: summed over the R query signatures (qv from qwords), the bits each key's
    signature (kw from sig_words) agrees on."""
    rw = tl.arange(0, RWP)
    acc = tl.zeros([kw.shape[0]], tl.int32)
    for w in tl.static_range(W):
        if W == 1:
            k1 = kw
        else:
            k1 = tl.sum(tl.where(tl.arange(0, WP)[None, :] == w, kw, 0), 1)
        for r in tl.static_range(R):
            qw = tl.sum(tl.where(rw == r * W + w, qv, 0), 0)
            x = qw ^ k1.to(tl.uint32, bitcast=True)
            if HW:
                acc += 32 - popc_hw(x)
            else:
                acc += 32 - popc(x)
    return acc


@triton.jit
def scores(qv, ks, row, b, n, inr, H, HKV, T, N,
           G: tl.constexpr, R: tl.constexpr, W: tl.constexpr, RWP: tl.constexpr, HW: tl.constexpr):
    # agreement of BN keys with the R query signatures of this selection row (qv from qwords)
    WP: tl.constexpr = max(2, triton.next_power_of_2(W))
    return agreement(qv, sig_words(ks, row, b, n, inr, H, HKV, T, N, G, R, W, WP), R, W, WP, RWP, HW)


@triton.jit
def hist_kernel(q, qs, proj, ks, hi, hist, top, member, lo, H, HKV, T, N, span, sqb, sqh, sqt,
                G: tl.constexpr, R: tl.constexpr, W: tl.constexpr, D: tl.constexpr, RWP: tl.constexpr,
                NH: tl.constexpr, BN: tl.constexpr, FUSEQ: tl.constexpr, HW: tl.constexpr,
                CACHE: tl.constexpr):
    """Program (row, sp) stores the histogram of its span's scores: hist[row, sp, v] for v < NH
    and top[row, sp] = #scores >= NH (NH = half the bins when the top score is a power of two:
    half the histogram width). Plain stores, no zero fill and no atomics."""
    row = tl.program_id(0)
    sp = tl.program_id(1)
    b = row // (H * T)
    start = tl.maximum(sp * span, lo)
    end = tl.minimum(sp * span + span, tl.load(hi + b))
    qv = qwords(q, qs, proj, row, b, H, T, sqb, sqh, sqt, R, W, D, RWP, FUSEQ)
    hc = tl.zeros([NH], tl.int32)
    tv = tl.zeros([BN], tl.int32)  # per-lane top counts, reduced once after the loop
    n = start + tl.arange(0, BN)
    s_nx = scores(qv, ks, row, b, n, n < end, H, HKV, T, N, G, R, W, RWP, HW)
    for n0 in range(start, end, BN):
        n = n0 + tl.arange(0, BN)
        inr = n < end
        s = s_nx  # the next block's loads are in flight while this block is counted
        s_nx = scores(qv, ks, row, b, n + BN, n + BN < end, H, HKV, T, N, G, R, W, RWP, HW)
        hc += tl.histogram(tl.minimum(s, NH - 1), NH, mask=inr)
        tv += (inr & (s >= NH)).to(tl.int32)
        if CACHE:  # scores fit a byte: the emit pass reads them back instead of recomputing
            tl.store(member + row.to(tl.int64) * N + n, s.to(tl.uint8), mask=inr)
    ntop = tl.sum(tv, 0)
    v = tl.arange(0, NH)
    pr = row * tl.num_programs(1) + sp
    tl.store(hist + pr * NH + v, tl.where(v == NH - 1, hc - ntop, hc))
    tl.store(top + pr, ntop)


@triton.jit
def row_threshold(hist, top, row, sp, K, NH: tl.constexpr, SPP: tl.constexpr):
    """From the row's per-program histograms: tau (the K-th largest score, or 0 when the row
    has fewer keys), ngt = #keys > tau, tot = #keys, and the keys > tau (og) and == tau (oe)
    in the programs before sp (each program's slot offsets: no atomics, deterministic order)."""
    nsp = tl.num_programs(1)
    p = tl.arange(0, SPP)
    v = tl.arange(0, NH)
    pok = p < nsp
    tile = tl.load(hist + (row * nsp + p[:, None]) * NH + v[None, :], mask=pok[:, None], other=0)
    tcol = tl.load(top + row * nsp + p, mask=pok, other=0)
    hrow = tl.sum(tile, 0)
    ntop = tl.sum(tcol, 0)
    tot = tl.sum(hrow, 0) + ntop
    ge = tot - tl.cumsum(hrow, 0) + hrow  # keys with score >= v (v < NH)
    tau = tl.where(ntop >= K, NH, tl.maximum(tl.sum((ge >= K).to(tl.int32), 0) - 1, 0))
    ngt = tl.where(tau == NH, 0, tl.sum(tl.where(v == tau, ge - hrow, 0), 0))
    before = p < sp
    tb = tl.sum(tl.where(before, tcol, 0), 0)
    og = tl.sum(tl.sum(tl.where(before[:, None] & (v[None, :] > tau), tile, 0), 1), 0)
    oe = tl.sum(tl.sum(tl.where(before[:, None] & (v[None, :] == tau), tile, 0), 1), 0)
    og = og + tl.where(tau < NH, tb, 0)
    oe = oe + tl.where(tau == NH, tb, 0)
    return tau, ngt, tot, og, oe


@triton.jit
def emit_kernel(q, qs, proj, ks, hi, hist, top, out, lw, cnt, thr, member, lo, H, HKV, T, N, span, sqb, sqh, sqt,
                K, off, stride,
                G: tl.constexpr, R: tl.constexpr, W: tl.constexpr, D: tl.constexpr, RWP: tl.constexpr,
                NH: tl.constexpr, SPP: tl.constexpr, BN: tl.constexpr, FUSEQ: tl.constexpr, HW: tl.constexpr,
                CACHE: tl.constexpr, WLW: tl.constexpr, FIX: tl.constexpr = 0):
    """Writes the K winners of each row to out[row*stride + off + slot]: keys > tau in position
    order at slots [0, ngt), then the first K - ngt keys == tau. Key n in [lo, hi) is a winner
    iff member[row, n] > thr[row]: with CACHE member holds the score bytes (tau = thr) and the
    taken ties are set to 255 (one byte store per tie, not per key); else member = 0/1, thr = 0.

    FIX > 0 (a power of two >= off): program (row, 0) also writes the row's fixed keys at slots
    [0, off): the sinks [0, lo) and the window [hi, hi + off - lo). WLW: log-weight 0 at every
    slot written (off: the callers' attention treats these slots as exact, no lw stores)."""
    row = tl.program_id(0)
    sp = tl.program_id(1)
    b = row // (H * T)
    if FIX > 0:
        if sp == 0:
            f = tl.arange(0, FIX)
            fok = f < off
            fix = tl.where(f < lo, f, tl.load(hi + b) + f - lo)
            tl.store(out + row.to(tl.int64) * stride + f, fix, mask=fok)
            if WLW:
                tl.store(lw + row.to(tl.int64) * stride + f, tl.zeros([FIX], tl.float32), mask=fok)
    tau, ngt, tot, og, oe = row_threshold(hist, top, row, sp, K, NH, SPP)
    need = K - ngt
    if sp == 0:
        tl.store(cnt + row, tl.minimum(tot, K))
        tl.store(thr + row, tau if CACHE else 0)
    start = tl.maximum(sp * span, lo)
    end = tl.minimum(sp * span + span, tl.load(hi + b))
    if not CACHE:
        qv = qwords(q, qs, proj, row, b, H, T, sqb, sqh, sqt, R, W, D, RWP, FUSEQ)
    ob = out + row.to(tl.int64) * stride + off
    mrow = member + row.to(tl.int64) * N
    n = start + tl.arange(0, BN)
    s_nx = tl.load(mrow + n, mask=(n < end) & CACHE, other=0).to(tl.int32)
    for n0 in range(start, end, BN):
        n = n0 + tl.arange(0, BN)
        inr = n < end
        if CACHE:
            s = s_nx  # the next block's bytes are in flight while this block is written
            s_nx = tl.load(mrow + n + BN, mask=n + BN < end, other=0).to(tl.int32)
        else:
            s = scores(qv, ks, row, b, n, inr, H, HKV, T, N, G, R, W, RWP, HW)
        gt = inr & (s > tau)
        eq = inr & (s == tau)
        both = gt.to(tl.int32) + (eq.to(tl.int32) << 16)  # one scan for both counts (BN < 2^16)
        cs = tl.cumsum(both, 0)
        rank_e = oe + (cs >> 16) - 1
        take_e = eq & (rank_e < need)
        slot = tl.where(gt, og + (cs & 0xFFFF) - 1, ngt + rank_e)
        take = gt | take_e
        tl.store(ob + slot, n, mask=take)
        if WLW:  # exact keys: log-weight 0 at the same slots
            tl.store(lw + row.to(tl.int64) * stride + off + slot, tl.zeros([BN], tl.float32), mask=take)
        if CACHE:  # member keeps the score bytes: only the taken ties are marked (255 > tau)
            tl.store(mrow + n, tl.full([BN], 255, tl.uint8), mask=take_e)
        else:
            tl.store(mrow + n, take.to(tl.uint8), mask=inr)
        tb = tl.sum(both, 0)
        og += tb & 0xFFFF
        oe += tb >> 16
