"""The online-softmax step shared by the decode kernels (dense, sparse, paged).

Imported lazily, from inside the kernel factories: it needs triton. Scores are in the
log2 domain (scale * log2(e) folded in), as every caller uses exp2.
"""
import triton
import triton.language as tl


@triton.jit
def dot_qk(qq, kk, IEEE: tl.constexpr):
    """[M, D] x [BN, D] -> [M, BN] scores; IEEE: exact float32 (fp32 inputs, interpreter)."""
    if IEEE:
        s = tl.dot(qq.to(tl.float32), tl.trans(kk.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(qq, tl.trans(kk))
    return s


@triton.jit
def online_step(s, vv, m_i, l_i, acc, IEEE: tl.constexpr):
    """Fold a block of masked scores s [M, BN] and values vv [BN, D] into (m_i, l_i, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at 0
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, vv.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
    return m_new, l_i, acc


@triton.jit
def finish(acc, m_i, l_i):
    """Normalised partial output and its log2-sum-exp (-inf where no key was seen)."""
    o = acc / tl.maximum(l_i, 1e-30)[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
    return o, lse


@triton.jit
def merge_rows(po, plse, out, r, ok, S, M: tl.constexpr, D: tl.constexpr, SB: tl.constexpr):
    """Merge the S partial columns of output rows r [M] (int64, mask ok) into out [rows, D]:
    partials po [rows, S, D] f32 and plse [rows, S] (log2 units) written by other programs of
    this launch before an acq_rel atomic (volatile loads: not from L1). A column with lse = -inf
    saw no key and its po is not read."""
    d = tl.arange(0, D)
    mx = tl.full([M], float("-inf"), tl.float32)
    for c0 in range(0, S, SB):
        cc = c0 + tl.arange(0, SB)
        ll = tl.load(plse + r[:, None] * S + cc[None, :], mask=ok[:, None] & (cc < S)[None, :],
                     other=float("-inf"), volatile=True)
        mx = tl.maximum(mx, tl.max(ll, 1))
    mu = tl.where(mx == float("-inf"), 0.0, mx)
    den = tl.zeros([M], tl.float32)
    num = tl.zeros([M, D], tl.float32)
    for c0 in range(0, S, SB):
        cc = c0 + tl.arange(0, SB)
        ll = tl.load(plse + r[:, None] * S + cc[None, :], mask=ok[:, None] & (cc < S)[None, :],
                     other=float("-inf"), volatile=True)
        live = ll > float("-inf")
        wt = tl.where(live, tl.exp2(ll - mu[:, None]), 0.0)
        pp = tl.load(po + (r[:, None, None] * S + cc[None, :, None]) * D + d[None, None, :],
                     mask=live[:, :, None], other=0.0, volatile=True)
        den += tl.sum(wt, 1)
        num += tl.sum(wt[:, :, None] * pp, 1)
    res = num / tl.maximum(den, 1e-30)[:, None]
    tl.store(out + r[:, None] * D + d[None, :], res.to(out.dtype.element_ty), mask=ok[:, None])
