"""Triton helpers of the layer-op kernels (layer_ops.py, gemv.py): rounding to the model dtype
and the RMSNorm scaling, where and as torch does them, so the kernels equal their torch
references. Imported lazily, from inside the kernel factories: it needs triton."""
import triton
import triton.language as tl


@triton.jit
def round_to(x, T: tl.constexpr):
    """float32 -> T, round to nearest even as torch does. bf16 by hand: the interpreter's cast
    truncates (triton 3.9); on a GPU the same bits come out as from cvt.rn (the low half is
    zero, so the final cast is exact)."""
    if T == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    return x.to(T)


@triton.jit
def rms_apply(x, rstd, w, T: tl.constexpr, GEMMA: tl.constexpr):
    """layer_ops.rms_norm_ref given the rows' rstd (broadcast against x); w holds the weight's
    float32 values (Gemma: the float32 (1 + w), applied before rounding)."""
    y = x * rstd
    if GEMMA:
        y = y * w
    else:
        y = round_to(y, T).to(tl.float32) * w
    return round_to(y, T)
