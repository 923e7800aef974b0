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
def load_cg(p, mask, other, CG: tl.constexpr):
    """tl.load, past L1 when CG (data written by other programs of the same launch)."""
    if CG:
        return tl.load(p, mask=mask, other=other, cache_modifier=".cg")
    else:
        return tl.load(p, mask=mask, other=other)


@triton.jit
def merge_block(po, plse, out, r, d, S, D: tl.constexpr, DB: tl.constexpr, SP: tl.constexpr, SB: tl.constexpr,
                CG: tl.constexpr = False):
    """out[r, d] (DB columns) from row r's S partials: po [rows, S, D] f32, plse [rows, S] (log2
    units). A partial with lse = -inf saw no key and its po may be unwritten: never read."""
    s = tl.arange(0, SP)
    lse = load_cg(plse + r * S + s, s < S, float("-inf"), CG)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    tot = tl.sum(tl.exp2(lse - m), 0)
    acc = tl.zeros([DB], tl.float32)
    for s0 in range(0, S, SB):  # blocks of SB partials keep the tile small
        sb = s0 + tl.arange(0, SB)
        lb = load_cg(plse + r * S + sb, sb < S, float("-inf"), CG)
        live = lb > float("-inf")
        w = tl.where(live, tl.exp2(lb - m), 0.0)
        o = load_cg(po + r * S * D + sb[:, None] * D + d[None, :], live[:, None], 0.0, CG)
        acc += tl.sum(w[:, None] * o, 0)
    acc = acc / tl.maximum(tot, 1e-30)  # a row with no visible key gives 0
    tl.store(out + r * D + d, acc.to(out.dtype.element_ty))
