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


def test_kernel_misfit_says_why():
    from vattn.attend import kernel_misfit
    from vattn.kernels.common import triton_available
    q, k, v = rand_qkv(d=64)
    assert (kernel_misfit(q, k, v) is None) == triton_available()
    if triton_available():
        q2, k2, v2 = rand_qkv(d=80)
        assert "head dim 80" in kernel_misfit(q2, k2, v2)  # torch path, and why
        assert "dtypes differ" in kernel_misfit(q.double(), k, v)


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


# ---------------------------------------------------------------- issue 16: edge inputs
from test_fuzz import EVERY_PART  # noqa: E402

ALL_SPECS = EVERY_PART + list(vattn.PRESETS)


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("shape", [(0, 4, 2, 20), (2, 4, 0, 20), (2, 4, 2, 0), (0, 4, 0, 0)],
                         ids=["B=0", "T=0", "N=0", "all=0"])
def test_empty_batch_rows_or_keys(spec, shape):
    b, hq, t, n = shape
    q, k, v = torch.randn(b, hq, t, 16), torch.randn(b, 2, n, 16), torch.randn(b, 2, n, 16)
    out, sel = vattn.sparse_attention(q, k, v, spec, seed=0)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.any()  # no rows, or rows without keys: zeros
    assert sel.indices.shape[0] == b and sel.indices.shape[2] == t and sel.indices.shape[-1] == 0
    ref = dense_attend(q, k, v)
    assert ref.shape == q.shape and not ref.any()


def test_no_heads_or_zero_head_dim_is_refused():
    with pytest.raises(vattn.VattnError, match="query head"):
        vattn.sparse_attention(torch.randn(1, 0, 1, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8), "dense")
    with pytest.raises(vattn.VattnError, match="head dim"):
        vattn.sparse_attention(torch.randn(1, 2, 1, 0), torch.randn(1, 1, 5, 0), torch.randn(1, 1, 5, 0), "dense")


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_nonfinite_query_row_gives_nan_like_exact_attention(spec):
    q, k, v = rand_qkv(b=2, hq=4, hkv=2, t=2, n=40)
    q[0, 1, 1, 3] = float("nan")
    q[1, 2, 0, 0] = float("inf")
    lengths = torch.tensor([40, 30])
    out, _ = vattn.sparse_attention(q, k, v, spec, lengths=lengths, seed=0)
    ref = dense_attend(q, k, v, lengths=lengths)
    bad = torch.zeros(2, 4, 2, dtype=torch.bool)
    bad[0, 1, 1] = bad[1, 2, 0] = True
    assert torch.isnan(out[bad]).all() and torch.isnan(ref[bad]).all()
    assert torch.isfinite(out[~bad]).all() and torch.isfinite(ref[~bad]).all()


def test_nonfinite_query_row_without_keys_gives_zeros():
    q, k, v = rand_qkv(b=2, hq=2, hkv=1, t=1, n=10)
    q[1, 0, 0, 0] = float("nan")
    out, _ = vattn.sparse_attention(q, k, v, "topk(0.5)", lengths=torch.tensor([10, 0]))
    assert not out[1].any() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize("spec", ["window(4)", "window(0.9)"], ids=["gather", "scattered"])
def test_nonfinite_keys_and_values_reach_only_rows_that_attend_them(spec):
    # window(4) gathers the chosen keys; window(0.9) scores all keys (the CPU path for large
    # selections), where 0 * NaN for an unattended value must not leak in.
    q, k, v = rand_qkv(b=3, hq=4, hkv=2, t=1, n=50)
    k[0, 0, 0] = float("inf")   # batch 0: a key no row attends (position 0, outside the window)
    v[0, 1, 1] = float("nan")   # and a value no row attends
    k[1, 0, 49] = float("nan")  # batch 1: the last key, which KV head 0's window attends
    v[2, 1, 48] = float("inf")  # batch 2: an attended value of KV head 1
    out, _ = vattn.sparse_attention(q, k, v, spec)
    assert torch.isfinite(out[0]).all()
    assert torch.isnan(out[1, :2]).all() and torch.isfinite(out[1, 2:]).all()
    assert not torch.isfinite(out[2, 2:]).all(-1).any() and torch.isfinite(out[2, :2]).all()
    ref = dense_attend(q, k, v, lengths=torch.tensor([50, 50, 50]), starts=torch.tensor([2, 0, 0]))
    assert torch.isfinite(ref[0]).all()  # exact attention outside [starts, lengths) is unaffected too
    assert torch.isnan(ref[1, :2]).all() and not torch.isfinite(ref[2, 2:]).all(-1).any()


