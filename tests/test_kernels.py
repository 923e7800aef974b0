"""Kernel correctness against the torch references, under TRITON_INTERPRET=1 on CPU.

Small sizes, fresh random inputs, ragged lengths, poisoned outputs (the kernels allocate
their outputs with torch.empty, so a stale NaN there would show). Skipped without triton.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from helpers import poison_empty as _poison_empty  # noqa: F401 (autouse fixture)
from vattn.errors import VattnError
from vattn.kernels.decode import dense_decode, dense_decode_ref
from vattn.kernels.sparse import sparse_decode, sparse_decode_ref
from helpers import kernel_env

pytestmark, DEV = kernel_env()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def on(*xs):
    return [x.to(DEV) for x in xs]


@pytest.mark.parametrize("dtype,T,G", [(torch.float32, 1, 4), (torch.bfloat16, 1, 4),
                                       (torch.float16, 3, 2), (torch.float32, 8, 1)])
def test_dense_decode(dtype, T, G):
    g = torch.Generator().manual_seed(T * 10 + G)
    B, Hkv, N, D = 3, 2, 150, 32
    q = torch.randn(B, Hkv * G, T, D, generator=g).to(dtype).to(DEV)
    big = torch.randn(B, Hkv, N + 9, 2 * D, generator=g).to(dtype).to(DEV)
    k, v = big[:, :, :N, :D], big[:, :, 5:N + 5, D:]  # strided views into one buffer
    lengths = torch.tensor([N, 40, T + 3], dtype=torch.int32, device=DEV)
    out = dense_decode(q, k, v, lengths, block_n=16, splits=2)  # the 40-key row: an empty split
    ref = dense_decode_ref(q, k, v, lengths)
    assert torch.isfinite(out).all()
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    pick = torch.tensor([2, 0, 2, 1], device=DEV)  # batch order of a decoder step, a row twice (padding)
    picked = dense_decode(q, k, v, lengths, block_n=16, splits=2, pick=pick)
    assert picked.shape == (4, *out.shape[1:]) and torch.equal(picked, out[pick])


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_decode(shared, dtype):
    g = torch.Generator().manual_seed(int(shared) + 7)
    B, Hq, Hkv, T, N, D, K = 2, 8, 2, 2, 120, 16, 70
    H = Hkv if shared else Hq
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    count = torch.randint(1, K + 1, (B, H, T), generator=g, dtype=torch.int32)
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B * H * T)]).view(B, H, T, K)
    idx = torch.where(torch.arange(K) < count[..., None], idx, -1).to(torch.int32)
    lw = torch.randn(B, H, T, K, generator=g)
    args = on(q, k, v, idx, lw, count)
    out = sparse_decode(*args, shared, block_n=16)
    ref = sparse_decode_ref(*args, shared)
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_sparse_full_selection_equals_dense():
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, N, D = 1, 4, 2, 64, 16
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((Hq, 1), (Hkv, N), (Hkv, N)))
    idx = torch.randperm(N, generator=g).int().view(1, 1, 1, N).expand(B, Hkv, 1, N).contiguous()
    out = sparse_decode(*on(q, k, v, idx, torch.zeros(B, Hkv, 1, N), torch.full((B, Hkv, 1), N, dtype=torch.int32)),
                        True).cpu()
    assert rel(out, dense_decode_ref(q, k, v)) < 1e-5


def test_bad_inputs_raise_vattn_error():
    q, k = torch.randn(1, 4, 1, 32), torch.randn(1, 3, 10, 32)
    with pytest.raises(VattnError, match="multiple"):
        dense_decode(q, k, k)
    with pytest.raises(VattnError, match="1 to 8"):
        dense_decode(torch.randn(1, 3, 9, 32), k, k)
    with pytest.raises(VattnError, match="int32"):
        dense_decode(torch.randn(1, 3, 1, 32), k, k, torch.tensor([10]))
    if os.environ.get("TRITON_INTERPRET") == "1":  # programmatic dependent launch: Hopper GPUs only
        with pytest.raises(VattnError, match="pdl=True"):
            dense_decode(torch.randn(1, 3, 1, 32), k, k, pdl=True)
    with pytest.raises(VattnError, match="indices"):
        sparse_decode(torch.randn(1, 3, 1, 32), k, k, torch.zeros(1, 2, 1, 4, dtype=torch.int32),
                      torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, dtype=torch.int32), False)


def test_interpreter_compat_squeezes_loop_bounds(monkeypatch):
    # triton < 3.7's interpreter turns a tensor loop bound into int(array of shape (1,)), which
    # NumPy 2.4 refuses; the shim gives tensors an __index__ that squeezes first
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as ti
    from vattn.kernels import common
    seen = {}

    class Scope:
        def set_attr(self, obj, name, value):
            seen[name] = (obj, value)

    monkeypatch.setattr(ti, "_patch_lang", lambda fn: Scope())
    common._interpreter_compat.__wrapped__()
    ti._patch_lang(None)
    obj, index = seen["__index__"]
    bound = type("Bound", (), {"handle": type("Handle", (), {"data": np.array([7], dtype=np.int32)})()})()
    assert obj is tl.core.tensor and index(bound) == 7
