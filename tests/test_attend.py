"""Every part and preset at full budget equals exact attention; attend's contract."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import vattn
from vattn.attend import dense_attend
from helpers import rand_qkv, rel

FULL = [
    "dense", "sink(1.0)", "window(1.0)", "topk(1.0)", "topp(1.0)", "uniform(1.0)",
    "verified(eps=0.0)", "verified(eps=0.0,share='kv')",
    "sink(3)+window(5)+topk(0.1)+verified(eps=0.0)",
    "sink(3)+window(5)+topk(0.1)+verified(eps=0.0,mode='denominator',share='kv')",
    "sink(2)+window(2)+topp(1.0)", "sink(4)+uniform(1.0)",
]


@pytest.mark.parametrize("spec", FULL)
def test_full_budget_equals_dense(spec):
    q, k, v = rand_qkv(b=3, hq=6, hkv=2, t=3, n=50)
    lengths = torch.tensor([50, 31, 7])
    out, sel = vattn.sparse_attention(q, k, v, spec, lengths=lengths, seed=0)
    ref = dense_attend(q, k, v, lengths=lengths)
    assert rel(out, ref) < 1e-5


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), hkv=st.integers(1, 3), g=st.integers(1, 3), t=st.integers(1, 4),
       n=st.integers(8, 80), seed=st.integers(0, 10_000), spec=st.sampled_from(FULL))
def test_full_budget_property(b, hkv, g, t, n, seed, spec):
    q, k, v = rand_qkv(b=b, hq=hkv * g, hkv=hkv, t=t, n=n, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t, n + 1, (b,), generator=gen)
    starts = torch.minimum(torch.randint(0, 4, (b,), generator=gen), lengths - t)
    out, _ = vattn.sparse_attention(q, k, v, spec, lengths=lengths, starts=starts, seed=seed)
    ref = dense_attend(q, k, v, lengths=lengths, starts=starts)
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    q, k, v = rand_qkv(b=2, hq=4, hkv=1, t=2, n=300, dtype=dtype)
    out, _ = vattn.sparse_attention(q, k, v, "topk(1.0)")
    ref = dense_attend(q.double(), k.double(), v.double())
    assert out.dtype == dtype
    assert rel(out, ref) < (1e-2 if dtype != torch.float32 else 1e-5)


def test_strided_views_of_a_bigger_cache():
    # K/V as views of a [B, N_max, Hkv, D] buffer (another common cache layout).
    buf_k = torch.randn(2, 100, 2, 16)
    buf_v = torch.randn(2, 100, 2, 16)
    k, v = buf_k[:, :60].transpose(1, 2), buf_v[:, :60].transpose(1, 2)
    q = torch.randn(2, 4, 1, 16)
    out, _ = vattn.sparse_attention(q, k, v, "sink(4)+window(4)+topk(1.0)")
    ref = dense_attend(q, k.contiguous(), v.contiguous())
    assert rel(out, ref) < 1e-5


def test_causal_rows_see_only_their_prefix():
    q, k, v = rand_qkv(b=1, hq=2, hkv=2, t=4, n=20)
    _, sel = vattn.sparse_attention(q, k, v, "dense")
    # Row t of 4 sees 20 - 4 + 1 + t keys.
    assert sel.count[0, 0].tolist() == [17, 18, 19, 20]
    assert int(sel.indices[0, 0, 0, :17].max()) == 16


def test_sparse_output_differs_when_budget_is_small():
    # Guards against a test suite that would pass with dense everywhere.
    q, k, v = rand_qkv(b=1, hq=2, hkv=1, t=1, n=500)
    out, sel = vattn.sparse_attention(q, k, v, "sink(4)+window(4)")
    assert int(sel.count.max()) == 8
    assert rel(out, dense_attend(q, k, v)) > 1e-3


def test_kernel_fits_only_supported_inputs():
    from vattn.attend import kernel_fits
    q, k, v = rand_qkv(d=64)
    assert kernel_fits(q, k, v) == __import__("vattn.kernels._common", fromlist=["x"]).triton_available()
    q2, k2, v2 = rand_qkv(d=80)
    assert not kernel_fits(q2, k2, v2)  # head dim 80: torch path
    assert not kernel_fits(q.double(), k, v)  # mixed dtypes: torch path


@pytest.mark.parametrize("shared", [False, True])
def test_scattered_path_equals_gather_path(shared):
    # The CPU path scores all keys when the selection is large; both must give the same
    # output, with ragged counts, -1 padding, log-weights and a repeated index.
    from vattn.attend import attend_scattered, gather_kv
    from vattn.selection import Selection
    torch.manual_seed(3)
    b, hq, hkv, t, n, d, kk = 2, 6, 2, 3, 40, 16, 12
    q, k, v = rand_qkv(b, hq, hkv, t, n, d, seed=3)
    h = hkv if shared else hq
    idx = torch.stack([torch.randperm(n)[:kk] for _ in range(b * h * t)]).reshape(b, h, t, kk)
    idx[..., 1] = idx[..., 0]  # a key drawn twice counts twice
    cnt = torch.randint(2, kk + 1, (b, h, t))
    idx = torch.where(torch.arange(kk) < cnt[..., None], idx, -1)
    sel = Selection(idx, torch.randn(b, h, t, kk) * 0.5, cnt, shared)
    got = attend_scattered(q, k, v, sel, 0.25)
    kk_, vv = gather_kv(k, v, idx.clamp(min=0), 1 if shared else hq // hkv)
    s = torch.einsum("bhgtd,bhtkd->bhgtk", q.float().reshape(b, h, hq // h, t, d), kk_) * 0.25
    s = (s + sel.log_weights[:, :, None]).masked_fill(~sel.valid()[:, :, None], float("-inf"))
    want = torch.einsum("bhgtk,bhtkd->bhgtd", torch.softmax(s, -1), vv).reshape(b, hq, t, d)
    assert rel(got, want) < 1e-5
