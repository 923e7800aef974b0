"""Triton kernel behind vattn.kernels.pages (imported lazily: needs triton)."""
import triton
import triton.language as tl


@triton.jit
def quest_kernel(q, pmin, pmax, out, HKV, P, sqb, sqh, sqt,
                 G: tl.constexpr, T: tl.constexpr, M: tl.constexpr, D: tl.constexpr, BP: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    j = pid % HKV
    rows = tl.arange(0, M)
    ok = rows < G * T
    g = rows // T
    t = rows % T
    d = tl.arange(0, D)
    qq = tl.load(q + b * sqb + (j * G + g)[:, None] * sqh + t[:, None] * sqt + d[None, :],
                 mask=ok[:, None], other=0.0).to(tl.float32)
    p = tl.program_id(1) * BP + tl.arange(0, BP)
    pm = p < P
    base = (pid * P).to(tl.int64) * D
    lo = tl.load(pmin + base + p[:, None] * D + d[None, :], mask=pm[:, None], other=0.0).to(tl.float32)
    hi = tl.load(pmax + base + p[:, None] * D + d[None, :], mask=pm[:, None], other=0.0).to(tl.float32)
    # max(q*lo, q*hi) = q*(lo+hi)/2 + |q|*(hi-lo)/2: two matrix products
    u = tl.dot(qq, tl.trans((lo + hi) * 0.5), input_precision="ieee") \
        + tl.dot(tl.abs(qq), tl.trans((hi - lo) * 0.5), input_precision="ieee")
    r = (b * HKV * G + j * G + g) * T + t
    tl.store(out + r[:, None].to(tl.int64) * P + p[None, :], u, mask=ok[:, None] & pm[None, :])
