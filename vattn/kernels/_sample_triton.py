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
    for w in tl.static_range(WALK):  # cycle walking: a bijection of [0, n_mid)
        y = tl.where(y >= n_mid, _feistel(y, hb.to(tl.uint32), mask, key), y)
    ok = (j < n_mid) & (y < n_mid) & (j < CAP)
    pos = lo + y.to(tl.int32)
    mem = tl.load(member + row.to(tl.int64) * N + pos, mask=ok, other=1)
    tl.store(out + row.to(tl.int64) * CAP + j, tl.where(ok, pos, -1), mask=j < CAP)
    tl.store(acc + row.to(tl.int64) * CAP + j, (ok & (mem == 0)).to(tl.int8), mask=j < CAP)