@pytest.mark.parametrize("kwargs, words", [
    (dict(lengths=torch.tensor([16.0, 16.0])), ["lengths", "int tensor", "float32"]),
    (dict(lengths=torch.tensor([[16], [16]])), ["lengths", "shape [2]"]),
    (dict(lengths="16"), ["lengths", "int tensor"]),
    (dict(lengths=torch.tensor([True, True])), ["lengths", "int tensor"]),
    (dict(lengths=16), ["lengths", "int tensor"]),
    (dict(lengths=[16, 1.5]), ["lengths", "ints"]),
    (dict(lengths=torch.tensor([16, -1])), ["lengths", "[0, N=16]"]),
    (dict(starts=torch.tensor([0.0, 1.0])), ["starts", "int tensor"]),
    (dict(starts=torch.tensor([0, 1, 2])), ["starts", "shape [2]"]),
    (dict(starts=torch.tensor([0, 9]), lengths=torch.tensor([16, 8])), ["starts", "0 <= start <= length"]),
    (dict(starts=torch.tensor([-1, 0])), ["starts", "0 <= start"]),
    (dict(scale=0.0), ["scale", "positive finite"]),
    (dict(scale=-0.5), ["scale", "positive finite"]),
    (dict(scale=float("nan")), ["scale", "positive finite"]),
    (dict(scale=float("inf")), ["scale", "positive finite"]),
    (dict(scale="0.1"), ["scale", "positive finite"]),
    (dict(scale=True), ["scale"]),
    (dict(seed="7"), ["seed", "int"]),
    (dict(seed=1.5), ["seed", "int"]),
    (dict(seed=-1), ["seed", "int"]),
    (dict(seed=True), ["seed"]),
    (dict(seed=2**64), ["seed"]),
])
def test_bad_call_arguments_raise_vattn_error(kwargs, words):
    q, k, v = rand_qkv(b=2, hq=4, hkv=2, t=1, n=16)
    for call in (lambda: vattn.sparse_attention(q, k, v, "sink(2)+uniform(0.5)", **kwargs),
                 lambda: vattn.select("sink(2)+uniform(0.5)", q, k, v, **kwargs)):
        with pytest.raises(vattn.VattnError) as e:
            call()
        assert all(w in str(e.value) for w in words), str(e.value)


def test_good_call_arguments_in_other_forms():
    q, k, v = rand_qkv(b=2, hq=4, hkv=2, t=1, n=16)
    ref = dense_attend(q, k, v, lengths=torch.tensor([16, 9]), starts=torch.tensor([1, 0]))
    for lengths, starts in (([16, 9], [1, 0]), (torch.tensor([16, 9], dtype=torch.int32), torch.tensor([1, 0]))):
        out, _ = vattn.sparse_attention(q, k, v, "dense", lengths=lengths, starts=starts, scale=0.25)
        assert rel(out, dense_attend(q, k, v, lengths=torch.tensor([16, 9]), starts=torch.tensor([1, 0]),
                                     scale=0.25)) < 1e-6
    out, _ = vattn.sparse_attention(q, k, v, "dense", lengths=[16, 9], starts=[1, 0], scale=1, seed=3)
    assert out.shape == ref.shape
    with pytest.raises(vattn.VattnError, match="generator"):
        vattn.select("uniform(0.5)", q, k, v, generator=0)
