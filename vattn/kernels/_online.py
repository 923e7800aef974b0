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
def online_init(M: tl.constexpr, D: tl.constexpr):
    """(m_i, l_i, acc) of M rows that have seen no key: -inf, 0, zeros [M, D] (float32)."""
    return tl.full([M], float("-inf"), tl.float32), tl.zeros([M], tl.float32), tl.zeros([M, D], tl.float32)


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
def kv_rows(kb, vb, skn, svn, x64, ok, D: tl.constexpr):
    """Key and value rows x64 (int64 positions; rows outside ok are not read, as 0)."""
    d = tl.arange(0, D)
    kk = tl.load(kb + x64[:, None] * skn + d[None, :], mask=ok[:, None], other=0.0)
    vv = tl.load(vb + x64[:, None] * svn + d[None, :], mask=ok[:, None], other=0.0)
    return kk, vv


@triton.jit
def attend_rows(qq, kk, vv, ok, scale_log2, m_i, l_i, acc, IEEE: tl.constexpr):
    """Fold the rows of a gathered tile that are in ok into (m_i, l_i, acc)."""
    sc = tl.where(ok[None, :], dot_qk(qq, kk, IEEE) * scale_log2, float("-inf"))
    return online_step(sc, vv, m_i, l_i, acc, IEEE)


@triton.jit
def pdl_wait(PDL: tl.constexpr, EARLY: tl.constexpr = 1):
    """With programmatic dependent launch (Hopper): wait for the previous launch to finish (its
    writes visible), then (EARLY) let the next launch start scheduling its programs; without
    EARLY they start as this launch ends (waiting programs hold SM room its own programs need)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        if EARLY:
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def stamp(tr, slot, dep, TR: tl.constexpr):
    """Trace (TR, GPU only): the global timer in ns, read once `dep` is computed, at
    tr[program, slot] (int64 [programs, 8]); slot 7 holds the SM id."""
    if TR:
        t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dep.to(tl.int32)], dtype=tl.int64,
                                      is_pure=False, pack=1)
        pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tl.store(tr + pid * 8 + slot, t)
        if slot == 0:
            sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)
            tl.store(tr + pid * 8 + 7, sm.to(tl.int64))
