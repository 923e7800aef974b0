"""The skinny-GEMM kernels (vattn/kernels/gemv.py) against torch references, under TRITON_INTERPRET=1 on CPU
(or on a GPU).

Reference: the prologue's torch reference in the activation dtype (x itself for linear, add_rms_norm_ref,
glu_ref), then the product in float64, rounded once to the dtype. Tolerances: fp32 within 1e-5 (relative
and absolute, |y| ~ 1); bf16/fp16 within one ulp (rtol 2^-7), and bitwise equal in at least 98% of the
elements (the kernel differs only in its float32 sum order; one that skipped the rounding of the
activations before the dot, as torch rounds them, misses far more: see test_rounding_is_checked).
Every case is also held to F.linear on the reference activations (the engine's torch path) at bf16
tolerance. Outputs come from a poisoned torch.empty: an unwritten element is NaN.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from helpers import poison_empty as _poison_empty  # noqa: F401 (autouse fixture)
from vattn.errors import VattnError
from vattn.kernels.common import interpret, zeroed_counters
from vattn.kernels.gemv import default_config, glu_linear, linear, rms_linear
from vattn.kernels.layer_ops import add_rms_norm_ref, glu_ref
from helpers import kernel_env

pytestmark, DEV = kernel_env()
BF, F32 = torch.bfloat16, torch.float32


def randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def ref_product(a, w, bias=None):
    """a @ w.T (+ bias) in float64, rounded once to a's dtype."""
    y = a.double() @ w.double().T
    if bias is not None:
        y = y + bias.double()
    return y.to(a.dtype)


def check(y, a, w, bias=None, min_equal=0.98):
    """y against the float64 product of the reference activations a, and against F.linear."""
    ref = ref_product(a, w, bias)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    if y.dtype == F32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(y.float(), ref.float(), rtol=2 ** -7, atol=1e-3)
        assert (y == ref).float().mean().item() >= min_equal
    torch.testing.assert_close(y.float(), F.linear(a, w, bias).float(), rtol=2e-2, atol=2e-2)


def weight(N, K, dtype, seed):
    return randn(N, K, dtype=dtype, seed=seed, scale=K ** -0.5)  # |y| ~ |x|


LINEAR = [  # M, K, N, dtype, bias, tuning
    (1, 256, 320, BF, True, {}),                                       # default M = 1: CUDA-core GEMV
    (3, 192, 100, BF, False, {}),                                      # default M > 1: tensor cores; ragged K, N
    (16, 256, 48, BF, True, dict(block_k=64)),                         # 4 K tiles
    (3, 128, 72, BF, True, dict(dot=False, block_n=8, block_k=32)),    # M > 1 without tensor cores
    (1, 200, 96, BF, True, dict(split_k=3, block_k=32)),               # split-K, ragged K
    (16, 256, 64, BF, False, dict(split_k=2, block_n=32, block_k=64)),  # split-K with tensor cores
    (3, 64, 48, torch.float16, True, {}),
    (1, 160, 80, F32, True, dict(block_n=16)),
    (16, 128, 56, F32, False, dict(block_k=32)),
]


@pytest.mark.parametrize("M,K,N,dtype,bias,tuning", LINEAR)
def test_linear(M, K, N, dtype, bias, tuning):
    x = randn(M, K, dtype=dtype, seed=M + K, scale=2.0)
    w = weight(N, K, dtype, seed=N)
    b = randn(N, dtype=dtype, seed=3) if bias else None
    check(linear(x, w, bias=b, **tuning), x, w, b)


def test_linear_leading_dims_and_out():
    """x [B, T, K] -> y [B, T, N]; out= is written in place and returned."""
    x = randn(2, 3, 64, dtype=BF, seed=1)
    w = weight(80, 64, BF, seed=2)
    out = torch.full((2, 3, 80), 7.0, dtype=BF, device=DEV)
    y = linear(x, w, out=out)
    assert y is out
    check(y.view(6, 80), x.view(6, 64), w)


