"""The engine's fused layer ops (vattn/kernels/layer_ops.py) against their torch references,
under TRITON_INTERPRET=1 on CPU (or on a GPU), and the engine with them against its torch path.

Tolerances: the kernels round where torch rounds, so they differ from the reference only by the
float32 order of the RMS statistic: fp32 within 1e-5 relative; bf16 within one ulp, and equal
in at least 99% of the elements (a kernel that rounded differently, e.g. truncated, would
miss about half). Outputs come from a poisoned torch.empty: an unwritten element is NaN.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from helpers import poison_empty as _poison_empty  # noqa: F401 (autouse fixture)
from vattn.errors import VattnError
from vattn.kernels.layer_ops import (add_rms_norm, add_rms_norm_ref, glu, glu_ref, qkv_rope, qkv_rope_ref)
from helpers import kernel_env

pytestmark, DEV = kernel_env()


def close(out, ref, exact=None):
    """exact: bool mask of the elements held to 99% bitwise equality in bf16 (default all)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=1e-3)
        same = out == ref
        assert (same if exact is None else same[exact]).float().mean().item() >= 0.99


def randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,variant", [(576, "plain"), (576, "first"), (64, "gemma"), (576, "sandwich")])
def test_add_rms_norm(dtype, hidden, variant):
    """plain: x + delta then RMSNorm (Llama); first: no delta (layer 0's input norm);
    gemma: (1 + w) in float32; sandwich: Gemma's delta normed before the add."""
    x = randn(2, 3, hidden, dtype=dtype, seed=1, scale=3.0)
    delta = None if variant == "first" else randn(2, 3, hidden, dtype=dtype, seed=2)
    gemma = variant in ("gemma", "sandwich")
    w = randn(hidden, dtype=torch.float32 if gemma else dtype, seed=3, scale=0.3) + 1.0
    wd = randn(hidden, dtype=torch.float32, seed=4, scale=0.3) + 1.0 if variant == "sandwich" else None
    h, xn = add_rms_norm(x, delta, w, 1e-5, gemma, wd)
    hr, xr = add_rms_norm_ref(x, delta, w, 1e-5, gemma, wd)
    close(h, hr)
    close(xn, xr)
    if delta is None:
        assert xn is x
    elif variant == "plain":
        assert torch.equal(xn, xr)  # the add alone rounds exactly as torch


CASES = [  # D, Hq, Hkv, dtype, q/k norm, cache layout
    (64, 4, 2, torch.float32, None, None),
    (64, 6, 2, torch.bfloat16, None, "bhnd"),
    (128, 4, 1, torch.bfloat16, "plain", "bnhd"),
    (128, 2, 2, torch.float32, "plain", "bhnd"),
    (64, 4, 2, torch.bfloat16, "gemma", None),
    (64, 4, 2, torch.float32, "gemma", "bnhd"),
]


