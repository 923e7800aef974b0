"""Triton kernels behind vattn.kernels.bits (imported lazily: needs triton)."""
import triton
import triton.language as tl

@triton.jit
def popc(x):
    x = x.to(tl.uint32, bitcast=True)
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)

@triton.jit
def scores(qs, ks, row, b, n, inr, H, HKV, T, N,
           G: tl.constexpr, R: tl.constexpr, W: tl.constexpr):
    # agreement of BN keys with the R query signatures of this selection row
    t = row % T
    h = (row // T) % H
    j = (h * R) // G
    kb = ks + ((b * HKV + j) * N).to(tl.int64) * W
    acc = tl.zeros(n.shape, tl.int32)
    for w in tl.static_range(W):
        kw = tl.load(kb + n.to(tl.int64) * W + w, mask=inr, other=0)
        for r in tl.static_range(R):
            qw = tl.load(qs + ((b * H * R + h * R + r) * T + t) * W + w)
            acc += 32 - popc(qw ^ kw)
    return acc

@triton.jit
def hist_kernel(qs, ks, hi, hist, lo, H, HKV, T, N,
                G: tl.constexpr, R: tl.constexpr, W: tl.constexpr, NB: tl.constexpr, BN: tl.constexpr):
    row = tl.program_id(0)
    b = row // (H * T)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    inr = (n >= lo) & (n < tl.load(hi + b))
    s = scores(qs, ks, row, b, n, inr, H, HKV, T, N, G, R, W)
    hcount = tl.histogram(s, NB, mask=inr)
    tl.atomic_add(hist + row * NB + tl.arange(0, NB), hcount, mask=hcount > 0)

@triton.jit
def compact_kernel(qs, ks, hi, thr, ngt, need, ctr, out, member, lo, H, HKV, T, N, K,
                   G: tl.constexpr, R: tl.constexpr, W: tl.constexpr, BN: tl.constexpr):
    row = tl.program_id(0)
    b = row // (H * T)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    inr = (n >= lo) & (n < tl.load(hi + b))
    s = scores(qs, ks, row, b, n, inr, H, HKV, T, N, G, R, W)
    tau = tl.load(thr + row)
    gt = inr & (s > tau)
    eq = inr & (s == tau)
    cg = tl.cumsum(gt.to(tl.int32), 0)
    ce = tl.cumsum(eq.to(tl.int32), 0)
    base_g = tl.atomic_add(ctr + 2 * row, tl.sum(gt.to(tl.int32), 0))
    base_e = tl.atomic_add(ctr + 2 * row + 1, tl.sum(eq.to(tl.int32), 0))
    rank_e = base_e + ce - 1
    take_e = eq & (rank_e < tl.load(need + row))
    slot = tl.where(gt, base_g + cg - 1, tl.load(ngt + row) + rank_e)
    take = gt | take_e
    tl.store(out + row.to(tl.int64) * K + slot, n, mask=take)
    tl.store(member + row.to(tl.int64) * N + n, take.to(tl.uint8), mask=n < N)