def test_default_config():
    """M = 1: CUDA-core GEMV, block_k = 32 threads x num_warps x 8 bf16 elements (16 bytes); M > 1: tensor
    cores."""
    c1, c16 = default_config(1, 4096, 14336), default_config(16, 28672, 4096)
    assert not c1["dot"] and c1["block_k"] == 32 * c1["num_warps"] * 8 and c1["split_k"] == 1
    assert c16["dot"] and min(c16["block_n"], c16["block_k"]) >= 16
    assert default_config(1, 64, 48)["block_k"] == 64  # no wider than the padded row
    # 2 warps where 4 take more than one wave and 2 take one: Llama-3-8B's qkv on 132 SMs, not o or gate|up
    assert [default_config(1, n, 4096)["num_warps"] for n in (6144, 4096, 28672)] == [2, 4, 4]
    assert default_config(1, 6144, 4096)["block_k"] == 512


RMS = [  # variant, M, K, N, dtype, tuning
    ("plain", 1, 256, 96, BF, {}),
    ("plain", 16, 192, 80, BF, dict(block_k=64)),   # rows and K tiles over several norm / main iterations
    ("first", 3, 128, 72, BF, {}),                   # delta None: layer 0's input norm
    ("gemma", 3, 128, 48, BF, dict(split_k=2, block_k=32)),
    ("sandwich", 1, 256, 64, BF, {}),
    ("sandwich", 16, 128, 64, BF, {}),
    ("plain", 3, 128, 64, F32, {}),
    ("sandwich", 3, 64, 48, F32, {}),
]


@pytest.mark.parametrize("variant,M,K,N,dtype,tuning", RMS)
def test_rms_linear(variant, M, K, N, dtype, tuning):
    """plain: x + delta, RMSNorm (Llama); first: no delta; gemma: float32 (1 + w); sandwich: Gemma's delta
    normed before the add. h is the new residual, written by one program."""
    x = randn(M, K, dtype=dtype, seed=K, scale=3.0)
    delta = None if variant == "first" else randn(M, K, dtype=dtype, seed=K + 1)
    gemma = variant in ("gemma", "sandwich")
    nw = randn(K, dtype=F32 if gemma else dtype, seed=5, scale=0.3) + 1.0
    wd = randn(K, dtype=F32, seed=6, scale=0.3) + 1.0 if variant == "sandwich" else None
    w = weight(N, K, dtype, seed=7)
    bias = randn(N, dtype=dtype, seed=8) if variant == "plain" else None  # Qwen2's qkv bias
    h, y = rms_linear(x, delta, nw, w, 1e-5, gemma, w_delta=wd, bias=bias, **tuning)
    hn, hr = add_rms_norm_ref(x, delta, nw, 1e-5, gemma, wd)
    check(y, hn, w, bias)
    if delta is None:
        assert h is x
    elif variant == "sandwich":
        if dtype == F32:
            torch.testing.assert_close(h, hr, rtol=1e-5, atol=1e-5)
        else:  # the normed delta rounds where torch rounds: one ulp at most, rarely
            torch.testing.assert_close(h, hr, rtol=2 ** -7, atol=1e-3)
            assert (h == hr).float().mean().item() >= 0.99
    else:
        assert torch.equal(h, hr)  # the add alone rounds exactly as torch


def test_rms_linear_h_out():
    """h_out is written in full (it starts as NaN) by program (0, 0) only, also under split-K; with
    delta None it receives a copy of x."""
    x, d = randn(3, 160, dtype=BF, seed=1), randn(3, 160, dtype=BF, seed=2)
    nw, w = randn(160, dtype=BF, seed=3) + 1.0, weight(72, 160, BF, seed=4)
    for tuning in ({}, dict(split_k=3, block_k=32, block_n=16)):
        h_out = torch.full_like(x, float("nan"))
        h, y = rms_linear(x, d, nw, w, 1e-6, h_out=h_out, **tuning)
        hn, hr = add_rms_norm_ref(x, d, nw, 1e-6)
        assert h is h_out and torch.equal(h, hr)
        check(y, hn, w)
    h_out = torch.full_like(x, float("nan"))
    h, _ = rms_linear(x, None, nw, w, 1e-6, h_out=h_out)
    assert h is h_out and torch.equal(h, x)


