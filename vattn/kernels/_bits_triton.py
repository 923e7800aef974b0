"""Bit-signature helpers for the scan kernels (_scan_triton; imported lazily: needs triton).

A signature is W int32 words of sign bits (bits.sign_bits); the agreement of a query and a key
is the number of equal bits, summed over the R query heads that share a KV head.
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
def key_sig(k, proj, ks, b, h, pos, skb, skh, skn, H, N, W: tl.constexpr, D: tl.constexpr):
    """Write the signature of key pos of (b, h) into ks [B, H, N, W], as bits.sign_bits: bit c of
    word w is the sign of k . proj[:, 32 w + c]."""
    d = tl.arange(0, D)
    c = tl.arange(0, 32)
    kv = tl.load(k + b.to(tl.int64) * skb + h.to(tl.int64) * skh + pos.to(tl.int64) * skn + d).to(tl.float32)
    for w in tl.static_range(W):
        word = sign_word(kv, tl.load(proj + d[:, None] * (32 * W) + w * 32 + c[None, :]))
        tl.store(ks + ((b * H + h) * N + pos).to(tl.int64) * W + w, word.to(tl.int32, bitcast=True))


@triton.jit
def qwords(q, proj, row, b, H, sqb, sqh, R: tl.constexpr, W: tl.constexpr, D: tl.constexpr,
           RWP: tl.constexpr):
    """uint32 [RWP]: word w of the signature of query head h*R + r at slot r*W + w, computed
    here from q (one query row; row = b * H + h, h the KV head)."""
    h = row % H
    rw = tl.arange(0, RWP)
    d = tl.arange(0, D)
    c = tl.arange(0, 32)
    out = tl.zeros([RWP], tl.uint32)
    for w in tl.static_range(W):  # each proj tile is loaded once per program (L2 traffic)
        p = tl.load(proj + d[:, None] * (32 * W) + w * 32 + c[None, :])
        for r in tl.static_range(R):
            qv = tl.load(q + b.to(tl.int64) * sqb + (h * R + r) * sqh + d).to(tl.float32)
            out = tl.where(rw == r * W + w, sign_word(qv, p), out)
    return out


@triton.jit
def sig_words(ks, row, n, inr, N, W: tl.constexpr, WP: tl.constexpr):
    """Raw signature words of keys n of KV row `row` (ks contiguous [B, Hkv, N, W]): [BN] when
    W == 1, else [BN, WP] (0 outside inr). Apart from `agreement` so a caller can issue the
    loads a block ahead."""
    kb = ks + (row * N).to(tl.int64) * W
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