@pytest.mark.parametrize("D,Hq,Hkv,dtype,norm,layout", CASES)
def test_qkv_rope(D, Hq, Hkv, dtype, norm, layout):
    """GQA heads, B=2 rows at positions that do not start at 0, q/k norm (Qwen3 plain, Gemma
    float32 (1 + w)), k/v into a cache of either vmem layout at slots (3, 1)."""
    B, T, P = 2, 3, 40
    qkv = randn(B, T, (Hq + 2 * Hkv) * D, dtype=dtype, seed=D + Hq, scale=2.0)
    pos = torch.tensor([[17, 18, 19], [5, 6, 7]], device=DEV)
    g = torch.Generator().manual_seed(5)
    ang = torch.arange(P)[:, None] * torch.rand(D // 2, generator=g)[None]
    cos, sin = (f(torch.cat([ang, ang], -1)).to(DEV) for f in (torch.cos, torch.sin))
    kw = {}
    if norm:
        wdt = torch.float32 if norm == "gemma" else dtype
        kw = dict(qn=randn(D, dtype=wdt, seed=6, scale=0.3) + 1, kn=randn(D, dtype=wdt, seed=7, scale=0.3) + 1,
                  eps=1e-6, gemma=norm == "gemma")
    q, k, v = qkv_rope(qkv, pos, cos, sin, Hq, Hkv, **kw)
    qr, kr, vr = qkv_rope_ref(qkv, pos, cos, sin, Hq, Hkv, **kw)
    close(q, qr)
    close(k, kr)
    assert torch.equal(v, vr)
    if layout is None:
        return
    S, N = 4, 24
    shape = (S, Hkv, N, D) if layout == "bhnd" else (S, N, Hkv, D)
    caches = []
    for _ in range(2):
        K, V = (torch.full(shape, 7.0, dtype=dtype, device=DEV) for _ in range(2))
        if layout == "bnhd":  # the vmem cache's strip layout: views permuted to [S, Hkv, N, D]
            K, V = K.transpose(1, 2), V.transpose(1, 2)
        caches.append((K, V))
    rows = torch.tensor([3, 1], device=DEV)
    q2, k2, v2 = qkv_rope(qkv, pos, cos, sin, Hq, Hkv, cache=(*caches[0], rows), **kw)
    assert k2 is None and v2 is None
    close(q2, qr)
    qkv_rope_ref(qkv, pos, cos, sin, Hq, Hkv, cache=(*caches[1], rows), **kw)
    (K, V), (Kr, Vr) = caches
    close(K, Kr)  # written at (slot, position) only: every other entry is still 7
    assert torch.equal(V, Vr)
    assert (K[0] == 7).all() and (K[3, :, 20:] == 7).all() and not (K[3, :, 17:20] == 7).all()
    # with the all-slots query buffer: q lands at the rows' slots, the other slots keep theirs
    Qs = [torch.full((S, Hq, T, D), 5.0, dtype=dtype, device=DEV) for _ in range(2)]
    q3, _, _ = qkv_rope(qkv, pos, cos, sin, Hq, Hkv, cache=(*caches[0], rows, Qs[0]), **kw)
    q4, _, _ = qkv_rope_ref(qkv, pos, cos, sin, Hq, Hkv, cache=(*caches[1], rows, Qs[1]), **kw)
    assert q3 is Qs[0] and q4 is Qs[1]
    close(Qs[0][rows], qr)
    close(Qs[0], Qs[1])
    assert (Qs[0][[0, 2]] == 5).all()


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_glu(act, dtype):
    gu = randn(3, 1, 2 * 1100, dtype=dtype, seed=8, scale=4.0)  # I = 1100: two blocks, the last ragged
    ref = glu_ref(gu, act)
    # torch's gelu-tanh computes 0.5 g (1 + tanh(y)), which cancels for g << 0 (outputs < 1e-4
    # there); the kernel's g * sigmoid(2y) does not: bitwise equality only where they are larger
    close(glu(gu, act), ref, exact=ref.abs() > 1e-3 if act != "silu" else None)


def test_bad_inputs_raise_vattn_error():
    x = torch.randn(2, 64, device=DEV)
    with pytest.raises(VattnError, match="contiguous"):
        add_rms_norm(x.t().contiguous().t(), None, torch.ones(64, device=DEV), 1e-6)
    with pytest.raises(VattnError, match=r"\[64\] weight"):
        add_rms_norm(x, x, torch.ones(32, device=DEV), 1e-6)
    qkv = torch.randn(1, 1, 8 * 16, device=DEV)
    tab = torch.randn(8, 16, device=DEV)
    with pytest.raises(VattnError, match="even head dim"):
        qkv_rope(qkv, torch.zeros(1, 1, dtype=torch.long, device=DEV), tab, tab, 3, 2)
    with pytest.raises(VattnError, match="int64"):
        qkv_rope(qkv, torch.zeros(1, 1, dtype=torch.int32, device=DEV), tab, tab, 4, 2)
    with pytest.raises(VattnError, match="float32"):
        qkv_rope(qkv, torch.zeros(1, 1, dtype=torch.long, device=DEV), tab.double(), tab, 4, 2)
    K = torch.zeros(2, 2, 8, 16, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(VattnError, match="build the model in one dtype"):
        qkv_rope(qkv, torch.zeros(1, 1, dtype=torch.long, device=DEV), tab, tab, 4, 2,
                 cache=(K, K, torch.zeros(1, dtype=torch.long, device=DEV)))
    with pytest.raises(VattnError, match="glu kernel runs"):
        glu(torch.randn(2, 8, device=DEV), "relu")


# ------------------------------------------------------------------ the engine with the fused ops

@pytest.mark.parametrize("arch,dtype,all_rows,gemv", [
    ("llama", torch.float32, True, True), ("llama", torch.bfloat16, False, False), ("llama", torch.float32, True, False),
    ("qwen3", torch.float32, False, True), ("qwen3", torch.bfloat16, True, True), ("gemma3", torch.bfloat16, False, True),
    ("gemma3", torch.float32, False, False)])
def test_engine_fused_equals_torch_path(arch, dtype, all_rows, gemv, monkeypatch):
    """Logits of prefill (chunked) + batched decode (two slots at different lengths) and the
    KV cache with fused=True (with the gemv GEMMs, or the layer ops around torch GEMMs) (forced on under the interpreter) equal the torch path's: fp32
    within 1e-4 (the engine's tolerance against transformers), bf16 within 2e-2 on logits of
    ~0.5 (seen: 0 without all_rows; 5e-3 with it, where attention is the Triton kernel, not SDPA)."""
    import vattn.engine.model as model_mod
    from conftest import tiny_model
    from vattn.engine.model import Decoder
    from vattn.engine.runner import Runner
    if DEV != "cpu":
        pytest.skip("the CPU torch path against the kernels: run under TRITON_INTERPRET=1")
    hf = tiny_model(arch)
    ids = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 4, 2)]
    outs, caches = [], []
    for fused in (False, True):
        dec = Decoder(hf.config, hf.state_dict(), "cpu", dtype, 16, fused=fused)
        assert dec.fused == (frozenset(("norm", "rope", "glu", "gemv")) if fused else frozenset())
        if fused and not gemv:  # the layer-op kernels around cuBLAS GEMMs (prefill of more than 16 rows)
            dec.fused -= {"gemv"}
        if fused:  # the fused run never touches the torch layer math
            for name in ("add_rms_norm_ref", "heads_rope_ref", "write_kv_ref"):
                monkeypatch.setattr(model_mod, name, lambda *a, name=name, **k: pytest.fail(f"{name} ran"))
            ropes = []
            monkeypatch.setattr(model_mod, "rms_linear",
                                lambda *a, _f=model_mod.rms_linear, **k: ropes.append(k.get("rope")) or _f(*a, **k))
        r = Runner(dec, dtype=dtype, max_len=16, max_batch=3)
        r.all_rows = all_rows and fused  # the GPU step's batched attention, in the interpreter
        r.alloc()  # an idle slot row
        s1, s2 = r.alloc(), r.alloc()
        assert (s1, s2) == (1, 2)
        got = [r.prefill(s1, ids[0], chunk=4)[None], r.prefill(s2, ids[1])[None]]
        got += [r.decode([s2, s1], [t, t]) for t in ids[2]]
        got.append(r.decode([s1], [3]))  # a single-row step: the gemv path (RoPE in the qkv GEMM without q/k norm)
        outs.append(torch.cat(got))
        caches.append(torch.stack([torch.stack(r.kv.view(i, 1, 2, 9)) for i in range(r.arch.layers)]))
    # RoPE folded into the qkv GEMM in every layer of the single-row step, unless q/k are normed first
    assert sum(r is not None for r in ropes) == (hf.config.num_hidden_layers if gemv and arch == "llama" else 0)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    diff = (outs[1] - outs[0]).abs().max().item()
    assert diff < tol, f"{arch} {dtype}: logits differ by {diff}"
    assert outs[0].abs().max() > 0.1  # logits of some size: the tolerance means something
    # rows of slots 1 and 2: 7 + 2 and 4 + 2 keys written. Layer 0's K/V come before any
    # attention: within tol; later layers' carry the attention kernel's differences (all_rows)
    for row, n in ((0, 9), (1, 6)):
        a, b = caches[0][:, :, row, :, :n].float(), caches[1][:, :, row, :, :n].float()
        assert (a[0] - b[0]).abs().max().item() < tol
        assert ((a - b).norm() / a.norm()).item() < (1e-5 if dtype == torch.float32 else 1e-2)


def test_fused_on_cpu_needs_the_interpreter(monkeypatch):
    from conftest import tiny_model
    from vattn.engine.model import Decoder
    hf = tiny_model("llama")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(VattnError, match="TRITON_INTERPRET=1"):
        Decoder(hf.config, hf.state_dict(), "cpu", torch.float32, 16, fused=True)
    assert Decoder(hf.config, hf.state_dict(), "cpu", torch.float32, 16).fused == frozenset()  # None: CUDA only