@pytest.mark.parametrize("D,Hq,Hkv,dtype,bias,layout,qbuf", [
    (64, 4, 2, BF, False, "bhnd", False),
    (128, 4, 1, BF, True, "bnhd", True),   # Qwen2's qkv bias; the vmem strip layout; the all-slots q buffer
    (64, 6, 2, F32, False, "bnhd", True),
])
def test_rms_linear_rope(D, Hq, Hkv, dtype, bias, layout, qbuf):
    """rope=: the qkv GEMM stores q rotated and k, v into the cache at (slot, position), bit for bit
    what rms_linear then layer_ops.qkv_rope store (the same rounding, the same sums); nothing else
    in the cache or the q buffer changes."""
    from vattn.kernels.layer_ops import qkv_rope
    K_in, N = 96, (Hq + 2 * Hkv) * D
    x, delta = randn(1, 1, K_in, dtype=dtype, seed=D, scale=2.0), randn(1, 1, K_in, dtype=dtype, seed=D + 1)
    nw, w = randn(K_in, dtype=dtype, seed=3) + 1.0, weight(N, K_in, dtype, seed=4)
    b = randn(N, dtype=dtype, seed=5) if bias else None
    pos, rows = torch.tensor([[21]], device=DEV), torch.tensor([2], device=DEV)
    ang = torch.arange(40)[:, None] * torch.rand(D // 2, generator=torch.Generator().manual_seed(6))[None]
    cos, sin = (f(torch.cat([ang, ang], -1)).to(DEV) for f in (torch.cos, torch.sin))
    shape = (3, Hkv, 32, D) if layout == "bhnd" else (3, 32, Hkv, D)
    outs = []
    for fused in (True, False):
        K, V = (torch.full(shape, 7.0, dtype=dtype, device=DEV) for _ in range(2))
        if layout == "bnhd":
            K, V = K.transpose(1, 2), V.transpose(1, 2)
        cache = (K, V, rows) + ((torch.full((3, Hq, 1, D), 5.0, dtype=dtype, device=DEV),) if qbuf else ())
        if fused:
            h, q = rms_linear(x, delta, nw, w, 1e-5, bias=b, rope=(pos, cos, sin, Hq, Hkv, cache))
        else:
            h, qkv = rms_linear(x, delta, nw, w, 1e-5, bias=b)
            q = qkv_rope(qkv, pos, cos, sin, Hq, Hkv, cache=cache)[0]
        assert q is cache[3] if qbuf else q.shape == (1, Hq, 1, D)
        outs.append((h, q, K, V))
    for a, r in zip(outs[0], outs[1]):
        assert torch.equal(a, r)
    K, V = outs[0][2:]
    assert (K[2, :, 21] != 7).all() and (K[[0, 1]] == 7).all() and (V[2, :, :21] == 7).all()
    if qbuf:
        assert (outs[0][1][[0, 1]] == 5).all() and (outs[0][1][2] != 5).all()
    with pytest.raises(VattnError, match="one row"):
        rms_linear(x.expand(2, 1, K_in).contiguous(), None, nw, w, 1e-5, rope=(pos, cos, sin, Hq, Hkv, cache))
    with pytest.raises(VattnError, match="out=None"):
        rms_linear(x, None, nw, w, 1e-5, rope=(pos, cos, sin, Hq, Hkv, cache), out=torch.empty(1, 1, N, dtype=dtype, device=DEV))
    with pytest.raises(VattnError, match="single-row config"):
        rms_linear(x, None, nw, w, 1e-5, rope=(pos, cos, sin, Hq, Hkv, cache), split_k=2)


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("M,I,N,dtype,tuning", [(1, 320, 64, BF, {}), (3, 96, 56, BF, dict(split_k=2, block_k=32)),
                                                (16, 64, 48, BF, {}), (3, 64, 40, F32, {})])
def test_glu_linear(act, M, I, N, dtype, tuning):
    gu = randn(M, 2 * I, dtype=dtype, seed=I + M, scale=3.0)
    w = weight(N, I, dtype, seed=9)
    check(glu_linear(gu, act, w, **tuning), glu_ref(gu, act), w)


def test_split_k_is_deterministic():
    """The last program of a column block sums the partials in index order: the same bits every call,
    and the counters it used are zero again afterwards."""
    x, w = randn(16, 512, dtype=BF, seed=1), weight(64, 512, BF, seed=2)
    ys = [linear(x, w, split_k=4, block_k=64, block_n=16) for _ in range(2)]
    assert torch.equal(ys[0], ys[1])
    check(ys[0], x, w)
    assert (zeroed_counters(4, x.device) == 0).all()


def test_rounding_is_checked():
    """The bitwise criterion of check() has teeth: a product of activations that were not rounded to bf16
    (as torch rounds them) agrees with the reference in far fewer than 98% of the elements."""
    x, d = randn(16, 256, dtype=BF, seed=1, scale=3.0), randn(16, 256, dtype=BF, seed=2)
    nw, w = randn(256, dtype=BF, seed=3, scale=0.3) + 1.0, weight(128, 256, BF, seed=4)
    h = (x + d).float()
    unrounded = (F.rms_norm(h, (256,), eps=1e-5) * nw.float()).double() @ w.double().T
    ref = ref_product(add_rms_norm_ref(x, d, nw, 1e-5)[0], w)
    assert (unrounded.to(BF) == ref).float().mean().item() < 0.9


def test_bad_inputs_raise_vattn_error():
    x, w = randn(2, 64, dtype=BF, seed=1), weight(48, 64, BF, seed=2)
    with pytest.raises(VattnError, match="cast"):
        linear(x, w.float())
    with pytest.raises(VattnError, match="17 rows"):
        linear(randn(17, 64, dtype=BF, seed=3), w)
    with pytest.raises(VattnError, match=r"\[N, 64\]"):
        linear(x, weight(48, 32, BF, seed=4))
    with pytest.raises(VattnError, match="contiguous"):
        linear(randn(64, 2, dtype=BF, seed=5).t(), w)
    with pytest.raises(VattnError, match="stride 1"):
        linear(x, weight(64, 48, BF, seed=6).t())
    with pytest.raises(VattnError, match="bias"):
        linear(x, w, bias=randn(47, dtype=BF, seed=7))
    with pytest.raises(VattnError, match="out must not be an input"):
        linear(x, weight(64, 64, BF, seed=6), out=x)
    with pytest.raises(VattnError, match="unknown tuning"):
        linear(x, w, block_m=16)
    with pytest.raises(VattnError, match="dot=False"):
        linear(x, w, dot=True, block_n=8)
    with pytest.raises(VattnError, match="power of two"):
        linear(x, w, block_k=48)
    nw = torch.ones(64, dtype=BF, device=DEV)
    with pytest.raises(VattnError, match="delta must have"):
        rms_linear(x, randn(1, 64, dtype=BF, seed=8), nw, w, 1e-6)
    with pytest.raises(VattnError, match="pass delta"):
        rms_linear(x, None, nw, w, 1e-6, w_delta=nw)
    with pytest.raises(VattnError, match="must not be x"):
        rms_linear(x, x.clone(), nw, w, 1e-6, h_out=x)
    with pytest.raises(VattnError, match="norm_w"):
        rms_linear(x, None, nw.float(), w, 1e-6)  # plain RMSNorm multiplies in the activation dtype
    with pytest.raises(VattnError, match="activations"):
        glu_linear(randn(2, 128, dtype=BF, seed=9), "relu", w)
    with pytest.raises(VattnError, match=r"\[N, 32\]"):
        glu_linear(randn(2, 64, dtype=BF, seed=9), "silu", w)
    if interpret():
        with pytest.raises(VattnError, match="pdl=True"):
            linear(x, w, pdl=True)
